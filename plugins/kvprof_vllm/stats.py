"""vLLM's own counters, through its public stat-logger interface, to cross-check kvprof's events.

vLLM calls the logger once per engine step with SchedulerStats (KV usage, prefix-cache deltas) and
IterationStats (preemptions, reported when the preempted request next produces output). The run
records the totals in its last sample event, next to the counts kvprof derived from the scheduler,
so a trace carries its own consistency check.

Versions differ in which steps reach the logger: 0.32 records every step that has scheduler stats,
0.26 only the steps that produced request output, so on 0.26 a step that only computed a prompt
chunk (chunked prefill of a long prompt) drops its prefix-cache counts and `steps` counts fewer
steps. kvprof's own events are unaffected; read vLLM's totals on 0.26 as lower bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass
class VllmTotals:
    steps: int = 0                      # engine steps that reported scheduler stats
    preemptions: int = 0
    prefix_cache_queries: int = 0       # prompt tokens looked up, first scheduling
    prefix_cache_hits: int = 0          # of those, served from the prefix cache
    preempted_prefix_cache_hits: int = 0  # hits when preempted requests were scheduled again
    max_kv_usage: float = 0.0

    def logger_factory(self) -> Any:
        """What LLMEngine.from_engine_args(stat_loggers=[...]) takes: (vllm_config, engine_index)."""
        return lambda vllm_config, engine_index=0: TotalsLogger(vllm_config, engine_index, totals=self)

    def reset(self) -> None:
        for name, default in vars(VllmTotals()).items():
            setattr(self, name, default)

    def as_ext(self) -> dict[str, float]:
        return {f"vllm_{name}": float(value) for name, value in vars(self).items()}


class TotalsLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, totals: VllmTotals | None = None) -> None:
        self.totals = totals if totals is not None else VllmTotals()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        totals = self.totals
        if scheduler_stats is not None:
            totals.steps += 1
            totals.max_kv_usage = max(totals.max_kv_usage, scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                totals.prefix_cache_queries += prefix.queries
                totals.prefix_cache_hits += prefix.hits
                totals.preempted_prefix_cache_hits += getattr(prefix, "preempted_hits", 0)
        if iteration_stats is not None:
            totals.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self) -> None:
        pass
