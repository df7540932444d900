"""One-shot prompt compressors on the transformers runner, written as a plugin author would.

`OneShotCompressor` keeps `budget` prompt tokens per layer and KV head, chosen once, at the end of
prefill, by `scores` (here: recency); decode then adds every new token and evicts nothing. The
kept slots are gathered into new, smaller tensors, so the memory is really freed. It reports its
cut at every `--detail` level: per layer and request with one position list per KV head (layer),
per KV head (head), or one event per request with num_layers x kv_heads lists, layer-major
(step); padding slots a row drops are reported as `reason="padding"` evictions (no positions).
"""

from __future__ import annotations

from typing import Any

import torch

from kvprof import Medium, Phase
from kvprof_transformers.attention_access import AttentionRequest, AttentionView
from kvprof_transformers.runner import Batch, CachePolicy


class OneShotCompressor(CachePolicy):
    """Keeps the `budget` highest-scoring prompt slots of each layer and KV head after prefill."""

    name = "oneshot"

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def scores(self, batch: Batch, cache: Any) -> list[torch.Tensor]:
        """Per layer, a (batch, kv_heads, slots) score of each cached prompt slot; the highest stay.
        Here: recency (a one-shot recent window)."""
        slots = torch.arange(batch.slots, dtype=torch.float32, device=batch.attention_mask.device)
        return [slots.expand(layer.keys.shape[0], layer.keys.shape[1], -1) for layer in cache.layers]

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        if batch.slots <= self.budget:
            return
        start = self.runner.clock.now_synced()
        real = batch.attention_mask.bool()
        positions = torch.where(real, real.long().cumsum(-1) - 1, -1)  # (B, S); -1: padding
        dropped_per_layer, keeps = [], []
        for scores in self.scores(batch, cache):
            ranked = scores.float().masked_fill(~real[:, None, :], float("-inf"))
            keep = ranked.topk(self.budget, dim=-1).indices.sort(dim=-1).values      # (B, H, budget)
            keeps.append(keep)
            dropped_per_layer.append(torch.ones_like(ranked, dtype=torch.bool).scatter_(-1, keep, False))
        entry_bytes = [self.entry_bytes(layer) for layer in cache.layers]
        self.shrink(batch, cache, keeps)
        end = self.runner.clock.now_synced()
        self._report(batch, positions, dropped_per_layer, entry_bytes, start, end)

    def shrink(self, batch: Batch, cache: Any, keeps: list[torch.Tensor]) -> None:
        """Gather each layer's kept slots (`keeps`: per layer, (B, H, budget) slot indices) into
        new tensors. Every head keeps all real slots it ranks first and the same number of padding
        slots, which sort first: one mask row fits every layer and head."""
        for layer, keep in zip(cache.layers, keeps):
            layer.keys, layer.values = _gather(layer.keys, keep), _gather(layer.values, keep)
        batch.attention_mask = batch.attention_mask.gather(1, keeps[-1][:, 0])

    def entry_bytes(self, layer: Any) -> int:
        """Bytes of one token's key and value in one KV head of `layer`, from its tensors."""
        return layer.keys.shape[-1] * layer.keys.element_size() + layer.values.shape[-1] * layer.values.element_size()

    # --- events -------------------------------------------------------------------------------

    def _report(self, batch: Batch, positions: torch.Tensor, dropped: list[torch.Tensor], entry_bytes: list[int],
                start: int, end: int) -> None:
        profiler = self.runner.profiler
        if not profiler.enabled:
            return
        profiler.emit_phase(Phase.EVICTION.value, start, end)
        kv_heads = dropped[0].shape[1]
        for row, request in enumerate(batch.requests):
            where = {"request_id": request.request_id, "step": None, "src_medium": Medium.DEVICE.value}
            # per layer, per KV head: the real positions dropped
            lists = [[positions[row][mask[row, head]].tolist() for head in range(kv_heads)] for mask in dropped]
            lists = [[[p for p in head if p >= 0] for head in heads] for heads in lists]
            pads = [int(mask[row].sum()) - sum(len(head) for head in heads) for mask, heads in zip(dropped, lists)]
            self._emit_cut(start, end, lists, entry_bytes, where)
            if sum(pads):
                profiler.emit_evict(start, end, reason="padding", tokens=sum(pads),
                                    bytes=sum(n * size for n, size in zip(pads, entry_bytes)), **where)

    def _emit_cut(self, start: int, end: int, lists: list[list[list[int]]], entry_bytes: list[int],
                  where: dict[str, Any]) -> None:
        profiler, detail = self.runner.profiler, self.runner.detail
        if detail == "step":
            tokens = sum(len(head) for heads in lists for head in heads)
            if tokens:
                freed = sum(len(head) * size for heads, size in zip(lists, entry_bytes) for head in heads)
                profiler.emit_evict(start, end, reason=self.name, tokens=tokens, bytes=freed,
                                    positions=[head for heads in lists for head in heads],
                                    ext={"layers": float(len(lists)), "kv_heads": float(len(lists[0]))}, **where)
            return
        for layer, (heads, size) in enumerate(zip(lists, entry_bytes)):
            if detail == "head":
                for kv_head, head in enumerate(heads):
                    if head:
                        profiler.emit_evict(start, end, reason=self.name, layer=layer, kv_head=kv_head,
                                            tokens=len(head), bytes=len(head) * size, positions=[head], **where)
                continue
            tokens = sum(len(head) for head in heads)
            if tokens:
                profiler.emit_evict(start, end, reason=self.name, layer=layer, tokens=tokens, bytes=tokens * size,
                                    positions=heads, **where)


