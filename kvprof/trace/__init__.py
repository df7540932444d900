"""Arrow traces: the schema, the writer and the reader."""

from kvprof.trace.reader import Trace, TraceError, read_trace
from kvprof.trace.schema import SCHEMA_VERSION, arrow_schema
from kvprof.trace.writer import ArrowTraceWriter, TraceWriteError, partial_path, replaced_on_success

__all__ = ["ArrowTraceWriter", "SCHEMA_VERSION", "Trace", "TraceError", "TraceWriteError", "arrow_schema",
           "partial_path", "read_trace", "replaced_on_success"]
