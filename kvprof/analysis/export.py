"""Exports: a Perfetto-viewable trace (Chrome trace JSON) and Parquet for archives.

Perfetto (ui.perfetto.dev) reads the Chrome trace event format: a JSON object whose
`traceEvents` are dicts with `ph` (phase), `ts` (microseconds), `pid`, `tid`, `name`, `args`.
A kvprof run becomes one process with these tracks:

    steps           X slices: prefill (one per distinct span) and each decode step
    phases          X slices: speculation, kv_transfer, eviction, sync_stall, a plugin's own
    phases beside   X slices: phases on another stream, overlapped with the above (ext overlapped=1)
    copies <dir>    X slices: each offload copy, one track per direction (store, fetch)
    evictions       X slices: each evict event (zero-length ones show as thin marks)
    requests        async slices (b/e) from arrival to last token, one per request
    counters        C: "KV bytes" (device, host, aux_device) and "memory" (allocated, reserved,
                    NVML used, host RSS)
    flows           s/f arrows from an eviction or a store (device->host) to a later fetch
                    (host->device) of the same tokens: same request and layer, overlapping
                    positions (or, for copies that name none, the whole layer)

Timestamps are microseconds from the run start. Parquet keeps the Arrow table and its schema
metadata (schema version, run) as written: `pyarrow.parquet.read_table` gives both back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from kvprof.analysis.breakdown import PHASE_LABELS
from kvprof.analysis.common import Events, ext_values, require_events, run_bounds, run_label
from kvprof.analysis.summary import transfer_direction
from kvprof.trace import Trace, replaced_on_success

PID = 1
TRACKS = {"steps": 1, "phases": 2, "copies store": 3, "copies fetch": 4, "copies other": 5, "evictions": 6,
          "phases beside": 7}
MAX_FLOWS = 100_000  # arrows beyond this are left out (the UI slows down long before)


class Timeline:
    """Converts trace nanoseconds to Perfetto microseconds from the run start."""

    def __init__(self, origin_ns: int) -> None:
        self.origin_ns = origin_ns

    def us(self, ns: int) -> float:
        return round((ns - self.origin_ns) / 1000.0, 3)

    def slice(self, name: str, track: str, start_ns: int, end_ns: int, cat: str, args: dict[str, Any]) -> dict:
        """An X (complete) slice; args without missing values."""
        return {"ph": "X", "name": name, "cat": cat, "pid": PID, "tid": TRACKS[track], "ts": self.us(start_ns),
                "dur": (end_ns - start_ns) / 1000.0, "args": {k: v for k, v in args.items() if v is not None}}


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The table's rows as dicts (column by column to Python, then zipped: quicker than per row)."""
    columns = {name: table[name].to_pylist() for name in table.column_names}
    for values in zip(*columns.values()):
        yield dict(zip(columns, values))


