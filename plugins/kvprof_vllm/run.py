"""A workload on vLLM: profiled (the `vllm` strategy) or plain (the baseline kvprof is compared with).

Both start the engine the same way (engine.py); the profiled engine adds kvprof's three hooks:
the observed scheduler, KV-cache events with the null publisher, and the stat logger.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvprof import ModelSpec, Profiler, Request, RunContext, UsageError, WorkloadSpec
from kvprof.workloads import Workload
from kvprof_vllm import engine as vllm_engine
from kvprof_vllm.observer import StepObserver
from kvprof_vllm.scheduler import SCHEDULER_CLS, observed_by
from kvprof_vllm.stats import VllmTotals

NOTES = [
    "each engine step is a decode_step event (ext prefill_tokens says how many of its tokens were prompt "
    "tokens); step counts engine steps from 0",
    "decode_step spans the engine step: from the end of schedule() (or the previous step's end) to the "
    "return of update_from_output(), when vLLM has made the step's tokens into outputs (and stamped them: "
    "RequestOutput.metrics); the device work ended before, ext output_ns earlier (update_from_output() is "
    "entered after the executor synchronized with the device)",
    "prefix_cache evictions come from vLLM's BlockRemoved KV events, emitted when a cached free block is "
    "handed out again (lazily), not when it is freed",
    "vLLM v1 preempts by recompute only; the evict event is at the step whose schedule() preempted, and "
    "prefill events with ext recompute=1 compute the dropped KV again (they are not the first token)",
    "vLLM's events are per engine step: --detail changes nothing",
    "offload events (GPU builds with kv_offloading_size) come from the offloading connector: bytes and "
    "CUDA-timed transfer time per step and direction; CPU->GPU loads carry no block hashes",
    "block_hashes are vLLM's unsigned 64-bit hashes stored as int64 with the same bits",
]


@dataclass
class ObservedEngine:
    """vLLM's engine with kvprof's hooks, and what they report to."""

    engine: Any
    observer: StepObserver
    totals: VllmTotals
    load_format: str


def default_max_num_seqs(workload: WorkloadSpec) -> int | None:
    """A batch run keeps at most batch_size requests in flight; a request-rate run batches as vLLM does."""
    return workload.params.batch_size if workload.params.rate is None else None


@contextmanager
def observed_engine(model: ModelSpec, workload: WorkloadSpec, options: dict[str, Any], *, dtype: str = "auto",
                    seed: int = 0) -> Iterator[ObservedEngine]:
    from vllm.config import KVEventsConfig

    observer, totals = StepObserver(), VllmTotals()
    with vllm_engine.model_folder(model) as (folder, load_format):
        args = vllm_engine.engine_args(
            model, folder, load_format, options, dtype=dtype, seed=seed,
            default_max_num_seqs=default_max_num_seqs(workload), scheduler_cls=SCHEDULER_CLS,
            kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"),
        )
        with observed_by(observer):
            engine = vllm_engine.start_engine(args, stat_loggers=[totals.logger_factory()])
        try:
            yield ObservedEngine(engine, observer, totals, load_format)
        finally:
            vllm_engine.shutdown(engine)


@contextmanager
def plain_engine(model: ModelSpec, workload: WorkloadSpec, options: dict[str, Any], *, dtype: str = "auto",
                 seed: int = 0) -> Iterator[Any]:
    """vLLM's engine as vLLM builds it (its own scheduler, no KV events, no kvprof logger)."""
    with vllm_engine.model_folder(model) as (folder, load_format):
        args = vllm_engine.engine_args(model, folder, load_format, options, dtype=dtype, seed=seed,
                                       default_max_num_seqs=default_max_num_seqs(workload))
        engine = vllm_engine.start_engine(args)
        try:
            yield engine
        finally:
            vllm_engine.shutdown(engine)


def run_profiled(ctx: RunContext) -> dict[str, Any]:
    """The `vllm` strategy: start the observed engine, build the workload with vLLM's tokenizer,
    run it, and report through ctx.profiler. Returns vLLM's RequestOutput per request id."""
    check_device(ctx.device)
    ctx.profiler.status("starting the vLLM engine")
    with observed_engine(ctx.model, ctx.workload, ctx.options, dtype=ctx.dtype, seed=ctx.seed) as observed:
        workload = build_workload(observed.engine, ctx.workload)
        run = ctx.profiler.run
        run.workload = workload.describe()
        run.extra.update(describe_engine(observed))
        ctx.profiler.start()
        return profile_requests(observed, ctx.profiler, workload.requests)


def check_device(device: str) -> None:
    """vLLM picks its device from its build (CPU or CUDA) and CUDA_VISIBLE_DEVICES, not from kvprof."""
    from vllm.platforms import current_platform

    kind, _, index = device.partition(":")
    if kind != current_platform.device_type:
        raise UsageError(f"--device {device}: this vLLM build ({vllm_engine.vllm_version()}) runs on "
                         f"{current_platform.device_type}")
    if index not in ("", "0"):
        raise UsageError(f"--device {device}: vLLM uses the first visible GPU; choose it with CUDA_VISIBLE_DEVICES")


