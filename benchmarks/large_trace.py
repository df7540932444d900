"""Writing and analyzing a large trace: 10 million events by default.

    python benchmarks/large_trace.py                    # 10M events, the trace in a temporary folder
    python benchmarks/large_trace.py --events 1000000 --keep traces/large.arrow

The run is H2O-shaped, at the default `--detail layer`: batches of 8 passkey requests (prompt 256,
1024 output tokens) on a 32-layer model with 8 KV heads. Per batch: 8 prefill events; after
prefill one evict event per layer and request, dropping 80 % of the prompt (a position list per
head) and an eviction phase per layer; then per decode step one decode_step, one eviction phase
per layer, one evict event per layer and request (one position per head) and one sample.

Writing goes through the real path, `Profiler.emit_*` -> pluggy -> `ArrowTraceWriter`, and its
rate is printed as events per second. Analysis runs in a fresh process, so its peak memory is
its own: read the trace, then summary, breakdown and retention (what `kvprof analyze` runs).
Goal: the analysis of 10M events within 10 s and 2 GB on the 2-core CPU machine. The trace is
memory-mapped: the peak RSS printed includes the pages of it the analysis touched (each column
an analysis reads is touched end to end, since every kind of event is spread over the file).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LAYERS, KV_HEADS, BATCH, PROMPT, OUTPUT = 32, 8, 8, 256, 1024
KEPT = int(0.2 * PROMPT)          # H2O's default budget: heavy 10 % + recent 10 % of the prompt
STEP_NS, PREFILL_NS = 20_000_000, 150_000_000


def events_per_batch() -> int:
    prefill = BATCH + LAYERS * BATCH + LAYERS
    step = 1 + LAYERS + LAYERS * BATCH + 1
    return prefill + (OUTPUT - 1) * step + BATCH


def write(path: Path, target_events: int) -> tuple[int, float]:
    """Emit about `target_events` events into `path`; returns (events, seconds)."""
    from kvprof import Profiler, RunInfo
    from kvprof.plugins import load_plugins
    from kvprof.trace import ArrowTraceWriter

    batches = max(1, round(target_events / events_per_batch()))
    span = (100, 126)  # the passkey's tokens in every prompt
    requests = [{"request_id": f"req-{i}", "prompt_tokens": PROMPT, "max_new_tokens": OUTPUT, "arrival_s": 0.0,
                 "probe": {"kind": "passkey", "answer": "12345", "spans": [list(span)], "asked": 0, "depth": 0.4}}
                for i in range(batches * BATCH)]
    run = RunInfo(
        strategy="h2o", options={"heavy_ratio": 0.1, "recent_ratio": 0.1}, device="cuda",
        model={"name": "synthetic", "weights": "random",
               "config": {"num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS}},
        workload={"name": "passkey", "params": {"prompt_len": PROMPT, "output_len": OUTPUT, "batch_size": BATCH},
                  "requests": requests},
        extra={"num_layers": LAYERS, "weights_bytes": 16_000_000_000}, trace_path=str(path),
    )
    pm = load_plugins(entry_points=False).manager
    pm.register(ArrowTraceWriter(path, run.to_dict()))
    profiler = Profiler(pm, run)
    started = time.perf_counter()
    profiler.start()
    # Made-up timestamps, from 1 s: far behind the monotonic clock, so the writer cuts batches by
    # size (8192 rows), as it does in any run that emits this fast.
    now = 1_000_000_000
    entry_bytes = 2 * 128 * 2  # K and V rows of one head, bf16
    for batch in range(batches):
        ids = [f"req-{batch * BATCH + row}" for row in range(BATCH)]
        arrival = now
        # Prefill, and H2O's eviction to the budget before its end: the heavy hitters kept are
        # spread over the prompt, so part of the passkey span survives.
        for layer in range(LAYERS):
            profiler.emit_phase("eviction", now + PREFILL_NS - 2_000_000, now + PREFILL_NS - 1_000_000, layer=layer)
            for row, request_id in enumerate(ids):
                dropped = [[p for p in range(PROMPT - KEPT // 2) if (p + head + layer + row) % 5]
                           for head in range(KV_HEADS)]
                profiler.emit_evict(now + PREFILL_NS - 1_000_000, now + PREFILL_NS - 1_000_000, request_id=request_id,
                                    layer=layer, tokens=sum(map(len, dropped)), reason="h2o",
                                    bytes=sum(map(len, dropped)) * entry_bytes, positions=dropped, src_medium="device",
                                    ext={"budget_tokens": float(KEPT)})
        now += PREFILL_NS
        for request_id in ids:
            profiler.emit_prefill(arrival, now, request_id=request_id, tokens=PROMPT, batch_size=BATCH,
                                  kv_device_bytes=BATCH * KEPT * LAYERS * KV_HEADS * entry_bytes,
                                  ext={"prompt_tokens": float(PROMPT)})
        kv_bytes = BATCH * KEPT * LAYERS * KV_HEADS * entry_bytes
        for step in range(OUTPUT - 1):
            start = now
            for layer in range(LAYERS):
                at = start + 15_000_000 + layer * 100_000
                profiler.emit_phase("eviction", at, at + 50_000, step=step, layer=layer)
                for row, request_id in enumerate(ids):
                    position = KEPT // 2 + step + row
                    profiler.emit_evict(at + 50_000, at + 50_000, request_id=request_id, layer=layer, tokens=KV_HEADS,
                                        bytes=KV_HEADS * entry_bytes, reason="h2o", src_medium="device",
                                        positions=[[position] for _ in range(KV_HEADS)], step=step,
                                        kv_device_bytes=kv_bytes, ext={"budget_tokens": float(KEPT)})
            now = start + STEP_NS
            profiler.emit_decode_step(start, now, step=step, batch_size=BATCH, tokens=BATCH, kv_device_bytes=kv_bytes)
            profiler.emit_sample(now, mem_allocated_bytes=17_000_000_000 + step, mem_reserved_bytes=18_000_000_000)
        for request_id in ids:
            profiler.emit_request_end(arrival, now, request_id=request_id, tokens=OUTPUT, text="The pass key is 12345")
        now += 1_000_000
    profiler.end()
    return profiler.events_emitted, time.perf_counter() - started


def _status_kib(key: str) -> int:
    """A figure of /proc/self/status, in KiB (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0


class AnonymousPeak:
    """The peak of this process's anonymous memory (RssAnon: what it allocated, as opposed to
    pages of mapped files), sampled every 10 ms on a thread."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak_kib, _status_kib("RssAnon")) * 1024


def analyze(path: Path) -> dict:
    """Read and analyze `path` (in this process); figures as JSON."""
    from kvprof.analysis import analyze as run_analyses
    from kvprof.trace import read_trace

    anonymous = AnonymousPeak()
    started = time.perf_counter()
    trace = read_trace(path)
    read_s = time.perf_counter() - started
    seconds = {}
    for name in ("summary", "breakdown", "retention"):
        begin = time.perf_counter()
        result = run_analyses(trace, only=[name])
        seconds[name] = time.perf_counter() - begin
    return {
        "events": trace.table.num_rows, "read_s": read_s, "analysis_s": seconds,
        "total_s": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mapped_trace_bytes": _status_kib("RssFile") * 1024,
        "peak_anonymous_bytes": anonymous.stop(),
        "survival_asked_mean": result.results["retention"]["survival"]["asked_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, help="write the trace here and keep it")
    parser.add_argument("--analyze-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.analyze_only:
        print(json.dumps(analyze(args.analyze_only)))
        return

    with tempfile.TemporaryDirectory() as folder:
        path = args.keep or Path(folder) / "large.arrow"
        events, write_s = write(path, args.events)
        size = path.stat().st_size
        print(f"wrote {events:,} events ({size / 2**30:.2f} GiB) in {write_s:.1f} s: "
              f"{events / write_s:,.0f} events/s through Profiler.emit -> ArrowTraceWriter")
        child = subprocess.run([sys.executable, __file__, "--analyze-only", str(path)],
                               check=True, capture_output=True, text=True)
        figures = json.loads(child.stdout)
    parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in figures["analysis_s"].items())
    print(f"analyzed {figures['events']:,} events in {figures['total_s']:.2f} s "
          f"(read {figures['read_s']:.2f} s; {parts})")
    print(f"peak memory: RSS {figures['peak_rss_bytes'] / 2**30:.2f} GiB, of which about "
          f"{figures['mapped_trace_bytes'] / 2**30:.2f} GiB are pages of the memory-mapped trace file "
          "(page cache, shared and reclaimable); anonymous (allocated) "
          f"{figures['peak_anonymous_bytes'] / 2**30:.2f} GiB")
    print(f"goal: 10 s and 2 GiB for 10M events; asked-span survival {figures['survival_asked_mean']:.3f}")


if __name__ == "__main__":
    main()