def _gather(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, kept, D): a new tensor; the old one is freed."""
    return tensor.gather(2, keep[..., None].expand(-1, -1, -1, tensor.shape[-1]))


class MaskOnlyCompressor(OneShotCompressor):
    """Cheats: keeps every tensor whole and only masks the slots it reports as freed. (Recency
    drops the same slots in every head, so masking the runner's slot mask hides them.)"""

    name = "mask-only"

    def shrink(self, batch: Batch, cache: Any, keeps: list[torch.Tensor]) -> None:
        kept = torch.zeros_like(batch.attention_mask).scatter_(1, keeps[-1][:, 0], 1)
        batch.attention_mask = batch.attention_mask * kept


class KeysOnlyBytes(OneShotCompressor):
    """Frees for real but under-reports: counts only the keys' bytes of each entry."""

    name = "keys-only-bytes"

    def entry_bytes(self, layer: Any) -> int:
        return layer.keys.shape[-1] * layer.keys.element_size()


def full_prompt_kv_bytes(config: Any, rows: int, slots: int, dtype: torch.dtype) -> int:
    """What a whole prompt's KV takes on the device, from the model's architecture alone."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_slot = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * dtype.itemsize
    return rows * slots * per_slot


class AttentionCompressor(OneShotCompressor):
    """A one-shot prompt compressor (SnapKV-style): scores each prompt token by the attention the
    last `window` prompt queries pay it, through the runner's attention API, and keeps the
    `budget` best per layer and KV head."""

    name = "attention-compressor"

    def __init__(self, budget: int, window: int = 8) -> None:
        super().__init__(budget)
        self.attention_request = AttentionRequest(last_queries=window, prefill=True, decode=False)
        self.layer_scores: dict[int, torch.Tensor] = {}

    def before_prefill(self, batch: Batch, cache: Any) -> None:
        self.layer_scores.clear()

    def on_attention(self, view: AttentionView) -> None:
        self.layer_scores[view.layer] = view.per_kv_head()  # (batch, kv_heads, slots)

    def scores(self, batch: Batch, cache: Any) -> list[torch.Tensor]:
        return [self.layer_scores[layer] for layer in range(len(cache.layers))]
