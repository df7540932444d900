"""The trace schema: Arrow columns, their units, and the metadata keys.

This module is the definition; `schemas/kvprof-trace-<version>.json` is the published copy
(`python -m kvprof.trace.schema > schemas/...` regenerates it, and a test keeps the two equal).

Versioning: MAJOR.MINOR. A reader accepts any trace of its own MAJOR with MINOR <= its own;
new optional columns bump MINOR, anything a reader must understand differently bumps MAJOR.

1.1 (this version): an Arrow IPC *file*, written as the run goes (the body of an IPC file is a
stream, so a killed run still leaves its complete record batches, only the footer is missing);
the string columns are plain strings (the IPC file format cannot grow a dictionary across
batches in a way every reader accepts); every record batch carries a CRC32 in its custom
metadata (META_BATCH_CRC) and the schema one over its fields and the run (META_CRC), so a
changed byte is told apart from a cut file. Readers hold the string columns dictionary-encoded
in memory, as 1.0 wrote them.
1.0: an Arrow IPC stream, string columns dictionary-encoded, no checksums.
"""

from __future__ import annotations

import json
import sys
import zlib

import pyarrow as pa

from kvprof.events import FIELDS, Kind, Medium, Phase

SCHEMA_VERSION = "1.1"
META_VERSION = b"kvprof:schema_version"
META_RUN = b"kvprof:run"
META_CRC = b"kvprof:crc32"          # schema metadata: CRC32 of the fields and the run JSON (1.1)
META_BATCH_CRC = "kvprof:crc32"     # record batch metadata: CRC32 of the batch's IPC encoding (1.1)

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
DICTIONARY_COLUMNS = tuple(name for name, (dtype, _) in COLUMNS.items() if dtype == _dict_str)


def stored_type(name: str, version: str) -> pa.DataType:
    """The column's type on disk: 1.0 wrote the string columns dictionary-encoded, 1.1 plain."""
    dtype = COLUMNS[name][0]
    return pa.string() if name in DICTIONARY_COLUMNS and version != "1.0" else dtype


def arrow_schema(run_metadata: dict | None = None) -> pa.Schema:
    """The schema a trace is written with: its columns, the version and (optionally) the run
    and the checksum over both in its metadata."""
    fields = [
        pa.field(name, stored_type(name, SCHEMA_VERSION), nullable=name not in REQUIRED, metadata={"unit": unit})
        for name, (_, unit) in COLUMNS.items()
    ]
    metadata = {META_VERSION: SCHEMA_VERSION.encode()}
    if run_metadata is not None:
        run = json.dumps(run_metadata, default=str).encode()
        metadata[META_RUN] = run
        metadata[META_CRC] = f"{schema_checksum(pa.schema(fields), run):08x}".encode()
    return pa.schema(fields, metadata=metadata)


def schema_checksum(schema: pa.Schema, run: bytes) -> int:
    """CRC32 of the columns' names and units, then of the run JSON. (Types are checked one by
    one against COLUMNS; their encoding is left out as Parquet renames nested fields.)"""
    columns = [[column.name, (column.metadata or {}).get(b"unit", b"").decode(errors="replace")]
               for column in schema]
    return zlib.crc32(run, zlib.crc32(json.dumps(columns).encode()))


def batch_checksum(batch: pa.RecordBatch) -> int:
    """CRC32 of the batch's IPC encoding (deterministic: a batch read back encodes the same)."""
    return zlib.crc32(batch.serialize())


def published() -> dict:
    """The JSON document published in schemas/."""
    return {
        "name": "kvprof-trace",
        "version": SCHEMA_VERSION,
        "format": "Arrow IPC file (application/vnd.apache.arrow.file), written incrementally: a run "
                  "killed before it finished leaves the file without its footer, readable as a stream from byte 8",
        "metadata": {
            META_VERSION.decode(): "schema version, MAJOR.MINOR",
            META_RUN.decode(): "JSON: the run (command, strategy, plugin_version, model, workload, options, device, "
                               "versions, seed; earlier traces name the strategy `plugin`)",
            META_CRC.decode(): "8 hex digits: CRC32 of the JSON list of [column name, unit], then of the run JSON",
        },
        "record_batch_metadata": {
            META_BATCH_CRC: "8 hex digits: CRC32 of the record batch's IPC encoding (RecordBatch.serialize)",
        },
        "kinds": [k.value for k in Kind],
        "columns": [
            {"name": name, "type": str(stored_type(name, SCHEMA_VERSION)), "nullable": name not in REQUIRED,
             "unit": unit}
            for name, (_, unit) in COLUMNS.items()
        ],
    }


if __name__ == "__main__":
    json.dump(published(), sys.stdout, indent=2)
    sys.stdout.write("\n")
