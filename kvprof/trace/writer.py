"""The Arrow trace writer: a sink that writes a run's events to an Arrow IPC file as the run goes.

Events are buffered and written as record batches every `batch_rows` events or `flush_s`
seconds, whichever comes first, so memory stays bounded and a run that is killed leaves a
readable prefix: at most the batches being written are lost (a few: they are written on a
thread of their own, off the run's critical path; an `EventBatch` is also turned into Arrow
there, so the run's thread only hands it over). Each batch carries its CRC32. An
`EventBatch` arrives as columns and stays columns (no Python object per event).

The file is `<name>.partial.arrow` while the run goes. `run_end` writes the last batch and the
footer; a run that finished is then renamed to `<name>.arrow` in one step (an existing trace
there is replaced only then), one that failed or was interrupted keeps its `.partial` name.
A write that fails (disk full) stops the writer and raises TraceWriteError naming the file.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvprof.errors import TraceWriteError
from kvprof.events import FIELDS, Event, EventBatch, Positions
from kvprof.hookspecs import hookimpl
from kvprof.trace.schema import META_BATCH_CRC, arrow_schema, batch_checksum

MAX_PENDING_BYTES = 1 << 29  # parts waiting to be written, at most (one larger part is always taken)


def partial_path(path: str | os.PathLike) -> Path:
    """Where the trace for `path` is written until its run finishes: `<name>.partial<suffix>`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class PendingParts:
    """Parts handed to the writing thread and not yet written, bounded by their bytes, not their
    number. An H2O prefill cut (100 MB at batch 16) is followed by small step batches every few
    milliseconds; a bound of 4 parts made the run's thread wait behind the cut (~1 s on a 2-core
    CPU), counted as kvprof's cost. A part is always taken when nothing waits, however large."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: deque[tuple[Any, int]] = deque()
        self._bytes = 0  # of the parts handed over and not yet written
        self._unwritten = 0
        self._changed = threading.Condition()

    def put(self, parts: Any, size: int) -> None:
        with self._changed:
            while self._unwritten and self._bytes + size > self.max_bytes:
                self._changed.wait()
            self._parts.append((parts, size))
            self._bytes += size
            self._unwritten += 1
            self._changed.notify_all()

    def get(self) -> tuple[Any, int]:
        with self._changed:
            while not self._parts:
                self._changed.wait()
            return self._parts.popleft()

    def written(self, size: int) -> None:
        with self._changed:
            self._bytes -= size
            self._unwritten -= 1
            self._changed.notify_all()

    def join(self) -> None:
        """Return once every part put so far is written."""
        with self._changed:
            while self._unwritten:
                self._changed.wait()


def part_bytes(part: pa.RecordBatch | EventBatch) -> int:
    """About what a part holds in memory: a record batch's buffers; for an EventBatch its
    positions and ~64 bytes per event for the other columns."""
    if isinstance(part, pa.RecordBatch):
        return part.nbytes
    held = 64 * len(part)
    if part.positions is not None:
        held += part.positions.values.nbytes + part.positions.list_offsets.nbytes
    return held


class ArrowTraceWriter:
    """Writes every event of one run to `path` (via its partial path)."""

    def __init__(self, path: str | os.PathLike, run_metadata: dict[str, Any],
                 batch_rows: int = 8192, flush_s: float = 1.0) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.schema = arrow_schema(run_metadata)
        self.batch_rows = batch_rows
        self.flush_ns = int(flush_s * 1e9)
        self._buffer: list[Event | EventBatch] = []  # in seq order
        self._buffered_rows = 0
        self._last_flush_ns = time.monotonic_ns()
        self.rows_written = 0
        self.closed = False
        self.finished = False   # closed and renamed to `path`
        self._failure: BaseException | None = None  # a write that failed on the writing thread
        pa.array([{"warm": 1}])  # pyarrow imports pandas on its first conversion: here, not inside a hook
        with self._reporting_errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = pa.OSFile(str(self.partial), "wb")
            self._writer = pa.ipc.new_file(self._file, self.schema)
        # Checksumming and writing a batch (100 MB for an H2O prefill cut at batch 16) happen on a
        # thread of their own, so the run's thread goes on queuing device work; what waits there
        # is bounded by its bytes (past `MAX_PENDING_BYTES`, `flush` waits).
        self._pending: PendingParts | None = PendingParts(MAX_PENDING_BYTES)
        self._thread = threading.Thread(target=self._write_pending, name="kvprof-trace-writer", daemon=True)
        self._thread.start()

    @property
    def written_path(self) -> Path:
        """Where the events are now: `path` once the run finished, the partial file before."""
        return self.path if self.finished else self.partial

    def add(self, event: Event | EventBatch) -> None:
        if self.closed:
            self._raise_failure()
            return
        self._buffer.append(event)
        self._buffered_rows += len(event) if isinstance(event, EventBatch) else 1
        if self._buffered_rows >= self.batch_rows or event.end_ns - self._last_flush_ns > self.flush_ns:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered events over to be written (see `wait`): single events as a record
        batch made here, `EventBatch`es as they are (the writing thread turns them into one)."""
        self._raise_failure()
        if self._buffer and not self.closed:
            parts = self._parts(self._buffer)
            self.rows_written += self._buffered_rows
            self._buffer, self._buffered_rows = [], 0
            assert self._pending is not None  # there until close(), and a closed writer takes nothing
            self._pending.put(parts, sum(part_bytes(part) for part in parts))
        self._last_flush_ns = time.monotonic_ns()

    def wait(self) -> None:
        """Return once every flushed batch is on disk (for readers of a live trace)."""
        if self._pending is not None:
            self._pending.join()
        self._raise_failure()

    def close(self, finished: bool = True) -> None:
        """Write the last batch and the footer; if the run `finished`, move the file to `path`."""
        if not self.closed:
            self.flush()
        if self._pending is not None:
            self._pending.put(None, 0)
            self._thread.join()
            self._pending = None
        self._raise_failure()
        if self.closed:
            return
        with self._reporting_errors():
            self._writer.close()  # the end-of-stream marker and the footer
            self._file.close()
            self.closed = True
            if finished:
                publish(self.partial, self.path)
                self.finished = True

    def _write(self, parts: list[pa.RecordBatch | EventBatch]) -> None:
        """Each part as one record batch, in order, each with its checksum."""
        for part in parts:
            batch = part if isinstance(part, pa.RecordBatch) else self._columns_to_batch(part)
            with self._reporting_errors():
                self._writer.write_batch(batch, custom_metadata={META_BATCH_CRC: f"{batch_checksum(batch):08x}"})
        with self._reporting_errors():
            self._file.flush()

    def _write_pending(self) -> None:
        """The writing thread: batches in order until None; after a failure it only drains."""
        pending = self._pending
        assert pending is not None
        while True:
            parts, size = pending.get()
            try:
                if parts is None:
                    return
                if self._failure is None:
                    self._write(parts)
            except BaseException as failure:  # noqa: BLE001 - raised on the run's thread by the next call
                self._failure = failure
            finally:
                pending.written(size)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    @contextmanager
    def _reporting_errors(self) -> Iterator[None]:
        """An OS error while writing abandons the writer and becomes a TraceWriteError."""
        try:
            yield
        except TraceWriteError:
            raise
        except OSError as error:
            self._abandon()
            where = (f"the events written so far are in {self.partial}" if self.partial.exists()
                     else "no trace was kept")
            raise TraceWriteError(f"writing the trace failed: {error}; {where}") from error

    def _abandon(self) -> None:
        """After a failed write: stop writing, release the file, keep what reached the disk."""
        self.closed = True
        self._buffer, self._buffered_rows = [], 0
        file = getattr(self, "_file", None)
        try:
            if file is not None:
                file.close()
        except OSError:
            pass

    def _parts(self, buffered: list[Event | EventBatch]) -> list[pa.RecordBatch | EventBatch]:
        """The buffered events in order: each run of single events as one record batch (events
        may be mutable objects of the strategy's, so they are read now), each EventBatch as is."""
        parts: list[pa.RecordBatch | EventBatch] = []
        run: list[Event] = []
        for item in buffered:
            if isinstance(item, Event):
                run.append(item)
                continue
            if run:
                parts.append(self._events_to_batch(run))
                run = []
            parts.append(item)
        if run:
            parts.append(self._events_to_batch(run))
        return parts

    def _events_to_batch(self, events: list[Event]) -> pa.RecordBatch:
        arrays = []
        for name, column in zip(FIELDS, self.schema):
            values = [getattr(e, name) for e in events]
            if name == "kind":
                values = [v.value for v in values]
            elif name == "ext":
                values = [None if v is None else list(v.items()) for v in values]
            arrays.append(pa.array(values, column.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _columns_to_batch(self, batch: EventBatch) -> pa.RecordBatch:
        rows = len(batch)
        given = {"kind": batch.kind.value, "start_ns": batch.start_ns, "end_ns": batch.end_ns,
                 "run_id": batch.run_id, **batch.shared}
        arrays = []
        for name, column in zip(FIELDS, self.schema):
            if name == "seq":
                arrays.append(pa.array(np.arange(batch.seq, batch.seq + rows), column.type))
            elif name == "positions" and batch.positions is not None:
                arrays.append(_nested_lists(batch.positions, column.type))
            elif name == "ext" and name in batch.columns:
                arrays.append(_ext_column(batch.columns[name], rows, column.type))
            elif name in batch.columns:
                arrays.append(pa.array(batch.columns[name], column.type))
            else:
                value = given.get(name)
                if name == "ext" and value is not None:
                    value = list(value.items())
                arrays.append(pa.nulls(rows, column.type) if value is None else
                              pa.array([value], column.type).take(pa.array(np.zeros(rows, dtype=np.int32))))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    # --- sink hooks --------------------------------------------------------------------

    @hookimpl
    def kvprof_run_start(self, event: Event) -> None:
        self.add(event)
        self.flush()  # the header and first record reach the disk at once

    @hookimpl
    def kvprof_prefill(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_decode_step(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_evict(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_offload(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_phase(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_sample(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_request_end(self, event: Event) -> None:
        self.add(event)

    @hookimpl
    def kvprof_event_batch(self, batch: EventBatch) -> None:
        self.add(batch)

    @hookimpl
    def kvprof_run_end(self, event: Event, error: BaseException | None) -> None:
        self.add(event)
        self.close(finished=error is None)


def _ext_column(columns: dict[str, Any], rows: int, type: pa.DataType) -> pa.Array:
    """{key: one value per event} as a map column: every event has every key."""
    keys = list(columns)
    items = np.stack([np.asarray(columns[key], dtype=np.float64) for key in keys], axis=-1).reshape(-1) \
        if keys else np.zeros(0)
    names = pa.array(keys, pa.string()).take(pa.array(np.tile(np.arange(len(keys), dtype=np.int32), rows)))
    return pa.MapArray.from_arrays(pa.array(np.arange(0, rows * len(keys) + 1, len(keys), dtype=np.int32)),
                                   names, pa.array(items, pa.float64())).cast(type)


def _nested_lists(positions: Positions, type: pa.DataType) -> pa.Array:
    """`positions` as list<list<int32>>, from its offsets, without a Python int per position."""
    inner = pa.ListArray.from_arrays(pa.array(positions.list_offsets, pa.int32()),
                                     pa.array(positions.values, pa.int32()))
    return pa.ListArray.from_arrays(pa.array(positions.event_offsets, pa.int32()), inner).cast(type)


def publish(partial: Path, path: Path) -> None:
    """Move a finished file to its name in one step, its bytes on disk first (fsync), so the
    name never shows a half-written file and a file already there is replaced only now."""
    descriptor = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(partial, path)


@contextmanager
def replaced_on_success(path: str | os.PathLike) -> Iterator[Path]:
    """The partial path to write `path`'s content to: published as `path` if the block
    succeeds, removed if it fails (an export never leaves half a file, nor destroys one)."""
    path = Path(path)
    partial = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
        publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
