"""Reading kvprof traces, with the checks that make a bad file one clear message."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kvprof.strategy import UsageError
from kvprof.trace.schema import META_RUN, META_VERSION, SCHEMA_VERSION

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class TraceError(UsageError):
    """A trace that cannot be read: missing, empty, corrupt, not kvprof, or too new."""


@dataclass
class Trace:
    """A trace in memory: its events as an Arrow table and its run metadata."""

    path: Path
    table: pa.Table
    run: dict[str, Any]
    schema_version: str
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> pa.Table:
        """The events of one kind (a value of kvprof.events.Kind)."""
        return self.table.filter(kind_mask(self.table["kind"], kind))

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
    with `truncated` set and a warning saying so."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file")
    if path.is_dir():
        raise TraceError(f"{path}: is a folder, not a trace file")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: empty file (the run wrote nothing)")
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceError(f"{path}: not an Arrow IPC stream ({exc})") from None
    metadata = reader.schema.metadata or {}
    if META_VERSION not in metadata:
        raise TraceError(f"{path}: an Arrow stream, but not a kvprof trace (no {META_VERSION.decode()})")
    version = metadata[META_VERSION].decode()
    check_version(version, path)
    batches, broken = [], None
    while True:
        try:
            batches.append(reader.read_next_batch())
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError) as exc:
            broken = str(exc)
            break
    table = pa.Table.from_batches(batches, schema=reader.schema)
    run = json.loads(metadata[META_RUN]) if META_RUN in metadata else {}
    trace = Trace(path, table, run, version)
    ended = _ends_with_eos(path)
    if broken or not ended:
        trace.truncated = True
        trace.warnings.append(
            f"{path}: trace is truncated (the run did not finish writing it); "
            f"{table.num_rows} events in complete batches were read"
        )
    elif (ends := trace.of_kind("run_end")["ext"].to_pylist()) and dict(ends[-1] or ()).get("failed"):
        trace.warnings.append(f"{path}: the run failed before finishing; events up to the failure are kept")
    return trace


def _ends_with_eos(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - len(_EOS)))
        return handle.read() == _EOS
