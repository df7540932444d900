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

# No `from __future__ import annotations`: the TypedDicts below need their Required[...] evaluated.
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Annotated, Any, NotRequired, Required, TypedDict, get_args, get_origin, get_type_hints

import numpy as np


class Kind(str, Enum):
    """What an event records. The value is what the trace stores in its `kind` column."""

    RUN_START = "run_start"      # the run began; its metadata is in the trace's schema metadata
    PREFILL = "prefill"          # one request's prompt was processed (start to first token ready)
    DECODE_STEP = "decode_step"  # one engine step that produced a token for each running request
    EVICT = "evict"              # KV entries dropped from a tier (not moved elsewhere)
    OFFLOAD = "offload"          # KV entries copied between tiers (device->host store, host->device fetch)
    PHASE = "phase"              # a timed span of strategy work on the critical path of a step, or
                                 # beside it on another stream when ext overlapped=1
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


@dataclass
class Positions:
    """The `positions` of many events in three flat arrays (Arrow's list<list<int32>> layout).

    Event i's lists are lists[event_offsets[i]:event_offsets[i + 1]], and list j holds
    values[list_offsets[j]:list_offsets[j + 1]]. Building these with numpy costs nothing per
    position, where Python lists cost a boxed int each (an H2O prefill at batch 16 drops 25M).
    """

    values: np.ndarray         # int32, every position of every list, in order
    list_offsets: np.ndarray   # int32, one more than the number of lists
    event_offsets: np.ndarray  # int32, one more than the number of events

    def of(self, event: int) -> list[list[int]]:
        first, last = int(self.event_offsets[event]), int(self.event_offsets[event + 1])
        bounds = self.list_offsets[first:last + 1].tolist()
        return [self.values[a:b].tolist() for a, b in zip(bounds, bounds[1:])]


@dataclass
class EventBatch:
    """Many events of one kind emitted at once (`Profiler.emit_batch`), held in columns.

    For the most numerous events: H2O's evictions of one step at detail "head" are one event
    per layer, request and KV head, thousands per step at batch 16. Every event of the batch
    has `start_ns`, `end_ns` and the `shared` fields; `columns` hold one value per event (a
    list or a 1-D numpy array), except `ext`, which is columns too: {key: one value per event},
    every event having every key; `positions` hold the events' position lists. A sink that implements
    `kvprof_event_batch` takes the batch whole (the trace writer turns it into Arrow columns);
    any other sink gets `events()`, one by one, through its per-kind hook. Sinks may read a
    batch after the hook returned (the trace writer does, on its own thread): a strategy hands
    over fresh arrays and never changes them afterwards.
    """

    kind: Kind
    start_ns: int
    end_ns: int
    columns: dict[str, Any]  # field -> one value per event; "ext" -> {key: one value per event}
    shared: dict[str, Any] = field(default_factory=dict)
    positions: Positions | None = None
    seq: int = -1               # set by the profiler: the seq of the first event
    run_id: str | None = None   # set by the profiler

    def __post_init__(self) -> None:
        lengths = {name: len(column) for name, column in self.columns.items() if name != "ext"}
        ext = self.columns.get("ext")
        lengths |= {f"ext[{key!r}]": len(column) for key, column in (ext or {}).items()}
        if self.positions is not None:
            lengths["positions"] = len(self.positions.event_offsets) - 1
        if len(set(lengths.values())) > 1:
            raise ValueError(f"an EventBatch's columns differ in length: {lengths}")
        self.length = next(iter(lengths.values()), 0)
        both = set(self.columns) & set(self.shared)
        if both:
            raise ValueError(f"fields both shared and per event: {sorted(both)}")

    def __len__(self) -> int:
        return self.length

    def events(self) -> Iterator[Event]:
        """The batch as Event records, in seq order."""
        columns = {name: column.tolist() if isinstance(column, np.ndarray) else column
                   for name, column in self.columns.items() if name != "ext"}
        ext = {key: np.asarray(column, dtype=float).tolist() for key, column in self.columns.get("ext", {}).items()}
        for index in range(self.length):
            values = {name: column[index] for name, column in columns.items()}
            if ext:
                values["ext"] = {key: column[index] for key, column in ext.items()}
            if self.positions is not None:
                values["positions"] = self.positions.of(index)
            yield Event(self.kind, self.start_ns, self.end_ns, seq=self.seq + index, run_id=self.run_id,
                        **self.shared, **values)


# --- the fields of each kind ---------------------------------------------------------------
#
# One table: per kind, the fields a strategy passes to `Profiler.emit_<kind>` (Required ones on
# every event of the kind, the others where they apply), each with what it holds for that kind.
# The `emit_*` signatures are typed with it, the conformance kit checks the Required ones, and
# docs/hooks.md renders it. Every kind may also carry `ext` (numeric detail, units in the keys).

Ext = Annotated[dict[str, float], "numeric detail; the unit in each key's name"]


class PrefillFields(TypedDict, total=False):
    request_id: Required[Annotated[str, "the request"]]
    tokens: Required[Annotated[int, "prompt tokens computed now (one chunk's, when chunked)"]]
    kv_device_bytes: Required[Annotated[int, "KV bytes on the device after it"]]
    batch_size: Annotated[int, "requests prefilled together"]
    kv_host_bytes: Annotated[int, "KV bytes on the host after it"]
    aux_device_bytes: Annotated[int, "strategy structures on the device after it"]
    ext: Ext


class DecodeStepFields(TypedDict, total=False):
    step: Required[Annotated[int, "decode step index, 0 = first step after prefill"]]
    batch_size: Required[Annotated[int, "running requests, one token each"]]
    tokens: Required[Annotated[int, "tokens scheduled in the step"]]
    kv_device_bytes: Required[Annotated[int, "KV bytes on the device after the step, measured"]]
    kv_host_bytes: Annotated[int, "KV bytes on the host after the step"]
    aux_device_bytes: Annotated[int, "strategy structures on the device after the step"]
    ext: Ext


