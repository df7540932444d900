"""kvprof's vLLM scheduler: vLLM's own scheduler, observed, passed to vLLM as `scheduler_cls`.

vLLM calls `make_scheduler` (a dotted path in EngineArgs.scheduler_cls) with the scheduler's
arguments; it returns the subclass of AsyncScheduler when the engine schedules asynchronously (the
GPU default) and of Scheduler otherwise (the CPU build), so kvprof never changes how vLLM
schedules. The subclass times schedule() and update_from_output() and hands what they return to
the run's StepObserver (observer.py). It overrides nothing else.

vLLM calls the scheduler interface "not public": every attribute kvprof reads is checked when the
scheduler is built, and a missing one fails the run with a message naming the vLLM version.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import vllm
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

from kvprof import UsageError
from kvprof_vllm.engine import SUPPORTED_VERSIONS
from kvprof_vllm.observer import StepObserver

SCHEDULER_CLS = "kvprof_vllm.scheduler.make_scheduler"

# What kvprof reads from vLLM's scheduler types, beyond the two methods it wraps.
SCHEDULER_ATTRIBUTES = ("kv_event_publisher.publish", "kv_cache_manager.block_pool.get_num_free_blocks",
                        "kv_cache_manager.block_pool.num_gpu_blocks", "kv_cache_config.kv_cache_groups",
                        "block_size")
OUTPUT_FIELDS = {
    SchedulerOutput: ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                      "total_num_scheduled_tokens", "preempted_req_ids", "finished_req_ids"),
    NewRequestData: ("req_id", "prompt_token_ids", "num_computed_tokens"),
    CachedRequestData: ("req_ids", "resumed_req_ids", "num_computed_tokens", "num_output_tokens"),
}

_next_observer: StepObserver | None = None


@contextmanager
def observed_by(observer: StepObserver) -> Iterator[None]:
    """Engines built inside this block report to `observer` (the scheduler is built in-process)."""
    global _next_observer
    _next_observer = observer
    try:
        yield
    finally:
        _next_observer = None


def make_scheduler(*args: Any, **kwargs: Any) -> Scheduler:
    """The factory vLLM calls in place of its scheduler class."""
    vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
    if vllm_config.scheduler_config.async_scheduling:
        return KvprofAsyncScheduler(*args, **kwargs)
    return KvprofScheduler(*args, **kwargs)


class ObservedSchedulerMixin:
    """Reports each step to a StepObserver; scheduling itself is the base class's."""

    _kvprof: StepObserver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _next_observer is None:
            raise UsageError(
                "kvprof's vLLM scheduler was built outside a kvprof run: it needs vLLM in-process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0, which the vllm strategy sets)"
            )
        check_vllm_surface(self)
        self._kvprof = _next_observer
        try:
            self._kvprof.attach(self, kv_block_bytes(self.kv_cache_config))
        except AttributeError as exc:  # e.g. a publisher whose publish() cannot be wrapped
            raise incompatible(f"what attaching to its scheduler needs ({exc})") from exc

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        start_ns = time.monotonic_ns()
        output = super().schedule(*args, **kwargs)
        end_ns = time.monotonic_ns()
        self._kvprof.scheduled(output, start_ns, end_ns)
        self._kvprof.cost_ns += time.monotonic_ns() - end_ns
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        # The executor has synchronized with the device before handing back the step's output: the
        # step's device work has finished here, without an extra synchronize.
        synced_ns = time.monotonic_ns()
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # publishes KV events
        # vLLM has now made the step's outputs, each request's new tokens, and stamped them inside
        # this call (EngineCoreOutputs.timestamp: RequestOutput.metrics' first_token_ts and
        # last_token_ts). The step ends here: its tokens exist for the caller.
        end_ns = time.monotonic_ns()
        self._kvprof.step_done(scheduler_output, synced_ns, end_ns, outputs)
        self._kvprof.cost_ns += time.monotonic_ns() - end_ns
        return outputs


class KvprofScheduler(ObservedSchedulerMixin, Scheduler):
    """vLLM's synchronous Scheduler, observed."""


class KvprofAsyncScheduler(ObservedSchedulerMixin, AsyncScheduler):
    """vLLM's AsyncScheduler, observed."""


def kv_block_bytes(kv_cache_config: Any) -> int:
    """KV bytes behind one block id: its page in every layer of its cache group. Groups of a
    hybrid model overlay each other (a block id belongs to one group at a time): the largest."""
    return max(len(group.layer_names) * group.kv_cache_spec.page_size_bytes
               for group in kv_cache_config.kv_cache_groups)


def check_vllm_surface(scheduler: Any) -> None:
    """Fail clearly, naming the vLLM version, if anything kvprof reads is missing."""
    for path in SCHEDULER_ATTRIBUTES:
        target = scheduler
        for part in path.split("."):
            if not hasattr(target, part):
                raise incompatible(f"Scheduler.{path}")
            target = getattr(target, part)
    for group in scheduler.kv_cache_config.kv_cache_groups:
        if not (hasattr(group, "layer_names") and hasattr(getattr(group, "kv_cache_spec", None), "page_size_bytes")):
            raise incompatible("KVCacheGroupSpec.layer_names and kv_cache_spec.page_size_bytes")
    for cls, names in OUTPUT_FIELDS.items():
        present = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            if name not in present:
                raise incompatible(f"{cls.__name__}.{name}")


def incompatible(what: str) -> UsageError:
    return UsageError(f"kvprof's vLLM plugin reads {what}, which vLLM {vllm.__version__} does not have "
                      f"(kvprof supports vLLM {SUPPORTED_VERSIONS})")
