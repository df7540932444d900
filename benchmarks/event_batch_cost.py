"""What kvprof's host side costs per evict event: one columnar batch against the same events one by one.

    python benchmarks/event_batch_cost.py [--batch 16 --layers 30 --kv-heads 8 --steps 31 --prompt 8192 --step-ms 9]

H2O's events at detail "head" for Llama-3-8B's shapes: each decode step evicts one position per
(request, layer, KV head), `batch x layers x kv_heads` events; the prefill's cut drops 80 % of a
`--prompt`-token prompt per (request, layer, KV head). Both are emitted into a real Arrow trace
(the profiler and its writer, nothing else listening), once as `EventBatch`es (what the H2O plugin
emits) and once as single events (`Profiler.emit` per event, as before batches existed). Prints
the time the run's thread spent delivering them (run_end's profiler_hook_ns), and that plus the
run's end (which waits for the writing thread), per event and per step, medians over `--repeats`
runs, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kvprof import Kind, Profiler, RunInfo
from kvprof.events import EventBatch, Positions
from kvprof.plugins import load_plugins


def evictions(batch: int, layers: int, kv_heads: int, per_list: int, step: int | None, rng: np.random.Generator,
              at_ns: int) -> EventBatch:
    events = batch * layers * kv_heads
    rows = np.repeat(np.arange(batch), layers * kv_heads)
    which = np.tile(np.arange(layers * kv_heads), batch)
    values = np.sort(rng.integers(0, 1 << 20, size=(events, per_list), dtype=np.int32), axis=-1).reshape(-1)
    return EventBatch(
        Kind.EVICT, at_ns, at_ns + 1000,
        columns={"request_id": [f"req-{row}" for row in rows.tolist()], "layer": which // kv_heads,
                 "kv_head": which % kv_heads, "tokens": np.full(events, per_list),
                 "bytes": np.full(events, per_list * 512),
                 "ext": {"budget_tokens": np.full(events, 1638.0)}},
        shared={"reason": "h2o", "step": step, "src_medium": "device", "kv_device_bytes": 1 << 30},
        positions=Positions(values, np.arange(0, events * per_list + 1, per_list, dtype=np.int32),
                            np.arange(events + 1, dtype=np.int32)))


def one_run(args: argparse.Namespace, batched: bool, folder: Path) -> tuple[float, float, int]:
    """Seconds the run's thread spent delivering the events (profiler_hook_ns), the same plus the
    run's end (the writer's last batches, turned into Arrow and written on its thread, waited
    for), and how many events there were."""
    rng = np.random.default_rng(0)
    run = RunInfo(strategy="h2o", model={}, workload={}, options={}, trace_path=str(folder / f"{batched}.arrow"))
    profiler = Profiler(load_plugins().manager, run)
    profiler.start()
    cut = int(args.prompt * 0.8)
    batches = [evictions(args.batch, args.layers, args.kv_heads, cut, None, rng, 0)]
    batches += [evictions(args.batch, args.layers, args.kv_heads, 1, step, rng, (step + 1) * 10**6)
                for step in range(args.steps)]
    for index, item in enumerate(batches):
        if index > 1:
            time.sleep(args.step_ms / 1e3)  # a decode step's length between two steps' events
        if batched:
            profiler.emit_batch(item)
        else:
            for event in item.events():
                profiler.emit(event)
    before_end = profiler.hook_ns
    began = time.perf_counter_ns()
    profiler.end()  # the last flush, the writing thread's queue, the footer
    return before_end / 1e9, (before_end + time.perf_counter_ns() - began) / 1e9, sum(len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="time between two decode steps' events (9 at H2O's batch 16 x 8K on the H200)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batched in (True, False):
            runs = [one_run(args, batched, Path(tmp)) for _ in range(args.repeats)]
            results[batched] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                                runs[0][2])
    (batch_hook_s, batch_s, events), (single_hook_s, single_s, _) = results[True], results[False]
    print(f"{events} evict events ({args.batch} requests x {args.layers} layers x {args.kv_heads} KV heads, "
          f"prefill cut of {int(args.prompt * 0.8)} positions each + {args.steps} decode steps of 1)")
    for name, hook_s, seconds in (("batches", batch_hook_s, batch_s), ("one by one", single_hook_s, single_s)):
        print(f"  {name:>10}: on the run's thread {hook_s:.3f} s ({hook_s / events * 1e6:.2f} us per event), "
              f"with the run's end {seconds:.3f} s ({seconds / events * 1e6:.2f} us per event, "
              f"{seconds / (args.steps + 1) * 1e3:.2f} ms per step)")
    print(f"  one by one / batches: {single_s / batch_s:.1f}x")


if __name__ == "__main__":
    main()
