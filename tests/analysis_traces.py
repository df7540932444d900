"""Small hand-built traces for the analysis tests: every expected figure is known by hand.

Times are written in milliseconds (MS) from the run start, so the arithmetic in the tests
reads like the timeline below.

`batch_trace` — one batch of two requests on a made-up model (1000 KV bytes per token):

    0 ms   run_start
    1-11   prefill req-0 (100 tokens) and req-1 (80 tokens), both arrive at 1 ms
    11-15  decode step 0 (2 requests)
    15-20  decode step 1 (2 requests; eviction phase 16-17); req-1 ends (3 output tokens)
    20-26  decode step 2 (req-0 only; kv_transfer phase 21-23); req-0 ends (4 output tokens)
    30     run_end
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvprof import Event, Kind
from kvprof.trace import ArrowTraceWriter

MS = 1_000_000  # nanoseconds


def run_info(strategy: str = "full", options: dict | None = None, requests: list[dict] | None = None,
             workload: str = "synthetic", params: dict | None = None, layers: int = 2, kv_heads: int = 2,
             weights_bytes: int | None = 100_000_000, kv_budget: dict | None = None) -> dict[str, Any]:
    """Run metadata shaped like RunInfo.to_dict(), with only what analyses read."""
    extra: dict[str, Any] = {"num_layers": layers}
    if kv_budget is not None:
        extra["kv_budget"] = kv_budget
    if weights_bytes is not None:
        extra["weights_bytes"] = weights_bytes
    return {
        "strategy": strategy, "options": options or {}, "device": "cuda",
        "model": {"name": "hand-built", "weights": "random",
                  "config": {"num_hidden_layers": layers, "num_key_value_heads": kv_heads}},
        "workload": {"name": workload, "params": {"prompt_len": 100, "batch_size": 2, "output_len": 4,
                                                  **(params or {})},
                     "requests": requests or []},
        "extra": extra,
    }


def write_trace(path: Path, events: list[Event], run: dict[str, Any], finish: bool = True) -> Path:
    """Write `events` (numbered in list order) as a kvprof trace and return where it is;
    finish=False leaves the footer out and the file at its partial path, like a killed run."""
    writer = ArrowTraceWriter(path, run, batch_rows=4)
    for seq, event in enumerate(events):
        event.seq, event.run_id = seq, "hand"
        writer.add(event)
    if finish:
        writer.close()
    else:
        writer.flush()
        writer.wait()
        writer._file.close()
    return writer.written_path


def ev(kind: Kind, start_ms: float, end_ms: float | None = None, **fields: Any) -> Event:
    """An event with times in milliseconds."""
    end_ms = start_ms if end_ms is None else end_ms
    return Event(kind, int(start_ms * MS), int(end_ms * MS), **fields)


def batch_events() -> list[Event]:
    """The timeline of the module docstring."""
    return [
        ev(Kind.RUN_START, 0),
        ev(Kind.PREFILL, 1, 11, request_id="req-0", tokens=100, batch_size=2, kv_device_bytes=180_000,
           kv_host_bytes=0, ext={"prompt_tokens": 100.0}),
        ev(Kind.PREFILL, 1, 11, request_id="req-1", tokens=80, batch_size=2, kv_device_bytes=180_000,
           kv_host_bytes=0, ext={"prompt_tokens": 80.0}),
        ev(Kind.SAMPLE, 11, mem_allocated_bytes=500_000_000, mem_reserved_bytes=700_000_000,
           mem_peak_allocated_bytes=600_000_000, mem_peak_reserved_bytes=650_000_000),
        ev(Kind.SAMPLE, 12, nvml_used_bytes=900_000_000, ext={"pcie_rx_bytes_per_s": 1.0}),
        ev(Kind.DECODE_STEP, 11, 15, step=0, batch_size=2, tokens=2, kv_device_bytes=182_000, kv_host_bytes=0),
        ev(Kind.OFFLOAD, 15, 16, request_id="req-0", layer=0, tokens=2, bytes=2_000_000,
           src_medium="device", dst_medium="host", positions=[[3, 4]]),
        ev(Kind.PHASE, 16, 17, phase="eviction", step=1),
        ev(Kind.EVICT, 16.5, request_id="req-0", layer=0, tokens=3, bytes=3000, reason="h2o",
           src_medium="device", positions=[[5, 6, 7]]),
        ev(Kind.EVICT, 16.5, request_id="req-1", layer=0, tokens=2, bytes=2000, reason="h2o",
           src_medium="device", positions=[[8, 9]]),
        ev(Kind.DECODE_STEP, 15, 20, step=1, batch_size=2, tokens=2, kv_device_bytes=184_000, kv_host_bytes=0),
        ev(Kind.REQUEST_END, 1, 20, request_id="req-1", tokens=3, text="three", ext={"prompt_tokens": 80.0}),
        ev(Kind.OFFLOAD, 21, 23, request_id="req-0", layer=0, tokens=2, bytes=1_000_000,
           src_medium="host", dst_medium="device", positions=[[4]], ext={"prefetch": 1.0}),
        ev(Kind.PHASE, 21, 23, phase="kv_transfer", step=2),
        ev(Kind.DECODE_STEP, 20, 26, step=2, batch_size=1, tokens=1, kv_device_bytes=51_500,
           kv_host_bytes=51_500),
        ev(Kind.REQUEST_END, 1, 26, request_id="req-0", tokens=4, text="four", ext={"prompt_tokens": 100.0}),
        ev(Kind.RUN_END, 30, ext={"profiler_events": 17.0, "profiler_hook_ns": 3.0 * MS}),
    ]


def batch_trace(path: Path, **run_fields: Any) -> Path:
    return write_trace(path, batch_events(), run_info(**run_fields))


def passkey_requests(answers: tuple[str, ...] = ("12345", "54321")) -> list[dict[str, Any]]:
    """Probe requests as Workload.describe() records them: a passkey at tokens [10, 20)."""
    return [{"request_id": f"req-{i}", "prompt_tokens": 100, "max_new_tokens": 4, "arrival_s": 0.0,
             "probe": {"kind": "passkey", "answer": answer, "spans": [[10, 20]], "asked": 0, "depth": 0.1}}
            for i, answer in enumerate(answers)]


def retention_events(texts: tuple[str, str], evictions: bool = True) -> list[Event]:
    """Two passkey requests answered with `texts` (req-0: 3 tokens, req-1: 2). With `evictions`,
    req-0's prefill (the forward of its first answer token) evicts, per (layer, head) of its span
    [10, 20): L0H0 {10,11,12,19}, L0H1 {15,19}, L1H0 {19}, L1H1 {10,11,19} (and positions outside
    the span); decode step 0 (the forward of its second answer token) evicts L0H0 {13,14},
    L0H1 {16}, which its third token no longer sees."""
    events = [
        ev(Kind.RUN_START, 0),
        ev(Kind.PREFILL, 1, 11, request_id="req-0", tokens=100, batch_size=2, ext={"prompt_tokens": 100.0}),
        ev(Kind.PREFILL, 1, 11, request_id="req-1", tokens=100, batch_size=2, ext={"prompt_tokens": 100.0}),
    ]
    if evictions:
        events += [
            ev(Kind.EVICT, 10.5, request_id="req-0", layer=0, tokens=4, positions=[[10, 11, 12], [15]]),
            ev(Kind.EVICT, 10.5, request_id="req-0", layer=1, kv_head=1, tokens=2, positions=[[10, 11]]),
            ev(Kind.EVICT, 10.6, request_id="req-0", tokens=1, positions=[[19]]),
            ev(Kind.EVICT, 10.6, request_id="req-0", layer=0, tokens=2, positions=[[30, 31], [40]]),
            ev(Kind.EVICT, 10.7, request_id="req-0", layer=0, tokens=1, positions=[[10], [19]]),
        ]
    events += [ev(Kind.DECODE_STEP, 11, 15, step=0, batch_size=2, tokens=2)]
    if evictions:
        events += [ev(Kind.EVICT, 12, request_id="req-0", step=0, layer=0, tokens=3, positions=[[13, 14], [16]])]
    events += [
        ev(Kind.REQUEST_END, 1, 15, request_id="req-1", tokens=2, text=texts[1]),
        ev(Kind.DECODE_STEP, 15, 16, step=1, batch_size=1, tokens=1),
        ev(Kind.REQUEST_END, 1, 16, request_id="req-0", tokens=3, text=texts[0]),
        ev(Kind.RUN_END, 17),
    ]
    return events


def retention_trace(path: Path, plugin: str, texts: tuple[str, str], options: dict | None = None,
                    evictions: bool = True, kv_budget: dict | None = None) -> Path:
    run = run_info(strategy=plugin, options=options, workload="passkey", requests=passkey_requests(),
                   kv_budget=kv_budget)
    return write_trace(path, retention_events(texts, evictions), run)
