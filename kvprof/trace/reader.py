"""Reading kvprof traces, with the checks that make a bad file one clear message.

A trace is read as an Arrow IPC stream: a 1.1 trace is an IPC file, whose body (from byte 8)
is a stream, so a killed run's file without its footer reads the same way. Every record batch
is checked in full (offsets, dictionary indices: bad ones would crash the process later) and,
from 1.1 on, against its CRC32; the metadata against its own. A file that stops early is
*truncated* (its complete batches are read, with a warning); a byte that changed is *corrupt*
(TraceError): numbers from it are never returned. Parquet exports read back as traces too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kvprof.errors import TraceError
from kvprof.trace.schema import (
    COLUMNS,
    DICTIONARY_COLUMNS,
    META_BATCH_CRC,
    META_CRC,
    META_RUN,
    META_VERSION,
    SCHEMA_VERSION,
    batch_checksum,
    schema_checksum,
    stored_type,
)

ARROW_MAGIC = b"ARROW1"
PARQUET_MAGIC = b"PAR1"
CONTINUATION = b"\xff\xff\xff\xff"  # what every IPC message starts with
# What pyarrow raises on bytes it cannot make sense of.
ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, KeyError, IndexError)


@dataclass
class Trace:
    """A trace in memory: its events as an Arrow table and its run metadata.

    `table` holds the string columns dictionary-encoded whatever the version on disk.
    `footer` is "ok", "missing" (truncated) or "damaged" for IPC files, "n/a" otherwise.
    """

    path: Path
    table: pa.Table
    run: dict[str, Any]
    schema_version: str
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)
    file_format: str = "arrow-file"     # "arrow-file" | "arrow-stream" | "parquet"
    footer: str = "n/a"
    damage: str | None = None           # why the file is not whole (truncated, footer damaged); also a warning
    run_failed: bool = False            # its run_end says the run failed or was interrupted

    def note_damage(self, message: str) -> None:
        self.damage = message
        self.warnings.append(message)

    def of_kind(self, kind: str) -> pa.Table:
        """The events of one kind (a value of kvprof.events.Kind)."""
        return self.table.filter(kind_mask(self.table["kind"], kind))

    def stored_table(self) -> pa.Table:
        """The table with the column types its schema version stores (1.1: plain strings)."""
        table = self.table
        for name in DICTIONARY_COLUMNS:
            dtype = stored_type(name, self.schema_version)
            index = table.schema.get_field_index(name)
            if not table.schema.field(index).type.equals(dtype):
                table = table.set_column(index, table.schema.field(index).with_type(dtype),
                                         table[name].cast(dtype))
        return table

    def __len__(self) -> int:
        return self.table.num_rows


def kind_mask(kinds: pa.ChunkedArray, kind: str) -> pa.ChunkedArray:
    """Where `kinds` (the dictionary-encoded kind column) equals `kind`. Compares each chunk's
    dictionary indices, so a trace of millions of events is not decoded to strings."""
    masks = []
    for chunk in kinds.chunks:
        index = chunk.dictionary.index(kind).as_py()
        masks.append(pc.equal(chunk.indices, index) if index >= 0 else pa.repeat(False, len(chunk)))
    return pa.chunked_array(masks, pa.bool_())


def check_version(version: str, path: Path) -> None:
    if not re.fullmatch(r"\d{1,4}\.\d{1,4}", version):
        raise TraceError(f"{path}: trace schema version {version!r} is not MAJOR.MINOR (corrupt metadata?)")
    major, minor = (int(part) for part in version.split("."))
    own_major, own_minor = (int(part) for part in SCHEMA_VERSION.split("."))
    if major != own_major or minor > own_minor:
        raise TraceError(
            f"{path}: trace schema {version} is newer than this kvprof reads ({SCHEMA_VERSION}); upgrade kvprof"
            if (major, minor) > (own_major, own_minor)
            else f"{path}: trace schema {version} is older than this kvprof reads ({SCHEMA_VERSION})"
        )


def read_trace(path: str | os.PathLike) -> Trace:
    """Read a whole trace. A cut-off trace (killed run) reads as its complete batches,
    with `truncated` set and a warning saying so; a corrupt one raises TraceError."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    if path.is_dir():
        raise TraceError(f"{path}: is a folder, not a trace file")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: empty file (the run wrote nothing)")
    data = pa.memory_map(str(path)).read_buffer()
    head = data.slice(0, min(8, data.size)).to_pybytes()
    if head.startswith(PARQUET_MAGIC):
        trace = _read_parquet(path)
    elif head.startswith(ARROW_MAGIC):
        trace = _read_ipc_file(path, data)
    else:
        trace = _read_ipc_stream(path, data, "arrow-stream")
    _add_run_warnings(trace)
    return trace


