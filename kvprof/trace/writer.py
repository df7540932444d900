"""The Arrow trace writer: a sink that streams events to an Arrow IPC stream file.

Events are buffered and written as record batches every `batch_rows` events or `flush_s`
seconds, whichever comes first, so memory stays bounded and a run that is killed leaves a
readable prefix: at most the batch in progress is lost. `run_end` writes the last batch and
the stream's end-of-stream marker, which is how a reader tells a finished trace from a cut one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from kvprof.events import FIELDS, Event
from kvprof.hookspecs import hookimpl
from kvprof.trace.schema import COLUMNS, arrow_schema


class ArrowTraceWriter:
    """Writes every event of one run to `path`."""

    def __init__(self, path: str | os.PathLike, run_metadata: dict[str, Any],
                 batch_rows: int = 8192, flush_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = arrow_schema(run_metadata)
        self.batch_rows = batch_rows
        self.flush_ns = int(flush_s * 1e9)
        self._buffer: list[Event] = []
        self._file = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._file, self.schema)
        self._last_flush_ns = time.monotonic_ns()
        self.rows_written = 0

    def add(self, event: Event) -> None:
        self._buffer.append(event)
        if len(self._buffer) >= self.batch_rows or event.end_ns - self._last_flush_ns > self.flush_ns:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._writer.write_batch(self._to_batch(self._buffer))
            self._file.flush()
            self.rows_written += len(self._buffer)
            self._buffer = []
        self._last_flush_ns = time.monotonic_ns()

    def close(self) -> None:
        self.flush()
        self._writer.close()  # writes the end-of-stream marker
        self._file.close()

    def _to_batch(self, events: list[Event]) -> pa.RecordBatch:
        arrays = []
        for name in FIELDS:
            dtype = COLUMNS[name][0]
            values = [getattr(e, name) for e in events]
            if name == "kind":
                values = [v.value for v in values]
            elif name == "ext":
                values = [None if v is None else list(v.items()) for v in values]
            if pa.types.is_dictionary(dtype):
                arrays.append(pa.array(values, pa.string()).dictionary_encode())
            else:
                arrays.append(pa.array(values, dtype))
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
    def kvprof_run_end(self, event: Event) -> None:
        self.add(event)
        self.close()
