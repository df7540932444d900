"""The `streamingllm` strategy: keep the attention sinks and a recent window, evict the rest.

StreamingLLM (Xiao et al., 2023, arXiv 2309.17453) observes that attention piles onto the first
tokens of a sequence whatever they say ("attention sinks"), so a cache that keeps those few plus
a window of the latest tokens stays stable over very long streams.

On kvprof's transformers runner the strategy is a `CachePolicy`: after prefill and after each
decode step's attention it cuts every row of every layer down to `sink_tokens + recent_tokens`
entries by gathering the kept slots into new, smaller tensors, so the memory is really freed.
Every layer and KV head drops the same positions, so one evict event per request (no layer: all
layers; one position list: all heads) describes an eviction exactly, at any `--detail`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kvprof.events import Medium, Phase
from kvprof.hookspecs import hookimpl
from kvprof.strategy import Option, non_negative, positive
from kvprof_transformers.loading import LoadedModel
from kvprof_transformers.plugin import TransformersStrategy
from kvprof_transformers.runner import Batch, CachePolicy

PADDING = -1  # the position of a left-padding slot


class StreamingLLMPolicy(CachePolicy):
    """Keeps each row's first `sink_tokens` positions and its latest `recent_tokens` slots."""

    name = "streamingllm"

    def __init__(self, sink_tokens: int, recent_tokens: int) -> None:
        self.sink_tokens = sink_tokens
        self.budget = sink_tokens + recent_tokens
        self.positions: torch.Tensor | None = None  # (batch, slots): true position of each slot

    def new_cache(self, batch: Batch) -> Any:
        self.positions = None
        return super().new_cache(batch)

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        """Track the chunk's positions; a follow-up chunk (the prompt was cut already) is cut too."""
        chunk = batch.attention_mask[:, -tokens:]
        if self.positions is None:
            self.positions = torch.where(chunk.bool(), chunk.cumsum(-1) - 1, PADDING)
            return
        first = batch.next_positions[:, None]  # the runner advances it after this hook
        self.positions = torch.cat([self.positions, torch.where(chunk.bool(), first + chunk.cumsum(-1) - 1, PADDING)],
                                   dim=-1)
        self._evict(batch, cache)

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        self._evict(batch, cache)

    def after_step(self, batch: Batch, cache: Any) -> None:
        # The runner advances next_positions after this hook: it is the position just attended.
        self.positions = torch.cat([self.positions, batch.next_positions.unsqueeze(-1)], dim=-1)
        self._evict(batch, cache)

    def _evict(self, batch: Batch, cache: Any) -> None:
        slots = self.positions.shape[-1]
        if slots <= self.budget:
            return
        clock = self.runner.clock
        start = clock.now_synced()
        # Rank sinks above everything, then by recency; the top `budget` slots stay.
        is_sink = (self.positions >= 0) & (self.positions < self.sink_tokens)
        rank = torch.arange(slots, device=self.positions.device) + slots * is_sink
        keep = rank.topk(self.budget, dim=-1).indices.sort(dim=-1).values
        dropped = torch.ones_like(is_sink).scatter_(1, keep, False)
        dropped_positions = self.positions[dropped].view(batch.size, -1).tolist()
        slot_bytes = sum(_nbytes(layer) for layer in cache.layers) // (batch.size * slots)
        for layer in cache.layers:
            layer.keys, layer.values = _gather_slots(layer.keys, keep), _gather_slots(layer.values, keep)
        batch.attention_mask = batch.attention_mask.gather(1, keep)
        self.positions = self.positions.gather(1, keep)
        end = clock.now_synced()
        self._report(batch, start, end, dropped_positions, slot_bytes)

    def _report(self, batch: Batch, start: int, end: int, dropped: list[list[int]], slot_bytes: int) -> None:
        profiler = self.runner.profiler
        if not profiler.enabled:
            return
        step = batch.step if batch.step >= 0 else None  # None: the cut right after prefill
        profiler.emit_phase(Phase.EVICTION.value, start, end, step=step)
        for request, positions in zip(batch.requests, dropped):
            tokens = [p for p in positions if p != PADDING]
            pads = len(positions) - len(tokens)
            where = dict(request_id=request.request_id, step=step, src_medium=Medium.DEVICE.value)
            if tokens:
                profiler.emit_evict(start, end, reason="streamingllm", tokens=len(tokens),
                                    bytes=len(tokens) * slot_bytes, positions=[tokens], **where)
            if pads:  # rows shorter than the batch's longest lose padding slots too
                profiler.emit_evict(start, end, reason="padding", tokens=pads, bytes=pads * slot_bytes, **where)


def _nbytes(layer: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def _gather_slots(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(batch, heads, slots, dim) -> (batch, heads, kept, dim): a new tensor, the old one is freed."""
    return tensor.gather(2, keep[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))


class StreamingLLMStrategy(TransformersStrategy):
    name = "streamingllm"
    description = "attention sinks + a recent window (StreamingLLM, Xiao et al. 2023)"
    options = (
        Option("sink_tokens", 4, "first tokens of each sequence always kept (the attention sinks)",
               check=non_negative),
        Option("recent_tokens", 252, "latest tokens kept (the rolling window)", check=positive),
    )

    def make_policy(self, loaded: LoadedModel, options: dict) -> CachePolicy:
        return StreamingLLMPolicy(options["sink_tokens"], options["recent_tokens"])

    def policy_metadata(self, policy: CachePolicy) -> dict:
        """The KV budget in the form the analyses read: a fixed number of tokens."""
        return {"kv_budget": {"fraction": None, "tokens": policy.budget}}

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