# --- formats ------------------------------------------------------------------------------


@dataclass
class _Stream:
    schema: pa.Schema
    version: str
    run: dict[str, Any]
    batches: list[pa.RecordBatch]
    ended: bool          # the end-of-stream marker was read


def _read_ipc_file(path: Path, data: pa.Buffer) -> Trace:
    if data.size <= 8:
        raise TraceError(f"{path}: truncated inside its header (the run stopped before writing any event)")
    stream = _read_stream(path, data.slice(8))
    trace = _trace(path, stream, "arrow-file")
    trace.footer = _footer_state(data, len(stream.batches))
    if not stream.ended or trace.footer == "missing":
        _mark_truncated(trace)
    elif trace.footer == "damaged":
        trace.note_damage(f"{path}: the file's footer is damaged, so other Arrow file readers cannot open it; "
                          "kvprof read and checked every record batch from the stream")
    return trace


def _read_ipc_stream(path: Path, data: pa.Buffer, file_format: str) -> Trace:
    stream = _read_stream(path, data)
    trace = _trace(path, stream, file_format)
    if not stream.ended:
        _mark_truncated(trace)
    return trace


def _read_parquet(path: Path) -> Trace:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: unreadable Parquet file ({_one_line(exc)})") from None
    table = _unrenamed(table)
    version, run = _check_metadata(path, table.schema)
    try:
        table.validate(full=True)
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: corrupt Parquet data ({_one_line(exc)})") from None
    return Trace(path, _in_memory(table), run, version, file_format="parquet")


def _unrenamed(table: pa.Table) -> pa.Table:
    """The nested columns with the field names Arrow gives them (Parquet names list items
    "element" and a map's entries after the column)."""
    for name in ("positions", "block_hashes", "ext"):
        index = table.schema.get_field_index(name)
        dtype = COLUMNS[name][0]
        if index >= 0 and str(table.schema.field(index).type) != str(dtype):
            try:
                table = table.set_column(index, table.schema.field(index).with_type(dtype), table[name].cast(dtype))
            except ARROW_ERRORS:
                continue  # left for the column check to name
    return table


def _read_stream(path: Path, body: pa.Buffer) -> _Stream:
    source = pa.BufferReader(body)
    try:
        reader = pa.ipc.open_stream(source)
    except ARROW_ERRORS as exc:
        framed = body.slice(0, min(4, body.size)).to_pybytes() == CONTINUATION  # it did start as an IPC stream
        if framed and source.tell() >= body.size:
            raise TraceError(f"{path}: truncated inside its header (the run stopped before writing any "
                             "event)") from None
        raise TraceError(f"{path}: not an Arrow IPC file or stream, nor Parquet ({_one_line(exc)})") from None
    version, run = _check_metadata(path, reader.schema)
    batches: list[pa.RecordBatch] = []
    while True:
        try:
            batch, custom = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            return _Stream(reader.schema, version, run, batches, ended=True)
        except ARROW_ERRORS as exc:
            if source.tell() >= body.size:  # the bytes ran out: the run stopped writing here
                return _Stream(reader.schema, version, run, batches, ended=False)
            raise TraceError(f"{path}: corrupt: record batch {len(batches)} cannot be decoded "
                             f"({_one_line(exc)})") from None
        _check_batch(path, batch, custom, version, len(batches))
        batches.append(batch)


def _trace(path: Path, stream: _Stream, file_format: str) -> Trace:
    table = pa.Table.from_batches(stream.batches, schema=stream.schema)
    return Trace(path, _in_memory(table), stream.run, stream.version, file_format=file_format)


# --- checks -------------------------------------------------------------------------------


def _check_metadata(path: Path, schema: pa.Schema) -> tuple[str, dict[str, Any]]:
    """The schema version and the run, after checking them and the columns."""
    try:
        return _checked_metadata(path, schema)
    except UnicodeDecodeError:  # pyarrow decodes column names as it hands them out
        raise TraceError(f"{path}: corrupt: the schema holds names that are not UTF-8") from None


