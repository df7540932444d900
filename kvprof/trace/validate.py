"""Checking a trace against the published schema, the event rules and physical ranges."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from kvprof.events import Kind
from kvprof.trace.reader import TraceError, read_trace
from kvprof.trace.schema import COLUMNS, REQUIRED

PiB = 2**50
WEEK_NS = 7 * 24 * 3600 * 10**9
# column -> (lowest, highest) a real run can record; beyond is corruption or a plugin's bug.
PHYSICAL_RANGES: dict[str, tuple[float, float]] = {
    "step": (0, 2**31 - 1), "layer": (0, 100_000), "kv_head": (0, 100_000), "batch_size": (0, 10**7),
    "tokens": (0, 2**40), "bytes": (0, PiB), "kv_device_bytes": (0, PiB), "kv_host_bytes": (0, PiB),
    "aux_device_bytes": (0, PiB), "mem_allocated_bytes": (0, PiB), "mem_reserved_bytes": (0, PiB),
    "mem_peak_allocated_bytes": (0, PiB), "mem_peak_reserved_bytes": (0, PiB), "nvml_used_bytes": (0, PiB),
}
# ext keys by the unit their name ends with -> range
EXT_RANGES = {"_bytes": (0, PiB), "_ns": (0, WEEK_NS), "_tokens": (0, 2**40)}


def validate_trace(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the trace at `path`; no problems means valid. A truncated
    trace, or one whose footer is damaged, is a problem: other Arrow readers cannot open it."""
    try:
        trace = read_trace(path)
    except TraceError as exc:
        return [str(exc)], []
    problems = check_table(trace.table)
    if not trace.run:
        problems.append("no run metadata (kvprof:run)")
    if trace.damage:
        problems.append(trace.damage)
    warnings = [warning for warning in trace.warnings if warning != trace.damage]
    if trace.schema_version == "1.0":
        warnings.append(f"{path}: schema 1.0 keeps no checksums: bytes changed on disk cannot be detected, "
                        "only values out of range")
    return problems, warnings


def check_table(table: pa.Table) -> list[str]:
    problems = []
    for name, (dtype, _) in COLUMNS.items():
        if name not in table.column_names:
            problems.append(f"missing column {name}")
        elif not table.schema.field(name).type.equals(dtype):
            problems.append(f"column {name} is {table.schema.field(name).type}, schema says {dtype}")
    extra = set(table.column_names) - set(COLUMNS)
    if extra:
        problems.append(f"columns not in the schema: {', '.join(sorted(extra))}")
    if problems or table.num_rows == 0:
        return problems or ["no events"]
    for name in REQUIRED:
        if table[name].null_count:
            problems.append(f"{table[name].null_count} events without {name}")
    kinds = set(pc.unique(table["kind"].cast(pa.string())).to_pylist())
    unknown = kinds - {k.value for k in Kind}
    if unknown:
        problems.append(f"unknown event kinds: {', '.join(sorted(str(k) for k in unknown))}")
    seq = table["seq"].to_numpy()
    if (seq[1:] <= seq[:-1]).any():
        problems.append("seq is not strictly increasing")
    start, end = table["start_ns"].to_numpy(), table["end_ns"].to_numpy()
    if (end < start).any():
        problems.append(f"{int((end < start).sum())} events end before they start")
    return problems + out_of_range(table)


def out_of_range(table: pa.Table) -> list[str]:
    """Values no real run records: negative counts, petabytes, events longer than a week."""
    problems = []
    for column, (low, high) in PHYSICAL_RANGES.items():
        values = table[column]
        if values.null_count == len(values):
            continue
        lowest, highest = pc.min_max(values).values()
        if lowest.as_py() < low or highest.as_py() > high:
            problems.append(f"{column} out of physical range [{low:g}, {high:g}]: "
                            f"{lowest.as_py()} to {highest.as_py()}")
    durations = pc.subtract(table["end_ns"], table["start_ns"])
    if len(durations) and pc.max(durations).as_py() > WEEK_NS:
        problems.append(f"an event lasts longer than a week ({pc.max(durations).as_py()} ns)")
    return problems + _ext_out_of_range(table["ext"])


def _ext_out_of_range(ext: pa.ChunkedArray) -> list[str]:
    keys = pa.chunked_array([chunk.keys for chunk in ext.chunks], pa.string())
    values = pa.chunked_array([chunk.items for chunk in ext.chunks], pa.float64())
    problems = []
    if pc.any(pc.is_inf(values)).as_py():
        problems.append("ext holds infinite values")
    for key in pc.unique(keys).to_pylist():
        for suffix, (low, high) in EXT_RANGES.items():
            if key is None or not key.endswith(suffix):
                continue
            lowest, highest = pc.min_max(values.filter(pc.equal(keys, key))).values()
            if lowest.is_valid and (lowest.as_py() < low or highest.as_py() > high):
                problems.append(f"ext {key} out of physical range [{low:g}, {high:g}]: "
                                f"{lowest.as_py():g} to {highest.as_py():g}")
    return problems
