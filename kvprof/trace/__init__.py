"""Arrow traces: the schema, the streaming writer and the reader."""

from kvprof.trace.reader import Trace, TraceError, read_trace
from kvprof.trace.schema import SCHEMA_VERSION, arrow_schema
from kvprof.trace.writer import ArrowTraceWriter

__all__ = ["ArrowTraceWriter", "SCHEMA_VERSION", "Trace", "TraceError", "arrow_schema", "read_trace"]
