"""StreamingLLM's cache policy on kvprof's transformers runner (imports torch: the strategy in
`kvprof_streamingllm.plugin` imports this module only when a run starts).

After prefill and after each decode step's attention the policy cuts every row of every layer down
to `sink_tokens + recent_tokens` entries by gathering the kept slots into new, smaller tensors, so
the memory is really freed. Every layer and KV head drops the same positions, so one evict event per
request (no layer: all layers; one position list: all heads) describes an eviction exactly, at any
`--detail`.
"""

from __future__ import annotations

from typing import Any

import torch

from kvprof import Medium, Phase
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
        self.positions = torch.cat([self._tracked(), batch.next_positions.unsqueeze(-1)], dim=-1)
        self._evict(batch, cache)

    def _tracked(self) -> torch.Tensor:
        assert self.positions is not None, "after_chunk tracks the prompt's positions before any cut or step"
        return self.positions

    def _evict(self, batch: Batch, cache: Any) -> None:
        positions = self._tracked()
        slots = positions.shape[-1]
        if slots <= self.budget:
            return
        clock = self.runner.clock
        start = clock.now_synced()
        # Rank sinks above everything, then by recency; the top `budget` slots stay.
        is_sink = (positions >= 0) & (positions < self.sink_tokens)
        rank = torch.arange(slots, device=positions.device) + slots * is_sink
        keep = rank.topk(self.budget, dim=-1).indices.sort(dim=-1).values
        dropped = torch.ones_like(is_sink).scatter_(1, keep, False)
        dropped_positions = positions[dropped].view(batch.size, -1).tolist()
        slot_bytes = sum(_nbytes(layer) for layer in cache.layers) // (batch.size * slots)
        for layer in cache.layers:
            layer.keys, layer.values = _gather_slots(layer.keys, keep), _gather_slots(layer.values, keep)
        batch.attention_mask = batch.attention_mask.gather(1, keep)
        self.positions = positions.gather(1, keep)
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
            if tokens:
                profiler.emit_evict(start, end, reason="streamingllm", tokens=len(tokens),
                                    bytes=len(tokens) * slot_bytes, positions=[tokens],
                                    request_id=request.request_id, step=step, src_medium=Medium.DEVICE.value)
            if pads:  # rows shorter than the batch's longest lose padding slots too
                profiler.emit_evict(start, end, reason="padding", tokens=pads, bytes=pads * slot_bytes,
                                    request_id=request.request_id, step=step, src_medium=Medium.DEVICE.value)


def _nbytes(layer: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def _gather_slots(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(batch, heads, slots, dim) -> (batch, heads, kept, dim): a new tensor, the old one is freed."""
    return tensor.gather(2, keep[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))
