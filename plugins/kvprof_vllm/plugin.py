"""Registers the `vllm` strategy. Importing this module never imports vllm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvprof import RunContext, Strategy, hookimpl
from kvprof_vllm.options import VLLM_OPTIONS


class VllmStrategy(Strategy):
    """Real vLLM (v1 engine), driven step by step in-process; events from inside its scheduler.

    After `run`, `outputs` maps each request id to vLLM's RequestOutput, for callers that drive
    the strategy from Python (tests, benchmarks).
    """

    name = "vllm"
    description = "real vLLM v1 engine, in-process: events from its scheduler and KV-cache events"
    options = VLLM_OPTIONS

    def __init__(self) -> None:
        self.outputs: dict[str, Any] = {}

    def run(self, ctx: RunContext) -> None:
        from kvprof_vllm.engine import import_vllm

        import_vllm()  # a UsageError naming the extra to install when vLLM is missing
        from kvprof_vllm.run import run_profiled

        self.outputs = run_profiled(ctx)


@hookimpl
def kvprof_register_strategies(register: Callable[[type], None]) -> None:
    register(VllmStrategy)
