"""The fast engine's KV cache: preallocated per layer, updated in place, attended by kvprof.

`StaticKV` holds, per layer, keys and values of shape ``[batch, kv_heads, slots, head_dim]`` for
the longest sequence the run can have, and nothing grows while a batch runs. Slot j of row b
holds the token at index j of the row's left-padded sequence (prompt, follow-up, then generated
tokens), so `filled` slots are occupied in every row and KV bytes are arithmetic:
``filled x bytes_per_slot``, with no walk over tensors.

The model reaches the cache through transformers' AttentionInterface: `install` switches the
model to the attention function `kvprof`, which hands each layer's call to the policy attached
to the attention module (`StaticPolicy.attend`, in runner.py). transformers' own cache object is
`PassThroughCache`, whose `update` returns the new keys and values untouched: the policy writes
them into its buffers and attends itself, so one function owns both.

Masks: decode attends over every slot with one additive mask row per batch row,
``[batch, 1, 1, slots]`` (0 for a real token, -inf for padding and slots not written yet),
updated in place (`open_slot`), so a captured CUDA graph replays the same kernels every step.
Prefill of an unpadded batch needs no mask at all (causal flash / memory-efficient SDPA).
"""

from __future__ import annotations

from typing import Any

import torch

from kvprof import UsageError

ATTENTION_NAME = "kvprof"
POLICY_ATTRIBUTE = "kvprof_policy"


class StaticKV:
    """Per-layer key/value buffers of a fixed number of slots, and the decode mask."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, layer_slots: list[int] | None = None) -> None:
        # `layer_slots`: a policy whose layers hold fewer slots (H2O's budget) says how many.
        widths = layer_slots or [slots] * num_layers
        self.keys = [torch.zeros((batch, kv_heads, n, head_dim), dtype=dtype, device=device) for n in widths]
        self.values = [torch.zeros((batch, kv_heads, n, head_dim), dtype=dtype, device=device) for n in widths]
        self.mask = torch.full((batch, 1, 1, slots), float("-inf"), dtype=dtype, device=device)
        self.batch, self.kv_heads, self.slots, self.head_dim = batch, kv_heads, slots, head_dim
        self.bytes_per_slot = 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        """Bytes allocated (every slot of every row)."""
        return self.bytes_per_slot * self.batch * self.slots

    def reset(self) -> None:
        """A new batch: nothing is visible until a chunk or a step opens its slots."""
        self.mask.fill_(float("-inf"))

    def write(self, layer: int, first: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Eager write of a chunk's keys/values at slots [first, first + n)."""
        n = keys.shape[-2]
        self.keys[layer][:, :, first:first + n].copy_(keys)
        self.values[layer][:, :, first:first + n].copy_(values)

    def write_at(self, layer: int, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Graph-safe write of one token per row at the slot held in the device tensor `slot` (1,)."""
        self.keys[layer].index_copy_(2, slot, keys)
        self.values[layer].index_copy_(2, slot, values)

    def open_slot(self, slot: torch.Tensor) -> None:
        """Graph-safe: make `slot` (device tensor (1,)) visible in every row's decode mask."""
        self.mask.index_fill_(-1, slot, 0.0)

    def open_range(self, first: int, valid: torch.Tensor) -> None:
        """Eager: slots [first, first + n) become visible where `valid` (batch, n) is set."""
        view = self.mask[:, 0, 0, first:first + valid.shape[1]]
        view.copy_(torch.where(valid.bool(), 0.0, float("-inf")).to(view.dtype))


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """One query per row over every slot: SDPA with the additive mask and grouped-query heads.

    query (B, Hq, 1, D); keys/values (B, Hkv, S, D); mask (B, 1, 1, S) additive. Returns
    (B, 1, Hq, D), as transformers expects from an attention function. On the H200 this ran at
    0.029 ms per layer for an 8K cache at batch 1 against 0.135 ms for a grouped matmul with a
    float32 softmax (`benchmarks/decode_attention.py`, results/h200-decode-attention.log).
    """
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2)


def prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                      key_valid: torch.Tensor | None, first: int) -> torch.Tensor:
    """A chunk of queries at slots [first, first + q) over keys at slots [0, first + q), causal.

    key_valid (B, first + q) marks real tokens, or is None when every slot is real (an unpadded
    first chunk then runs the fused causal kernel without a mask). A padding query always sees
    itself, so no row is all-masked (that would put NaN into the cache). Returns (B, q, Hq, D).
    """
    q_len, k_len = query.shape[-2], keys.shape[-2]
    if key_valid is None and first == 0:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)
    group = query.shape[1] // keys.shape[1]
    if group > 1:  # the masked kernels take grouped-query heads only expanded
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    q_slots = torch.arange(first, first + q_len, device=query.device)[:, None]
    k_slots = torch.arange(k_len, device=query.device)[None, :]
    visible = (k_slots <= q_slots)[None, None]  # (1, 1, q, k)
    if key_valid is not None:
        visible = visible & (key_valid[:, None, None, :].bool() | (k_slots == q_slots)[None, None])
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scaling)
    return out.transpose(1, 2)


class PassThroughCache:
    """What the model is given as `past_key_values`: the policy keeps the real cache, so `update`
    hands the new keys and values straight to the attention function."""

    is_compileable = False

    def __init__(self, seen_tokens: int = 0) -> None:
        self.seen_tokens = seen_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


def install(model: Any, policy: Any) -> str:
    """Route `model`'s attention to `policy.attend`; returns the implementation it had."""
    previous = require_attention_interface(model)
    for module in attention_modules(model):
        setattr(module, POLICY_ATTRIBUTE, policy)
    return previous


def require_attention_interface(model: Any) -> str:
    """Switch `model` to kvprof's attention; returns the implementation it had.

    Raises UsageError for a model whose attention does not go through transformers'
    AttentionInterface (transformers then keeps its own implementation and only warns).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kvprof_attention)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UsageError(f"cannot install kvprof's attention in {type(model).__name__}: {exc}") from None
    if model.config._attn_implementation != ATTENTION_NAME:
        raise UsageError(f"{type(model).__name__} does not compute attention through transformers' "
                         "AttentionInterface; run it with --opt engine=eager")
    return previous


def uninstall(model: Any, previous: str | None) -> None:
    for module in attention_modules(model):
        if hasattr(module, POLICY_ATTRIBUTE):
            delattr(module, POLICY_ATTRIBUTE)
    if previous and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous)


def attention_modules(model: Any) -> list[Any]:
    """The modules that call the attention function: those that know their layer index."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def kvprof_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function registered as `kvprof`: the attached policy computes it."""
    policy = getattr(module, POLICY_ATTRIBUTE, None)
    if policy is None:  # a model that outlived its run: plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    for unsupported in ("sliding_window", "softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise UsageError(f"this model's attention uses {unsupported!r}, which kvprof's static engine does not "
                             "implement; run it with --opt engine=eager")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return policy.attend(module.layer_idx, query, key, value, scaling), None
