"""Attention access for cache policies: the attention of the last queries, without model hooks.

A policy that ranks cached tokens by the attention they receive (SnapKV-style prompt
compressors, H2O-like scores) sets `attention_request` and implements `on_attention`:

    class MyPolicy(CachePolicy):
        attention_request = AttentionRequest(last_queries=8, prefill=True, decode=False)

        def on_attention(self, view: AttentionView) -> None:
            self.scores[view.layer] = view.per_kv_head()   # (batch, kv_heads, slots)

The runner calls `on_attention` once per layer and forward (prefill chunk, and each decode step
when `decode=True`), right after that layer's attention, with the attention probabilities and/or
the (rotary-embedded) queries of the last `last_queries` queries of the forward. It works on both
engines:

* the eager engine (`CachePolicy`, transformers' own cache): the runner wraps the model's attention
  function (sdpa) in `kvprof_tap`, which calls it unchanged and then computes the probabilities of
  the last queries only, a (batch, q_heads, n, slots) matmul and softmax per layer, from the same
  query, keys and mask transformers passed; nothing is installed when no policy asks.
* the fast engine (`StaticPolicy`): `StaticPolicy.attend` computes them beside its own attention.
  Decode steps there run inside a captured CUDA graph: `on_attention` is then captured too and may
  do device work only (no `.item()`, `.tolist()`, host copies or printing), and its view's tensors
  are overwritten by the next replay. Prefill is always eager.

Probabilities are float32, softmax over the key slots each query sees (0 where it sees nothing:
padding, future slots, unwritten slots of a preallocated cache). Slots are cache-slot coordinates
of the layer after this forward's write: the eager engine's cache length, or every slot of the
fast engine's preallocated buffer. A policy that computes attention itself (H2O) needs none of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvprof_transformers.static_cache import attention_modules

if TYPE_CHECKING:
    from kvprof_transformers.runner import Runner

TAP_NAME = "kvprof_tap"
TAP_ATTRIBUTE = "kvprof_attention_tap"


@dataclass(frozen=True)
class AttentionRequest:
    """What a policy wants to see of each layer's attention (set as `CachePolicy.attention_request`)."""

    last_queries: int = 1        # the last N queries of each forward (a prefill chunk: its last N tokens)
    probabilities: bool = True   # softmax weights, (batch, q_heads, n, slots) float32
    queries: bool = False        # query states after rotary embedding, (batch, q_heads, n, head_dim)
    prefill: bool = True         # during prefill chunks (prompt and follow-up)
    decode: bool = False         # during each decode step (n = 1)


@dataclass
class AttentionView:
    """One layer's attention in one forward, as `CachePolicy.on_attention` receives it."""

    layer: int
    decoding: bool                        # False: a prefill chunk
    keys: torch.Tensor                    # (batch, kv_heads, slots, head_dim) the layer's cached keys
    query_valid: torch.Tensor             # (batch, n) bool: the query is a real token (not padding)
    probabilities: torch.Tensor | None    # (batch, q_heads, n, slots) float32, if requested
    queries: torch.Tensor | None          # (batch, q_heads, n, head_dim), if requested

    @property
    def group(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.probabilities.shape[1] // self.keys.shape[1]

    def per_kv_head(self) -> torch.Tensor:
        """(batch, kv_heads, slots): attention each slot received, summed over the real queries and
        the query heads that share its KV head (what scores a KV head's entries)."""
        probs = self.probabilities * self.query_valid[:, None, :, None]
        batch, q_heads, n, slots = probs.shape
        return probs.view(batch, self.keys.shape[1], self.group * n, slots).sum(dim=2)


def last_query_probabilities(query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None,
                             scaling: float) -> torch.Tensor:
    """Softmax attention weights of `query` (batch, q_heads, n, D) over `keys` (batch, kv_heads,
    S, D), grouped-query heads folded into one matmul; `visible` (broadcastable to (batch, 1, n, S),
    bool) masks what each query sees. float32; rows that see nothing are all 0."""
    batch, q_heads, n, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    grouped = (query * scaling).reshape(batch, kv_heads, group * n, dim)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)).float().view(batch, q_heads, n, slots)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def causal_visible(q_slots: torch.Tensor, slots: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """(batch or 1, 1, n, slots) bool: a query at slot q sees keys at slots <= q that are real."""
    k_slots = torch.arange(slots, device=q_slots.device)
    visible = (k_slots[None, :] <= q_slots[:, None])[None, None]
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :slots].bool()
    return visible


class AttentionTap:
    """The eager engine's side: wraps the model's attention function while a policy asks."""

    def __init__(self, runner: Runner) -> None:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        self.runner = runner
        self.request: AttentionRequest = runner.policy.attention_request
        model = runner.model
        self.previous = model.config._attn_implementation
        AttentionInterface.register(TAP_NAME, tapped_attention)
        # The model's mask as its own implementation would get it (transformers builds none for
        # an attention name it has no mask function for, and padding would then be attended).
        AttentionMaskInterface.register(TAP_NAME, ALL_MASK_ATTENTION_FUNCTIONS.get(self.previous,
                                                                                 ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]))
        model.set_attn_implementation(TAP_NAME)
        self.modules = attention_modules(model)
        for module in self.modules:
            setattr(module, TAP_ATTRIBUTE, self)

    def inner(self) -> Any:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[self.previous] if self.previous in ALL_ATTENTION_FUNCTIONS \
            else sdpa_attention_forward

    def remove(self) -> None:
        for module in self.modules:
            if hasattr(module, TAP_ATTRIBUTE):
                delattr(module, TAP_ATTRIBUTE)
        if self.runner.model.config._attn_implementation == TAP_NAME:
            self.runner.model.set_attn_implementation(self.previous)

    def observe(self, layer: int, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None,
                scaling: float) -> None:
        batch = self.runner.batch
        decoding = batch.step >= 0
        if not (self.request.decode if decoding else self.request.prefill):
            return
        q_len, slots = query.shape[2], keys.shape[2]
        n = min(self.request.last_queries, q_len)
        last = query[:, :, q_len - n:]
        probabilities = None
        if self.request.probabilities:
            if mask is None:  # transformers left it out: causal over real tokens only
                visible = causal_visible(torch.arange(slots - n, slots, device=query.device), slots, None)
            elif mask.dtype == torch.bool:
                visible = mask[:, :, q_len - n:, :slots]
            else:  # additive
                visible = mask[:, :, q_len - n:, :slots] > torch.finfo(mask.dtype).min / 2
            probabilities = last_query_probabilities(last, keys, visible, scaling)
        query_valid = batch.attention_mask[:, -n:].bool() if not decoding else \
            torch.ones((query.shape[0], 1), dtype=torch.bool, device=query.device)
        self.runner.policy.on_attention(AttentionView(layer, decoding, keys, query_valid, probabilities,
                                                      last if self.request.queries else None))


def tapped_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> Any:
    """The attention function registered as `kvprof_tap`: the model's own, then the observation."""
    tap = getattr(module, TAP_ATTRIBUTE, None)
    if tap is None:  # a model that outlived its run
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    result = tap.inner()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    tap.observe(module.layer_idx, query, key, attention_mask, scaling if scaling is not None else
                query.shape[-1] ** -0.5)
    return result