class EvictFields(TypedDict, total=False):
    reason: Required[Annotated[str, "why: the strategy's name, padding, preempt_recompute, prefix_cache, ..."]]
    tokens: Required[Annotated[int, "entries dropped"]]
    bytes: Required[Annotated[int, "bytes freed (0 when only masked, ext simulated=1)"]]
    src_medium: Required[Annotated[str, "the Medium the entries were in"]]
    request_id: Annotated[str, "the request whose entries were dropped"]
    step: Annotated[int | None, "the decode step; None for a cut at the end of prefill"]
    layer: Annotated[int | None, "the layer; None: every layer alike"]
    kv_head: Annotated[int, "the KV head (detail head)"]
    positions: Annotated[list[list[int]], "token positions, one list per KV head, or one list when heads agree"]
    block_hashes: Annotated[list[int], "vLLM's hashes of the evicted blocks"]
    kv_device_bytes: Annotated[int, "KV bytes on the device after it"]
    kv_host_bytes: Annotated[int, "KV bytes on the host after it"]
    ext: Ext


class OffloadFields(TypedDict, total=False):
    src_medium: Required[Annotated[str, "the Medium copied from"]]
    dst_medium: Required[Annotated[str, "the Medium copied to (device->host: a store, host->device: a fetch)"]]
    tokens: Required[Annotated[int, "entries (rows) copied"]]
    bytes: Required[Annotated[int, "bytes copied; bytes / duration is the achieved bandwidth"]]
    request_id: Annotated[str, "the request, when one request's entries moved"]
    step: Annotated[int | None, "the decode step"]
    layer: Annotated[int | None, "the layer; None: several layers in one copy"]
    kv_head: Annotated[int, "the KV head (detail head)"]
    batch_size: Annotated[int, "rows of the batch the copy served"]
    positions: Annotated[list[list[int]], "token positions copied, per KV head or one list"]
    block_hashes: Annotated[list[int], "vLLM's hashes of the moved blocks"]
    kv_device_bytes: Annotated[int, "KV bytes on the device after it"]
    kv_host_bytes: Annotated[int, "KV bytes on the host after it"]
    ext: Ext


class PhaseDetail(TypedDict, total=False):
    """A PHASE event's fields besides `phase`, which `emit_phase` takes first. `ext overlapped=1`
    marks work on another stream, overlapped with the critical path (analyses report it beside
    the step's split, not in it)."""

    step: Annotated[int | None, "the decode step"]
    layer: Annotated[int | None, "the layer"]
    request_id: Annotated[str, "the request, for per-request work"]
    batch_size: Annotated[int, "rows the work covered"]
    tokens: Annotated[int, "tokens the work covered (selected, moved)"]
    bytes: Annotated[int, "bytes the work covered"]
    ext: Ext


class PhaseFields(PhaseDetail, total=False):
    phase: Required[Annotated[str, "a Phase value or the plugin's own name"]]


class SampleFields(TypedDict, total=False):
    mem_allocated_bytes: Annotated[int, "torch allocator: allocated now"]
    mem_reserved_bytes: Annotated[int, "torch allocator: reserved now"]
    mem_peak_allocated_bytes: Annotated[int, "torch allocator: peak allocated since the last sample"]
    mem_peak_reserved_bytes: Annotated[int, "torch allocator: peak reserved since the last sample"]
    nvml_used_bytes: Annotated[int, "NVML: device memory used by all processes"]
    ext: Ext


class RequestEndFields(TypedDict, total=False):
    request_id: Required[Annotated[str, "the request"]]
    tokens: Required[Annotated[int, "output tokens"]]
    text: Annotated[str, "the decoded output (answer accuracy of retention probes)"]
    ext: Ext


class RunEndFields(TypedDict, total=False):
    ext: Required[Annotated[dict[str, float], "the profiler's own cost: events emitted, ns delivering them"]]


KIND_FIELDS: dict[Kind, type] = {
    Kind.PREFILL: PrefillFields,
    Kind.DECODE_STEP: DecodeStepFields,
    Kind.EVICT: EvictFields,
    Kind.OFFLOAD: OffloadFields,
    Kind.PHASE: PhaseFields,
    Kind.SAMPLE: SampleFields,
    Kind.REQUEST_END: RequestEndFields,
    Kind.RUN_END: RunEndFields,
}


@dataclass(frozen=True)
class KindField:
    """One row of the table, read from its TypedDict."""

    name: str
    type: str
    required: bool
    meaning: str


def kind_fields(kind: Kind) -> list[KindField]:
    """The fields of `kind`, Required first, in the table's order (none for run_start)."""
    table = KIND_FIELDS.get(kind)
    if table is None:
        return []
    required: frozenset[str] = getattr(table, "__required_keys__", frozenset())
    rows = []
    for name, hint in get_type_hints(table, include_extras=True).items():
        if get_origin(hint) in (Required, NotRequired):
            hint = get_args(hint)[0]
        base, meaning = get_args(hint)[:2] if get_origin(hint) is Annotated else (hint, "")
        rows.append(KindField(name, _type_name(base), name in required, str(meaning)))
    return sorted(rows, key=lambda row: not row.required)


def required_fields(kind: Kind) -> tuple[str, ...]:
    """What every event of `kind` carries (the conformance kit checks these)."""
    return tuple(row.name for row in kind_fields(kind) if row.required)


def _type_name(hint: object) -> str:
    return hint.__name__ if isinstance(hint, type) and not get_args(hint) else str(hint).replace("typing.", "")
