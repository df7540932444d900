"""The kvprof plugin contract: every hook, with when it fires and what it may return.

kvprof uses pluggy (the plugin system of pytest). A plugin is a module or object with functions
named like the hooks below and decorated with `kvprof.hookimpl`; pluggy passes only the
arguments an implementation names, so a hook may gain arguments without breaking plugins.
Plugins are found through the entry-point group `kvprof` (the built-ins register exactly so);
`KVPROF_PLUGINS=name,name` restricts which load (an empty value loads none).

Two families:

* Registration hooks, called once when the plugin manager starts: what a plugin adds
  (strategies, models, analyses) and, per run, which sinks it attaches.
* Event hooks, called by the core each time a strategy reports an event through
  `Profiler.emit_*`. Sinks implement them: the Arrow trace writer, the live progress display,
  the NVML sampler, NVTX ranges. Order within a run:

      status*   (any time, also before run_start: the model is loading)
      run_start
        prefill (one per request)              ─┐ repeated per batch of requests
        decode_step*  each emitted after its own step's evict*, offload*, phase* events;
                      sample* at any time
        request_end (one per request)          ─┘
      run_end (always, also after a crash; `error` says so)

Event hooks run on the hot path: keep them cheap, defer work to `run_end`, never touch the
device (no `.item()`, no synchronize). They return nothing; an exception in a sink aborts the
run with a `kvprof.errors.SinkError` that names the sink's plugin (`KVPROF_DEBUG=1 kvprof trace
...` shows the traceback into the sink), and the trace written so far stays readable.

Each event kind's fields are one table, in `kvprof.events` (`KIND_FIELDS`): it types the
`Profiler.emit_*` helpers, gives the conformance kit its required fields, and is rendered under
each event hook of the hook reference.

Why one hook per kind rather than one `kvprof_event(event)`: pluggy calls only the plugins that
implement a hook, so a sink pays only for the kinds it asks for. The live display and the NVTX
sink implement prefill and decode_step (and NVTX offload); the most numerous events, evict and
offload at one per layer and step (per head at detail "head"), never reach them. The trace
writer, which wants every kind, implements each hook with the same one-line method. Where
events come by the thousand, a strategy emits them as one columnar `EventBatch`: sinks that
implement `kvprof_event_batch` take it whole, the others still get each event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kvprof.events import Event, EventBatch
    from kvprof.profiler import Profiler, RunInfo

hookspec = pluggy.HookspecMarker("kvprof")
hookimpl = pluggy.HookimplMarker("kvprof")


# --- registration -------------------------------------------------------------------------


@hookspec
def kvprof_register_strategies(register: Callable[[type], None]) -> None:
    """Register strategy classes: call ``register(MyStrategy)`` once per class.

    Called once at start-up. A strategy class subclasses `kvprof.Strategy`: it sets
    `name` (what `kvprof trace --plugin NAME` selects), `description`, `options` (a tuple of
    `kvprof.Option`), and implements ``run(ctx: RunContext)``. A name is owned by
    the plugin loaded first (kvprof's own plugins load first): a later plugin registering it is
    left out whole, and `kvprof plugins` lists it as failed, naming both.
    """


@hookspec
def kvprof_register_models(register: Callable[..., None]) -> None:
    """Register model aliases: ``register(alias, config=dict, hf_id=str, description=str)``.

    Called once at start-up. `config` is a transformers-style architecture config (enough to
    build the model with random weights); `hf_id` is where real weights are looked for in the
    local Hugging Face cache. kvprof ships llama-3-8b, llama-2-7b, opt-6.7b and others this way.
    """


@hookspec
def kvprof_register_analyses(register: Callable[..., None]) -> None:
    """Register analyses: ``register(name, function, description=str)``.

    Called once at start-up. ``function(trace: kvprof.trace.Trace, **params) -> dict`` reads a
    trace (never a model or framework) and returns JSON-ready results; `kvprof analyze --only
    NAME` runs it.
    """


@hookspec
def kvprof_make_sinks(run: RunInfo, profiler: Profiler) -> list[Any] | None:
    """Return sink objects to attach for this run, or None.

    Called once per run, before `kvprof_run_start`. Each returned object implements some of
    the event hooks below (decorated with `hookimpl`) and is registered for the duration of
    the run, then unregistered. Use it for sinks that hold per-run state (a file, a thread).
    A sink that produces events of its own (a telemetry sampler) emits them through
    `profiler.emit_sample`. Not called when the user turned sinks off (overhead baselines).
    """


# --- events -------------------------------------------------------------------------------


@hookspec
def kvprof_status(run: RunInfo, message: str) -> None:
    """What the strategy is doing now, in a few words ("loading the model", "warm-up run 1/1",
    "capturing the decode graph"): sent by `Profiler.status(message)`.

    For people watching (the live display shows it), not for analysis: it is not written to the
    trace. May fire before `run_start` (model loading comes first), so it reaches plugins that
    are registered for the whole command, not the per-run sinks of `kvprof_make_sinks`. Not
    fired for warm-up runs and overhead baselines (the profiler is not enabled).
    """


@hookspec
def kvprof_run_start(run: RunInfo, event: Event) -> None:
    """The run begins. `run` holds the metadata written into the trace header; `event` is the
    run_start record (seq 0).

    Fires once, after the model is loaded and before the first request; anything a sink needs
    to open (a file, a display) is opened here.
    """


@hookspec
def kvprof_prefill(event: Event) -> None:
    """A request's prompt was processed: start_ns to end_ns with its first token ready.

    ext["cached_tokens"]: served from a prefix cache; ext["prompt_tokens"]: the whole prompt. A
    chunked prefill fires one event per chunk with ext["chunk"]=1; the last chunk's end is the first
    token's time. A preempted request's recomputation fires again with ext["recompute"]=1 and
    does not move its first-token time. A follow-up turn (`--question after`) fires once more with
    ext["followup"]=1. On the transformers runner the prompt's event also carries
    ext["forward_kv_device_bytes"] (device KV when the forward ended, before the policy's
    after_prefill: the true peak of a strategy that compresses then) and ext["policy_ns"] (how long
    after_prefill took, ending at end_ns); its kv_device_bytes are after that work.
    """


@hookspec
def kvprof_decode_step(event: Event) -> None:
    """One step produced one token for each of `batch_size` running requests.

    Fires once per step, after the step's device work finished (synchronized end time); the KV
    bytes are measured from the tensors.
    """


@hookspec
def kvprof_evict(event: Event) -> None:
    """KV entries were dropped (memory freed or, if ext["simulated"]=1, only masked).

    At most one event per step, layer and request unless the run's detail is "head".
    """


@hookspec
def kvprof_offload(event: Event) -> None:
    """KV entries were copied between tiers: src_medium -> dst_medium.

    device->host is a store, host->device a fetch (ext["prefetch"]=1 when speculative).
    start_ns/end_ns time the copy itself (CUDA events on GPUs), so bytes / duration is the
    achieved bandwidth. Time the consumer spent waiting for it is a separate PHASE event.
    """


@hookspec
def kvprof_phase(event: Event) -> None:
    """A span of strategy work on a step's critical path, named by `event.phase`.

    Standard names are in `kvprof.Phase` (speculation, kv_transfer, eviction,
    sync_stall). The breakdown analysis subtracts these from the step; the remainder is decode
    compute. A span with `ext={"overlapped": 1.0}` ran on another stream, beside the critical
    path: the breakdown reports it beside the split instead (what it cost the step shows as a
    stall, such as kv_transfer).
    """


@hookspec
def kvprof_sample(event: Event) -> None:
    """Memory and device telemetry at one moment (a point event).

    ext["pcie_rx_bytes_per_s"], ext["pcie_tx_bytes_per_s"]: NVML, 20 ms windows. Samplers may
    fire from their own thread; the core serializes delivery.
    """


@hookspec
def kvprof_request_end(event: Event) -> None:
    """A request finished. start_ns is its arrival, end_ns its last token.

    ext["prompt_tokens"]: the prompt's length.
    """


@hookspec
def kvprof_event_batch(batch: EventBatch) -> None:
    """Many events of one kind at once, in columns (`Profiler.emit_batch`; see `EventBatch`).

    Strategies emit a batch where events come by the thousand (H2O's evictions per step at
    detail "head"). A sink that implements this hook gets the batch instead of one call of its
    per-kind hook per event (the trace writer writes the columns as they are); a sink that does
    not still gets each event through its per-kind hook. Fires in seq order with the other
    events: `batch.seq` is the first event's seq, the rest follow without gaps.
    """


@hookspec
def kvprof_run_end(run: RunInfo, event: Event, error: BaseException | None) -> None:
    """The run ended; always fires, also when the strategy raised (`error` is then set).

    `event.ext` carries the profiler's own cost: events emitted and nanoseconds spent
    delivering them. Sinks flush and close here.
    """