def _checked_metadata(path: Path, schema: pa.Schema) -> tuple[str, dict[str, Any]]:
    metadata = schema.metadata or {}
    if META_VERSION not in metadata:
        raise TraceError(f"{path}: an Arrow file, but not a kvprof trace (no {META_VERSION.decode()})")
    version = metadata[META_VERSION].decode(errors="replace")
    check_version(version, path)
    run_json = metadata.get(META_RUN)
    if version != "1.0":
        expected = metadata.get(META_CRC, b"").decode(errors="replace")
        if run_json is None or expected != f"{schema_checksum(schema, run_json):08x}":
            raise TraceError(f"{path}: corrupt: the schema or run metadata does not match its checksum")
    _check_columns(path, schema, version)
    return version, _parse_run(path, run_json)


def _parse_run(path: Path, run_json: bytes | None) -> dict[str, Any]:
    if run_json is None:
        return {}
    try:
        run = json.loads(run_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: corrupt: the run metadata ({META_RUN.decode()}) is not JSON ({exc})") from None
    if not isinstance(run, dict):
        raise TraceError(f"{path}: corrupt: the run metadata ({META_RUN.decode()}) is not a JSON object")
    if "plugin" in run and "strategy" not in run:  # written before kvprof named it `strategy`
        run["strategy"] = run.pop("plugin")
    return run


def _check_columns(path: Path, schema: pa.Schema, version: str) -> None:
    """Every column of the schema, once, of its type (a string column may be stored either way)."""
    problems = []
    for name in COLUMNS:
        indices = schema.get_all_field_indices(name)
        if len(indices) != 1:
            problems.append(f"missing column {name}" if not indices else f"column {name} appears {len(indices)} times")
            continue
        dtype = schema.field(indices[0]).type
        allowed = {str(stored_type(name, "1.0")), str(stored_type(name, version))}
        if str(dtype) not in allowed:
            problems.append(f"column {name} is {dtype}, the schema says {stored_type(name, version)}")
    if problems:
        raise TraceError(f"{path}: not a readable kvprof {version} trace: {'; '.join(problems)}")


def _check_batch(path: Path, batch: pa.RecordBatch, custom: Any, version: str, index: int) -> None:
    """Full validation (bad offsets or dictionary indices would crash later), then the CRC."""
    try:
        batch.validate(full=True)
    except ARROW_ERRORS as exc:
        raise TraceError(f"{path}: corrupt: record batch {index} is inconsistent ({_one_line(exc)})") from None
    if version == "1.0":
        return
    expected = (custom or {}).get(META_BATCH_CRC.encode(), b"").decode(errors="replace")
    if expected != f"{batch_checksum(batch):08x}":
        raise TraceError(f"{path}: corrupt: record batch {index} does not match its checksum "
                         "(bytes changed after it was written)")


def _footer_state(data: pa.Buffer, batches: int) -> str:
    """"ok" when the IPC file footer lists the batches read, "missing" when the file does not
    end in one (a killed run), "damaged" otherwise."""
    if data.size < 16 or data.slice(data.size - len(ARROW_MAGIC)).to_pybytes() != ARROW_MAGIC:
        return "missing"
    try:
        return "ok" if pa.ipc.open_file(data).num_record_batches == batches else "damaged"
    except ARROW_ERRORS:
        return "damaged"


def _mark_truncated(trace: Trace) -> None:
    trace.truncated = True
    trace.note_damage(
        f"{trace.path}: trace is truncated (the run did not finish writing it); "
        f"{trace.table.num_rows} events in complete batches were read"
    )


def _add_run_warnings(trace: Trace) -> None:
    if trace.truncated:
        return
    ends = trace.of_kind("run_end")["ext"].to_pylist()
    if ends and dict(ends[-1] or ()).get("failed"):
        trace.run_failed = True
        trace.warnings.append(f"{trace.path}: the run failed before finishing; events up to the failure are kept")


def _in_memory(table: pa.Table) -> pa.Table:
    """The string columns dictionary-encoded, as the analyses expect (1.0 stored them so)."""
    for name in DICTIONARY_COLUMNS:
        index = table.schema.get_field_index(name)
        column = table.column(index)
        if pa.types.is_dictionary(column.type):
            continue
        dtype = COLUMNS[name][0]
        encoded = pa.chunked_array([pc.dictionary_encode(chunk) for chunk in column.chunks], dtype)
        table = table.set_column(index, table.schema.field(index).with_type(dtype), encoded)
    return table


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
