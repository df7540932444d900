"""From what vLLM's scheduler does to kvprof events.

The scheduler subclass (scheduler.py) calls a `StepObserver` at two points of an engine step:

    schedule() returns           -> `scheduled`:  preemptions (evict); which prompts are computed
    update_from_output() returns -> `step_done`:  the step: offload, prefill (per request),
                                                  decode_step and a KV usage sample
and, inside update_from_output(), vLLM publishes the step's KV-cache events through the publisher
the observer wraps (`kv_events`): prefix-cache evictions (evict) and CPU-tier stores.

A step's evict and offload events are recorded before its prefill and decode_step events, as
kvprof's event order has it. Inside the engine step the observer only takes timestamps and keeps
what vLLM handed it (the KV-event batch, the step's record); it turns them into events, and the
run delivers those to the sinks, in `flush`, after each LLMEngine.step() returns. So neither
kvprof's bookkeeping nor sink work lands inside vLLM's step, where it would delay vLLM's own
timestamps (its first-token and iteration times) and the tokens themselves. (A 2K x 64 prefill
publishes 8,192 block hashes: converting them in the step took milliseconds.)

Timing rules:

* A step ends when update_from_output() returns: vLLM has turned the device's results into the
  step's outputs (each request's new tokens) and stamped them inside that call (its
  EngineCoreOutputs timestamp, RequestOutput.metrics' first_token_ts and last_token_ts). The
  executor synchronized with the device before update_from_output() was entered, so the end is
  after the step's device work too; ext["output_ns"] is the host time vLLM took between the two
  (per request, so it grows with the batch: ending the step at the synchronization instead put
  kvprof's TTFT 4.7 ms before vLLM's at batch 64 on the H200).
* A step starts at the end of its schedule(). With async scheduling (vLLM's GPU default) the next
  step is scheduled while this one runs, so a step starts no earlier than the previous step
  ended: [max(schedule end, previous end), end].
* A prefill event covers the step(s) that computed the prompt: one event per step, with
  ext["chunk"]=1 when the prompt took several steps (chunked prefill); the last one ends when the
  first token is ready (the step's end). A request preempted after its first token computes its
  KV again when it resumes: those prefill events carry ext["recompute"]=1 (a request preempted
  before its first token just continues its prefill).
* vLLM frees a preempted request's KV inside schedule(): its evict event spans that schedule() call.
* vLLM drops a cached block from its prefix cache when it hands the block out again, which happens
  while scheduling; the KV events are published afterwards, so prefix-cache evict events span the
  latest schedule() call (with async scheduling, the one that ran while the step executed).

Sizes: vLLM allocates KV in blocks of `block_size` tokens; kv_device_bytes counts the blocks held
by requests (vLLM's KV usage; cached blocks no request holds count as free, as in vLLM). Evict and
offload events count the KV entries they move (`tokens`) at the KV bytes of one token
(block bytes / block size), so every event moves the same bytes per entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kvprof import Event, Kind, Medium, Profiler

# vLLM's KV-event `medium` values and kvprof's tiers.
MEDIUMS = {"GPU": Medium.DEVICE.value, "CPU": Medium.HOST.value}
# The offloading connector's transfer counters (vllm/distributed/kv_transfer/kv_connector/v1/
# offloading/metrics.py): bytes and CUDA-event-timed seconds, per direction.
OFFLOAD_DIRECTIONS = (("store", Medium.DEVICE.value, Medium.HOST.value),
                      ("load", Medium.HOST.value, Medium.DEVICE.value))
_U64 = (1 << 64) - 1


def trace_hashes(hashes: list[Any]) -> list[int]:
    """vLLM's block hashes (unsigned 64-bit, or bytes whose low 64 bits vLLM uses) as the trace's
    int64: the same 64 bits, so `h & (2**64 - 1)` gives vLLM's value back."""
    signed = []
    for block_hash in hashes:
        value = (int.from_bytes(block_hash, "big") if isinstance(block_hash, bytes) else block_hash) & _U64
        signed.append(value - (1 << 64) if value >> 63 else value)
    return signed


def offload_totals(connector_stats: dict[str, Any] | None) -> dict[str, tuple[float, float, int]]:
    """{direction: (bytes, seconds, transfers)} from SchedulerStats.kv_connector_stats, the dict form
    of the offloading connector's stats ({"types": ..., "data": {metric: {labels: value}}})."""
    data = (connector_stats or {}).get("data") or {}
    totals = {}
    for direction, _, _ in OFFLOAD_DIRECTIONS:
        nbytes = sum((data.get(f"vllm:kv_offload_{direction}_bytes") or {}).values())
        seconds = sum((data.get(f"vllm:kv_offload_{direction}_time") or {}).values())
        transfers = sum(len(sizes) for sizes in (data.get(f"vllm:kv_offload_{direction}_size") or {}).values())
        if nbytes or transfers:
            totals[direction] = (float(nbytes), float(seconds), transfers)
    return totals


