"""Checking a trace against the published schema and the event rules."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc

from kvprof.events import Kind
from kvprof.trace.reader import TraceError, read_trace
from kvprof.trace.schema import COLUMNS, REQUIRED


def validate_trace(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the trace at `path`; no problems means valid."""
    try:
        trace = read_trace(path)
    except TraceError as exc:
        return [str(exc)], []
    problems = check_table(trace.table)
    if not trace.run:
        problems.append("no run metadata (kvprof:run)")
    return problems, trace.warnings


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
        problems.append(f"unknown event kinds: {', '.join(sorted(unknown))}")
    seq = table["seq"].to_numpy()
    if (seq[1:] <= seq[:-1]).any():
        problems.append("seq is not strictly increasing")
    start, end = table["start_ns"].to_numpy(), table["end_ns"].to_numpy()
    if (end < start).any():
        problems.append(f"{int((end < start).sum())} events end before they start")
    for column in ("tokens", "bytes", "kv_device_bytes", "kv_host_bytes"):
        if pc.any(pc.less(table[column], 0)).as_py():
            problems.append(f"negative values in {column}")
    return problems