def profile_requests(observed: ObservedEngine, profiler: Profiler, requests: list[Request]) -> dict[str, Any]:
    """Run the requests on the observed engine, reporting to `profiler` (started); last, a sample
    with vLLM's own counters from the stat logger next to kvprof's."""
    observer, totals = observed.observer, observed.totals
    observer.bind(profiler)
    totals.reset()

    def finished(request: Request, output: Any, arrival_ns: int) -> None:
        # From the request's arrival to the end of the step that produced its last token.
        completion = output.outputs[0]
        ext = {"prompt_tokens": float(len(request.prompt_token_ids)),
               "cached_tokens": float(output.num_cached_tokens or 0)}
        preemptions = request_preemptions(output)
        if preemptions is not None:
            ext["preemptions"] = float(preemptions)
        profiler.emit_request_end(arrival_ns, observer.last_step_end_ns, request_id=request.request_id,
                                  tokens=len(completion.token_ids), text=completion.text, ext=ext)

    outputs = vllm_engine.run_requests(
        observed.engine, requests,
        on_added=lambda request, vllm_id, arrival_ns: observer.add_request(vllm_id, request.request_id),
        on_step=observer.flush, on_finished=finished,
    )
    drained = drain_kv_transfers(observed)
    # kvprof_observer_ns: time kvprof's observer spent, in the engine step and making its events
    # after it (the profiler's run_end reports the time its sinks took).
    profiler.emit_sample(time.monotonic_ns(), ext={**totals.as_ext(), "kvprof_preemptions": float(observer.preemptions),
                                                   "kvprof_observer_ns": float(observer.cost_ns),
                                                   **({"kvprof_drain_steps": float(drained)} if drained else {})})
    return outputs


DRAIN_LIMIT_S = 30.0


def drain_kv_transfers(observed: ObservedEngine) -> int:
    """With a KV connector, step the engine until vLLM's scheduler holds no request; the steps taken.

    The offloading connector keeps a finished request (and its KV blocks) until its stores to the
    CPU have completed, and reports each completed transfer with a later step's output. vLLM's
    own engine loop keeps stepping while its scheduler has such requests; the offline loop
    (run_requests) stops when every request has returned its output. Stepping on here puts the
    run's transfers in the run's trace and frees the blocks (a prefix-cache reset fails while a
    block is held). Bounded by DRAIN_LIMIT_S, in case a transfer never reports back."""
    scheduler = observed.observer.scheduler
    if getattr(scheduler, "connector", None) is None:
        return 0
    steps, deadline = 0, time.monotonic() + DRAIN_LIMIT_S
    while scheduler.has_requests() and time.monotonic() < deadline:
        observed.engine.step()
        observed.observer.flush()
        steps += 1
    return steps


def request_preemptions(output: Any) -> int | None:
    """vLLM's own count of the request's preemptions, where this vLLM reports one: RequestOutput.metrics
    is None when the engine logs no stats (kvprof's engines always do; `vllm.LLM` does not by default),
    and RequestStateStats.num_preemptions exists in 0.32 but not in 0.26. kvprof's own count is in
    the trace either way (its preempt_recompute evict events)."""
    return getattr(output.metrics, "num_preemptions", None)


def run_plain(model: ModelSpec, workload_spec: WorkloadSpec, options: dict[str, Any], *, dtype: str = "auto",
              seed: int = 0) -> tuple[Workload, dict[str, Any]]:
    """The workload on plain vLLM, started as the profiled run starts it: the workload and vLLM's
    RequestOutput per request id."""
    with plain_engine(model, workload_spec, options, dtype=dtype, seed=seed) as engine:
        workload = build_workload(engine, workload_spec)
        return workload, vllm_engine.run_requests(engine, workload.requests)


def build_workload(engine: Any, spec: WorkloadSpec) -> Workload:
    encode, chat, vocab_size = vllm_engine.tokenizer_glue(engine)
    return spec.build(encode, chat, vocab_size=vocab_size)


def describe_engine(observed: ObservedEngine) -> dict[str, Any]:
    """The engine's resolved configuration, for the trace header."""
    from vllm.platforms import current_platform

    config, observer = observed.engine.vllm_config, observed.observer
    cache, scheduler, model = config.cache_config, config.scheduler_config, config.model_config
    return {
        "vllm_version": vllm_engine.vllm_version(),
        "vllm_platform": current_platform.device_type,
        "in_process": True,
        "load_format": observed.load_format,
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_model_len": model.max_model_len,
        "enforce_eager": model.enforce_eager,
        "attention_backend": requested_attention_backend(config),
        "block_size": observer.block_size,
        "num_gpu_blocks": observer.num_blocks,
        "kv_block_bytes": observer.block_bytes,
        "kv_cache_bytes": observer.block_bytes * observer.num_blocks,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "kv_offloading_size": getattr(cache, "kv_offloading_size", None),
        "async_scheduling": scheduler.async_scheduling,
        "enable_chunked_prefill": scheduler.enable_chunked_prefill,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "notes": NOTES,
    }


def requested_attention_backend(config: Any) -> str:
    """The attention backend the engine was asked for ("auto": vLLM chose for the device; with
    VLLM_LOGGING_LEVEL=INFO vLLM logs its choice)."""
    backend = getattr(getattr(config, "attention_config", None), "backend", None)
    return backend.name if backend is not None else "auto"
