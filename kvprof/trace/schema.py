"""The trace schema: Arrow columns, their units, and the metadata keys.

This module is the definition; `schemas/kvprof-trace-<version>.json` is the published copy
(`python -m kvprof.trace.schema > schemas/...` regenerates it, and a test keeps the two equal).

Versioning: MAJOR.MINOR. A reader accepts any trace of its own MAJOR with MINOR <= its own;
new optional columns bump MINOR, anything a reader must understand differently bumps MAJOR.
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa

from kvprof.events import FIELDS, Kind, Medium, Phase

SCHEMA_VERSION = "1.0"
META_VERSION = b"kvprof:schema_version"
META_RUN = b"kvprof:run"

_dict_str = pa.dictionary(pa.int32(), pa.string())

# name -> (arrow type, unit or meaning). Order follows kvprof.events.Event.
COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "kind": (_dict_str, "event kind: " + ", ".join(k.value for k in Kind)),
    "start_ns": (pa.int64(), "ns, host monotonic clock"),
    "end_ns": (pa.int64(), "ns, host monotonic clock; == start_ns for point events"),
    "seq": (pa.int64(), "emission order within the run, from 0"),
    "run_id": (_dict_str, "the run; its metadata is kvprof:run"),
    "request_id": (pa.string(), "request id (OpenTelemetry gen_ai / vLLM request_id)"),
    "step": (pa.int32(), "decode step index, 0 = first step after prefill"),
    "layer": (pa.int32(), "transformer layer index"),
    "kv_head": (pa.int32(), "KV head index (detail=head only)"),
    "batch_size": (pa.int32(), "requests in the step"),
    "tokens": (pa.int64(), "token count"),
    "bytes": (pa.int64(), "bytes moved or freed"),
    "positions": (pa.list_(pa.list_(pa.int32())), "token positions, one list per KV head"),
    "block_hashes": (pa.list_(pa.int64()), "vLLM KV block hashes"),
    "src_medium": (_dict_str, "tier: " + ", ".join(m.value for m in Medium)),
    "dst_medium": (_dict_str, "tier: " + ", ".join(m.value for m in Medium)),
    "reason": (_dict_str, "why entries were evicted"),
    "phase": (_dict_str, "critical-path span: " + ", ".join(p.value for p in Phase) + ", or a plugin's"),
    "kv_device_bytes": (pa.int64(), "bytes of KV resident on the device after the event"),
    "kv_host_bytes": (pa.int64(), "bytes of KV resident on the host after the event"),
    "aux_device_bytes": (pa.int64(), "bytes of strategy structures on the device"),
    "mem_allocated_bytes": (pa.int64(), "bytes, torch allocator, allocated"),
    "mem_reserved_bytes": (pa.int64(), "bytes, torch allocator, reserved"),
    "mem_peak_allocated_bytes": (pa.int64(), "bytes, torch allocator, peak allocated since previous sample"),
    "mem_peak_reserved_bytes": (pa.int64(), "bytes, torch allocator, peak reserved since previous sample"),
    "nvml_used_bytes": (pa.int64(), "bytes, NVML device memory used (all processes)"),
    "text": (pa.string(), "generated text (request_end)"),
    "ext": (pa.map_(pa.string(), pa.float64()), "plugin detail; unit in each key's name"),
}

assert tuple(COLUMNS) == FIELDS, "schema columns must follow kvprof.events.Event"

REQUIRED = ("kind", "start_ns", "end_ns", "seq", "run_id")


def arrow_schema(run_metadata: dict | None = None) -> pa.Schema:
    """The Arrow schema, with the version and (optionally) the run in its metadata."""
    fields = [
        pa.field(name, dtype, nullable=name not in REQUIRED, metadata={"unit": unit})
        for name, (dtype, unit) in COLUMNS.items()
    ]
    metadata = {META_VERSION: SCHEMA_VERSION.encode()}
    if run_metadata is not None:
        metadata[META_RUN] = json.dumps(run_metadata, default=str).encode()
    return pa.schema(fields, metadata=metadata)


def published() -> dict:
    """The JSON document published in schemas/."""
    return {
        "name": "kvprof-trace",
        "version": SCHEMA_VERSION,
        "format": "Arrow IPC stream (application/vnd.apache.arrow.stream)",
        "metadata": {
            META_VERSION.decode(): "schema version, MAJOR.MINOR",
            META_RUN.decode(): "JSON: the run (command, plugin, model, workload, options, device, versions, seed)",
        },
        "kinds": [k.value for k in Kind],
        "columns": [
            {"name": name, "type": str(dtype), "nullable": name not in REQUIRED, "unit": unit}
            for name, (dtype, unit) in COLUMNS.items()
        ],
    }


if __name__ == "__main__":
    json.dump(published(), sys.stdout, indent=2)
    sys.stdout.write("\n")
