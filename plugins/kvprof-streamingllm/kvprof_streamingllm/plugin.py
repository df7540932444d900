"""The `streamingllm` strategy: keep the attention sinks and a recent window, evict the rest.

StreamingLLM (Xiao et al., 2023, arXiv 2309.17453) observes that attention piles onto the first
tokens of a sequence whatever they say ("attention sinks"), so a cache that keeps those few plus
a window of the latest tokens stays stable over very long streams.

On kvprof's transformers runner the strategy is a `CachePolicy` (`kvprof_streamingllm.policy`).
This module, the one the entry point names, imports neither torch nor transformers: kvprof loads
every plugin for `kvprof plugins` and `kvprof analyze`, so the policy is imported when a run starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvprof import KVBudget, Option, hookimpl, non_negative, positive
from kvprof_transformers.plugin import TransformersStrategy

if TYPE_CHECKING:
    from kvprof_streamingllm.policy import StreamingLLMPolicy
    from kvprof_transformers.loading import LoadedModel


class StreamingLLMStrategy(TransformersStrategy):
    name = "streamingllm"
    description = "attention sinks + a recent window (StreamingLLM, Xiao et al. 2023)"
    options = (
        Option("sink_tokens", 4, "first tokens of each sequence always kept (the attention sinks)",
               check=non_negative),
        Option("recent_tokens", 252, "latest tokens kept (the rolling window)", check=positive),
    )

    def make_policy(self, loaded: LoadedModel, options: dict) -> StreamingLLMPolicy:
        from kvprof_streamingllm.policy import StreamingLLMPolicy

        return StreamingLLMPolicy(options["sink_tokens"], options["recent_tokens"])

    def kv_budget(self, options: dict) -> KVBudget:
        """What the analyses put on the budget axis: a fixed number of tokens per sequence."""
        return KVBudget(tokens=options["sink_tokens"] + options["recent_tokens"])

    def describe_deviations(self) -> list[str]:
        return [
            "positions: cached keys keep the rotary positions of their place in the text (the runner "
            "passes true position_ids); the paper assigns positions within the cache and re-rotates keys",
            "eviction runs after each step's attention, so a step attends over sink + recent + 1 entries; "
            "the authors' loop makes room first and attends over sink + recent",
            "a prompt longer than the cache is prefilled with full attention, then cut to sink + recent",
        ]


@hookimpl
def kvprof_register_strategies(register: Callable[[type], None]) -> None:
    register(StreamingLLMStrategy)
