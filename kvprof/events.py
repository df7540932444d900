"""The event records kvprof traces are made of, and their units.

One `Event` per thing that happened. Every event has a kind, a sequence number and start/end
timestamps in nanoseconds of the host monotonic clock (`kvprof.clock`); a point event has
start_ns == end_ns. The other fields are filled where they apply and are None elsewhere.
Each field's unit is in its name (`_ns`, `_bytes`) or is a count (tokens, positions, layers).

The Arrow column list lives in `kvprof.trace.schema`, one column per field of `FIELDS` below in
the same order (the schema module checks it), and is published in `schemas/`. Field names
follow existing vocabularies where one exists: vLLM's KV events (`block_hashes`, `medium`) and
OpenTelemetry's gen_ai conventions (request ids).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum


class Kind(str, Enum):
    """What an event records. The value is what the trace stores in its `kind` column."""

    RUN_START = "run_start"      # the run began; its metadata is in the trace's schema metadata
    PREFILL = "prefill"          # one request's prompt was processed (start to first token ready)
    DECODE_STEP = "decode_step"  # one engine step that produced a token for each running request
    EVICT = "evict"              # KV entries dropped from a tier (not moved elsewhere)
    OFFLOAD = "offload"          # KV entries copied between tiers (device->host store, host->device fetch)
    PHASE = "phase"              # a timed span of strategy work on the critical path of a step
    SAMPLE = "sample"            # memory and device telemetry at a moment
    REQUEST_END = "request_end"  # a request finished; start_ns is its arrival, end_ns its last token
    RUN_END = "run_end"          # the run ended (normally or not); ext carries the profiler's own cost


class Medium(str, Enum):
    """Where KV bytes live. vLLM's `medium` "GPU" is DEVICE and "CPU" is HOST.

    On a CPU-only run the compute device is the CPU: DEVICE then means "the working set the
    model attends over" and HOST "the offloaded store", which keeps traces comparable.
    """

    DEVICE = "device"
    HOST = "host"


class Phase(str, Enum):
    """Names of critical-path spans (PHASE events). Plugins may use other names too."""

    SPECULATION = "speculation"      # choosing which KV to fetch (InfiniGen)
    KV_TRANSFER = "kv_transfer"      # waiting for a KV copy that was not hidden behind compute
    EVICTION = "eviction"            # scoring and evicting (H2O bookkeeping)
    SYNC_STALL = "sync_stall"        # host waiting on the device for reasons other than the above


@dataclass(slots=True)
class Event:
    """One trace record. See the module docstring for conventions."""

    kind: Kind
    start_ns: int
    end_ns: int
    seq: int = -1                          # set by the profiler: order of emission in the run
    run_id: str | None = None              # set by the profiler: the run (RunInfo.run_id)
    request_id: str | None = None          # the workload's request id (vLLM's request_id)
    step: int | None = None                # decode step index, 0 = first step after prefill
    layer: int | None = None               # transformer layer index
    kv_head: int | None = None             # KV head, only at detail="head"
    batch_size: int | None = None          # requests in the step
    tokens: int | None = None              # tokens processed (prefill, step), moved or evicted
    bytes: int | None = None               # bytes moved (offload) or freed (evict)
    positions: list[list[int]] | None = None  # token positions, one list per KV head (or one list)
    block_hashes: list[int] | None = None  # vLLM block hashes (prefix-cache evictions)
    src_medium: str | None = None          # Medium the bytes came from (evict: where they were)
    dst_medium: str | None = None          # Medium they went to (None for evict)
    reason: str | None = None              # evict: "h2o", "preempt_recompute", "prefix_cache", ...
    phase: str | None = None               # PHASE events: a Phase value or a plugin's own name
    kv_device_bytes: int | None = None     # KV bytes resident on the device after the event
    kv_host_bytes: int | None = None       # KV bytes resident on the host after the event
    aux_device_bytes: int | None = None    # strategy structures on the device (partial keys, scores)
    mem_allocated_bytes: int | None = None       # torch allocator: allocated now
    mem_reserved_bytes: int | None = None        # torch allocator: reserved now
    mem_peak_allocated_bytes: int | None = None  # torch allocator: peak allocated since last sample
    mem_peak_reserved_bytes: int | None = None   # torch allocator: peak reserved since last sample
    nvml_used_bytes: int | None = None     # NVML: device memory used by all processes
    text: str | None = None                # REQUEST_END: the generated text
    ext: dict[str, float] | None = None    # plugin detail, numeric; units in the key names

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Event))