def perfetto(trace: Trace, max_flows: int = MAX_FLOWS) -> dict[str, Any]:
    """The run as a Chrome trace JSON object (see the module docstring)."""
    require_events(trace)
    events = Events.of(trace)
    timeline = Timeline(run_bounds(events)[0])
    out = (_step_slices(events, timeline) + _phase_slices(events, timeline) + _copy_slices(events, timeline)
           + _evict_slices(events, timeline) + _request_slices(events, timeline) + _counters(events, timeline))
    flows = _flows(events, timeline, max_flows)
    used = {event["tid"] for event in out}
    names = [{"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": f"kvprof {run_label(trace)}"}}]
    names += [{"ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "args": {"name": name}}
              for name, tid in TRACKS.items() if tid in used]
    return {
        "traceEvents": names + out + flows,
        "displayTimeUnit": "ms",
        "metadata": {"kvprof_trace": str(trace.path), "kvprof_run": run_label(trace),
                     "flows": len(flows) // 2, "flows_capped_at": max_flows},
    }


def _step_slices(events: Events, timeline: Timeline) -> list[dict[str, Any]]:
    """Prefill (one slice per distinct span: a batch's requests share one) and decode steps."""
    spans: dict[tuple[int, int], dict[str, Any]] = {}
    for row in _rows(events.of_kind("prefill", ["start_ns", "end_ns", "request_id", "tokens"])):
        span = spans.setdefault((row["start_ns"], row["end_ns"]), {"requests": [], "tokens": 0})
        span["requests"].append(row["request_id"])
        span["tokens"] += row["tokens"] or 0
    out = [timeline.slice("prefill", "steps", start, end, "prefill", args) for (start, end), args in spans.items()]
    columns = ["start_ns", "end_ns", "step", "batch_size", "tokens", "kv_device_bytes", "kv_host_bytes"]
    for row in _rows(events.of_kind("decode_step", columns)):
        name = "decode step" if row["step"] is None else f"decode step {row['step']}"
        out.append(timeline.slice(name, "steps", row.pop("start_ns"), row.pop("end_ns"), "decode", row))
    return out


def _phase_slices(events: Events, timeline: Timeline) -> list[dict[str, Any]]:
    """Critical-path phases on one track; phases on another stream (they overlap those) on their own."""
    phases = events.of_kind("phase", ["start_ns", "end_ns", "phase", "step", "layer", "ext"])
    beside = (ext_values(phases, "overlapped") == 1).tolist()
    return [timeline.slice(PHASE_LABELS.get(row["phase"], row["phase"] or "phase"),
                           "phases beside" if on_side else "phases", row.pop("start_ns"), row.pop("end_ns"), "phase",
                           row)
            for row, on_side in zip(_rows(phases.drop_columns(["ext"])), beside)]


def _copy_slices(events: Events, timeline: Timeline) -> list[dict[str, Any]]:
    """One slice per offload copy, on the track of its direction; prefetches named so."""
    columns = ["start_ns", "end_ns", "src_medium", "dst_medium", "bytes", "tokens", "layer", "request_id"]
    copies = events.of_kind("offload", [*columns, "ext"])
    prefetch = (ext_values(copies, "prefetch") == 1).tolist()
    out = []
    for row, prefetched in zip(_rows(copies.select(columns)), prefetch):
        direction = transfer_direction(row["src_medium"], row["dst_medium"])
        track = f"copies {direction}" if direction in ("store", "fetch") else "copies other"
        out.append(timeline.slice("prefetch" if prefetched else direction, track, row.pop("start_ns"),
                                  row.pop("end_ns"), "offload", row))
    return out


def _evict_slices(events: Events, timeline: Timeline) -> list[dict[str, Any]]:
    rows = _rows(events.of_kind("evict", ["start_ns", "end_ns", "reason", "layer", "request_id", "tokens", "bytes"]))
    return [timeline.slice(f"evict {row['reason'] or ''}".strip(), "evictions", row.pop("start_ns"),
                           row.pop("end_ns"), "evict", row) for row in rows]


def _request_slices(events: Events, timeline: Timeline) -> list[dict[str, Any]]:
    """Each request from arrival to its last token, as an async slice of its own."""
    out = []
    for row in _rows(events.of_kind("request_end", ["start_ns", "end_ns", "request_id", "tokens"])):
        common = {"cat": "request", "id": str(row["request_id"]), "name": str(row["request_id"]), "pid": PID, "tid": 0}
        out.append({**common, "ph": "b", "ts": timeline.us(row["start_ns"]), "args": {"output_tokens": row["tokens"]}})
        out.append({**common, "ph": "e", "ts": timeline.us(row["end_ns"]), "args": {}})
    return out


def _counters(events: Events, timeline: Timeline) -> list[dict[str, Any]]:
    """Counter tracks: KV bytes per tier (a point where they change) and device memory."""
    out = []
    kv = events.kv
    for index, end_ns in enumerate(kv.end_ns.tolist()):
        args = {tier: float(values[index]) for tier, values in kv.values.items() if not math.isnan(values[index])}
        out.append({"ph": "C", "name": "KV bytes", "pid": PID, "tid": 0, "ts": timeline.us(end_ns), "args": args})
    names = {"mem_allocated_bytes": "allocated", "mem_reserved_bytes": "reserved", "nvml_used_bytes": "nvml used"}
    samples = events.of_kind("sample", ["end_ns", *names, "ext"])
    for row, rss in zip(_rows(samples.select(["end_ns", *names])), ext_values(samples, "rss_bytes").tolist()):
        args = {label: float(row[column]) for column, label in names.items() if row[column] is not None}
        if not math.isnan(rss):
            args["host rss"] = rss
        if args:
            out.append({"ph": "C", "name": "memory bytes", "pid": PID, "tid": 0, "ts": timeline.us(row["end_ns"]),
                        "args": args})
    return out


def _flows(events: Events, timeline: Timeline, max_flows: int) -> list[dict[str, Any]]:
    """s/f pairs from an eviction or a store to a later fetch of the same tokens.

    A fetch is linked to the latest earlier source of the same request and layer whose
    positions it shares; copies that name no positions (whole-layer offload) match on request
    and layer alone, evictions only by positions. Each fetch gets at most one arrow.
    """
    columns = ["start_ns", "end_ns", "request_id", "layer", "positions", "src_medium", "dst_medium"]
    moves = events.table.select(columns).filter(pa.array(events.mask("evict") | events.mask("offload")))
    sources: dict[tuple[str | None, int | None], list[tuple[dict[str, Any], set[int]]]] = {}
    flows: list[dict[str, Any]] = []
    for row in sorted(_rows(moves), key=lambda r: r["start_ns"]):
        tokens = {p for head in row["positions"] or () for p in head or ()}
        direction = "evict" if row["dst_medium"] is None else transfer_direction(row["src_medium"], row["dst_medium"])
        key = (row["request_id"], row["layer"])
        if direction == "store" or (direction == "evict" and tokens):
            sources.setdefault(key, []).append((row | {"kind": direction}, tokens))
        elif direction == "fetch" and len(flows) < 2 * max_flows:
            source = next((source for source, source_tokens in reversed(sources.get(key, []))
                           if source["end_ns"] <= row["start_ns"] and _same_tokens(source_tokens, tokens,
                                                                                     source["kind"])), None)
            if source is not None:
                flows += _arrow(len(flows) // 2, source, row, timeline)
    return flows


def _same_tokens(source: set[int], fetched: set[int], kind: str) -> bool:
    if source and fetched:
        return bool(source & fetched)
    return kind == "store"  # a copy that names no positions moved the whole layer


def _arrow(flow_id: int, source: dict[str, Any], target: dict[str, Any], timeline: Timeline) -> list[dict]:
    """A flow from the middle of the source slice to the middle of the fetch (each binds there)."""
    def middle(row: dict[str, Any]) -> float:
        return timeline.us((row["start_ns"] + row["end_ns"]) // 2)

    track = "evictions" if source["kind"] == "evict" else "copies store"
    common = {"name": f"{source['kind']} -> fetch", "cat": "kv_flow", "id": flow_id, "pid": PID}
    return [{**common, "ph": "s", "tid": TRACKS[track], "ts": middle(source)},
            {**common, "ph": "f", "bp": "e", "tid": TRACKS["copies fetch"], "ts": middle(target)}]


def write_perfetto(trace: Trace, path: str | os.PathLike, max_flows: int = MAX_FLOWS) -> Path:
    """Write the Chrome trace JSON for `trace`; open it at ui.perfetto.dev."""
    document = perfetto(trace, max_flows)
    with replaced_on_success(path) as partial:
        with open(partial, "w") as handle:
            json.dump(document, handle, separators=(",", ":"))
    return Path(path)


def write_parquet(trace: Trace, path: str | os.PathLike) -> Path:
    """Write the trace's events as Parquet (zstd), with the column types and schema metadata
    (version, run, checksum) of its trace: `kvprof analyze` reads it back as the trace."""
    import pyarrow.parquet as pq

    require_events(trace)
    with replaced_on_success(path) as partial:
        pq.write_table(trace.stored_table(), partial, compression="zstd")
    return Path(path)