@dataclass(slots=True)
class PrefillProgress:
    """A request whose prompt (or, after a preemption, prompt and outputs so far) is being computed."""

    prompt_tokens: int
    target_tokens: int      # tokens to compute before the next token can be sampled
    cached_tokens: int      # served from the prefix cache when first scheduled
    computed_tokens: int
    recompute: bool         # computing again what a preemption dropped, after the first token
    chunks: int = 0


@dataclass(slots=True)
class PrefillChunk:
    request_id: str         # vLLM's id
    tokens: int
    progress: PrefillProgress
    last: bool              # the prompt is complete after this step


@dataclass(slots=True)
class StepRecord:
    """What schedule() decided for one step, kept until the step's update_from_output()."""

    index: int
    schedule_start_ns: int
    schedule_end_ns: int
    batch_size: int
    tokens: int
    used_blocks: int
    free_blocks: int
    chunks: list[PrefillChunk] = field(default_factory=list)


class StepObserver:
    """Turns scheduler observations into kvprof events. One per engine (attached by the scheduler),
    reporting to the profiler of the run it is bound to."""

    def __init__(self) -> None:
        self.profiler: Profiler | None = None
        self.recording = False
        self.external_ids: dict[str, str] = {}   # vLLM's request id -> the workload's
        self.block_size = 0
        self.block_bytes = 0                     # KV bytes of one block id, all layers
        self.num_blocks = 0
        self.preemptions = 0
        self.cost_ns = 0                         # time spent observing (in the engine step and in flush)
        self.last_step_end_ns = 0
        # What flush() delivers, in order: events, and work deferred out of the engine step
        # (callables returning events). Only while recording; otherwise the work runs at once.
        self._queue: list[Event | Callable[[], list[Event]]] = []
        self.scheduler: Any = None               # vLLM's scheduler, once attached
        self._block_pool: Any = None
        self._next_step = 0
        self._last_schedule = (0, 0, 0)          # start_ns, end_ns, step of the latest schedule()
        self._pending: dict[int, StepRecord] = {}  # id(SchedulerOutput) -> its step
        self._prefilling: dict[str, PrefillProgress] = {}
        self._prompt_tokens: dict[str, int] = {}
        self._computed: dict[str, int] = {}      # tokens whose KV each unfinished request holds
        self._first_token: set[str] = set()      # requests whose first token has been computed
        self._cached_on_device: set[int] = set()  # hashes of the blocks in vLLM's prefix cache
        self._stored_to_host: list[int] = []     # hashes stored to the CPU tier in this step

    # --- set-up --------------------------------------------------------------------------

    def attach(self, scheduler: Any, block_bytes: int) -> None:
        """Read the engine's KV geometry and wrap its KV-event publisher (the null one by default)."""
        self.scheduler = scheduler
        self._block_pool = scheduler.kv_cache_manager.block_pool
        self.num_blocks = self._block_pool.num_gpu_blocks
        self.block_size = scheduler.block_size
        self.block_bytes = block_bytes
        publisher = scheduler.kv_event_publisher
        publish = publisher.publish

        def publish_observed(batch: Any) -> None:
            self.kv_events(batch)
            publish(batch)

        publisher.publish = publish_observed

    def bind(self, profiler: Profiler) -> None:
        """Report to `profiler` from now on, steps counted from 0 (an engine may serve several runs)."""
        for item in self._queue:  # left by an earlier run that was not flushed: its state only
            if not isinstance(item, Event):
                item()
        self._queue = []
        self.profiler = profiler
        self.recording = profiler.enabled
        self.preemptions = 0
        self.cost_ns = 0
        self._next_step = 0

    def add_request(self, vllm_id: str, request_id: str) -> None:
        self.external_ids[vllm_id] = request_id

    def flush(self) -> None:
        """Make the events of the steps since the last flush and deliver them, in step order."""
        queue, self._queue = self._queue, []
        start_ns = time.monotonic_ns()
        events: list[Event] = []
        for item in queue:
            if isinstance(item, Event):
                events.append(item)
            else:
                events.extend(item())
        self.cost_ns += time.monotonic_ns() - start_ns
        for event in events:
            self.profiler.emit(event)

    @property
    def token_bytes(self) -> float:
        """KV bytes of one token (all layers)."""
        return self.block_bytes / self.block_size if self.block_size else 0.0

    # --- the engine step -----------------------------------------------------------------

    def scheduled(self, output: Any, start_ns: int, end_ns: int) -> None:
        step = self._next_step
        self._last_schedule = (start_ns, end_ns, step)
        for vllm_id in output.finished_req_ids:
            self._forget(vllm_id)
        for vllm_id in output.preempted_req_ids or ():
            self._preempted(vllm_id, start_ns, end_ns, step)
        if not output.total_num_scheduled_tokens:
            return
        self._next_step += 1
        self._start_prefills(output)
        free = self._block_pool.get_num_free_blocks()
        used = self.num_blocks - 1 - free  # vLLM keeps one block aside as the null block
        record = StepRecord(step, start_ns, end_ns, len(output.num_scheduled_tokens),
                            output.total_num_scheduled_tokens, used, free)
        for vllm_id, tokens in output.num_scheduled_tokens.items():
            self._computed[vllm_id] = self._computed.get(vllm_id, 0) + tokens
            progress = self._prefilling.get(vllm_id)
            if progress is None:
                continue  # decoding
            progress.computed_tokens += tokens
            progress.chunks += 1
            last = progress.computed_tokens >= progress.target_tokens
            if last:
                del self._prefilling[vllm_id]
                self._first_token.add(vllm_id)
            record.chunks.append(PrefillChunk(vllm_id, tokens, progress, last))
        self._pending[id(output)] = record

    def step_done(self, output: Any, synced_ns: int, end_ns: int, engine_core_outputs: dict[int, Any]) -> None:
        """The step of `output`: its device work was over at synced_ns (update_from_output()
        entered), and vLLM had made its outputs (and stats) at end_ns, when the step ends."""
        record = self._pending.pop(id(output), None)  # None for a step that ran nothing
        connector_stats = None
        for outputs in engine_core_outputs.values():
            stats = getattr(outputs, "scheduler_stats", None)
            connector_stats = connector_stats or getattr(stats, "kv_connector_stats", None)
        step = record.index if record else self._last_schedule[2]
        self._later(self._offloads, connector_stats, step, end_ns)
        if record is None:
            return
        start_ns = max(record.schedule_end_ns, self.last_step_end_ns)
        self.last_step_end_ns = end_ns
        self._later(self._step_reports, record, start_ns, synced_ns, end_ns)

    def kv_events(self, batch: Any) -> None:
        """A step's KV-cache events (BlockStored / BlockRemoved / AllBlocksCleared), published
        inside update_from_output(): read after the step."""
        self._later(self._kv_events, batch, self._last_schedule)

    def _kv_events(self, batch: Any, schedule: tuple[int, int, int]) -> list[Event]:
        removed: dict[str, list[int]] = {}
        cleared: list[int] = []
        for event in batch.events:
            kind = type(event).__name__
            medium = getattr(event, "medium", None) or "GPU"
            if kind == "BlockStored":
                hashes = trace_hashes(event.block_hashes)
                if medium == "GPU":
                    self._cached_on_device.update(hashes)
                elif medium == "CPU":
                    self._stored_to_host.extend(hashes)
            elif kind == "BlockRemoved":
                hashes = trace_hashes(event.block_hashes)
                removed.setdefault(medium, []).extend(hashes)
                if medium == "GPU":
                    self._cached_on_device.difference_update(hashes)
            elif kind == "AllBlocksCleared":
                cleared.extend(self._cached_on_device)
                self._cached_on_device.clear()
        start_ns, end_ns, step = schedule
        events = [self._evict_blocks("prefix_cache", MEDIUMS.get(medium, medium.lower()), hashes, start_ns, end_ns,
                                     step) for medium, hashes in removed.items()]
        if cleared:
            events.append(self._evict_blocks("prefix_cache_reset", Medium.DEVICE.value, cleared, start_ns, end_ns,
                                             step))
        return events

    def _later(self, work: Callable[..., list[Event]], *args: Any) -> None:
        """Run `work` in flush() while recording (out of the engine step); at once otherwise, for
        the state it keeps, dropping its events."""
        if self.recording:
            self._queue.append(partial(work, *args))
        else:
            work(*args)

    # --- events --------------------------------------------------------------------------

    def _step_reports(self, record: StepRecord, start_ns: int, synced_ns: int, end_ns: int) -> list[Event]:
        kv_bytes = record.used_blocks * self.block_bytes
        blocks = {"num_used_blocks": float(record.used_blocks), "num_free_blocks": float(record.free_blocks)}
        events = []
        for chunk in record.chunks:
            progress = chunk.progress
            ext = {"prompt_tokens": float(progress.prompt_tokens), "cached_tokens": float(progress.cached_tokens)}
            if progress.chunks > 1 or not chunk.last:
                ext["chunk"] = 1.0
            if progress.recompute:
                ext["recompute"] = 1.0
            events.append(Event(Kind.PREFILL, start_ns, end_ns, request_id=self._external(chunk.request_id),
                                step=record.index, tokens=chunk.tokens, batch_size=record.batch_size,
                                kv_device_bytes=kv_bytes, ext=ext))
        prefill_tokens = sum(chunk.tokens for chunk in record.chunks)
        events.append(Event(
            Kind.DECODE_STEP, start_ns, end_ns, step=record.index, batch_size=record.batch_size, tokens=record.tokens,
            kv_device_bytes=kv_bytes,
            ext={"prefill_requests": float(len(record.chunks)), "prefill_tokens": float(prefill_tokens),
                 "decode_requests": float(record.batch_size - len(record.chunks)),
                 "schedule_ns": float(record.schedule_end_ns - record.schedule_start_ns),
                 "output_ns": float(end_ns - synced_ns), **blocks},
        ))
        usage = record.used_blocks / max(1, self.num_blocks - 1)
        events.append(Event(Kind.SAMPLE, end_ns, end_ns, kv_device_bytes=kv_bytes, ext={"kv_usage": usage, **blocks}))
        return events

    def _preempted(self, vllm_id: str, start_ns: int, end_ns: int, step: int) -> None:
        self.preemptions += 1
        self._prefilling.pop(vllm_id, None)
        tokens = self._computed.pop(vllm_id, 0)
        self._record(Event(Kind.EVICT, start_ns, end_ns, reason="preempt_recompute",
                           request_id=self._external(vllm_id), step=step, tokens=tokens,
                           bytes=round(tokens * self.token_bytes), src_medium=Medium.DEVICE.value))

    def _evict_blocks(self, reason: str, medium: str, hashes: list[int], start_ns: int, end_ns: int,
                      step: int) -> Event:
        # Cached blocks are full blocks (the CPU tier's may hold several device blocks, so their
        # size is not known here: its evictions carry the hashes only).
        tokens = len(hashes) * self.block_size if medium == Medium.DEVICE.value else None
        return Event(Kind.EVICT, start_ns, end_ns, reason=reason, step=step, block_hashes=hashes,
                     src_medium=medium, tokens=tokens,
                     bytes=round(tokens * self.token_bytes) if tokens is not None else None)

    def _offloads(self, connector_stats: dict[str, Any] | None, step: int, end_ns: int) -> list[Event]:
        """The offloading connector's transfers reported with this step's output."""
        totals = offload_totals(connector_stats)
        stored, self._stored_to_host = self._stored_to_host, []
        events: list[Event] = []
        if not totals and not stored:
            return events
        for direction, src, dst in OFFLOAD_DIRECTIONS:
            nbytes, seconds, transfers = totals.get(direction, (0.0, 0.0, 0))
            hashes = stored if direction == "store" else []
            if not nbytes and not hashes:
                continue
            # The connector times each transfer with CUDA events and reports the completed ones
            # with this step's output: the event ends at the step's end and lasts their total time.
            duration_ns = int(seconds * 1e9)
            events.append(Event(
                Kind.OFFLOAD, end_ns - duration_ns, end_ns, step=step, src_medium=src, dst_medium=dst,
                bytes=int(nbytes) if nbytes else None, block_hashes=hashes or None,
                tokens=round(nbytes / self.token_bytes) if nbytes and self.token_bytes else None,
                ext={"transfers": float(transfers), "cuda_time_ns": float(duration_ns)},
            ))
        return events

    # --- requests ------------------------------------------------------------------------

    def _start_prefills(self, output: Any) -> None:
        for new in output.scheduled_new_reqs:
            prompt = len(new.prompt_token_ids)
            self._prompt_tokens[new.req_id] = prompt
            self._computed[new.req_id] = new.num_computed_tokens
            self._prefilling[new.req_id] = PrefillProgress(prompt, prompt, new.num_computed_tokens,
                                                           new.num_computed_tokens, recompute=False)
        cached = output.scheduled_cached_reqs
        if not cached.resumed_req_ids:
            return
        for index, vllm_id in enumerate(cached.req_ids):
            if vllm_id in cached.resumed_req_ids:
                prompt = self._prompt_tokens.get(vllm_id, 0)
                done = cached.num_computed_tokens[index]
                self._computed[vllm_id] = done
                self._prefilling[vllm_id] = PrefillProgress(prompt, prompt + cached.num_output_tokens[index],
                                                            done, done, recompute=vllm_id in self._first_token)

    def _forget(self, vllm_id: str) -> None:
        self.external_ids.pop(vllm_id, None)
        self._prompt_tokens.pop(vllm_id, None)
        self._computed.pop(vllm_id, None)
        self._prefilling.pop(vllm_id, None)
        self._first_token.discard(vllm_id)

    def _record(self, event: Event) -> None:
        if self.recording:
            self._queue.append(event)

    def _external(self, vllm_id: str) -> str:
        return self.external_ids.get(vllm_id, vllm_id)
