"""Attention that also says how much attention each cached key received.

H2O ranks cached tokens by the post-softmax attention they accumulate. transformers' fast
kernels (sdpa, flash) never expose those weights, and eager attention materializes a
(heads x queries x keys) matrix at once: at a 16K-token prompt that is 9 x 16K x 16K floats per
layer for SmolLM2. `attend` computes attention itself, one block of queries at a time, and sums
each block's weights per KV head as it goes: output and scores come from the same softmax, and
memory stays bounded by `LOGITS_PER_BLOCK`.

Masking is by true token positions, not by slot index: a query at position p sees the cached
keys at positions <= p (and > p - window on sliding-window models); a slot at position -1 is
empty. That stays right however the policy reorders or drops slots, and whatever the padding.

`h2o_attention` is the function registered in transformers' AttentionInterface; it hands each
call to the policy attached to the attention module (`attach`).
"""

from __future__ import annotations

from typing import Any

import torch

from kvprof import UsageError

ATTENTION_NAME = "kvprof_h2o"
POLICY_ATTRIBUTE = "kvprof_h2o_policy"
LOGITS_PER_BLOCK = 1 << 25  # attention weights held at once per layer (128 MiB in float32)


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    key_positions: torch.Tensor, query_positions: torch.Tensor, scaling: float, *,
    sliding_window: int | None = None, softcap: float | None = None, want_scores: bool = True,
    block_elements: int = LOGITS_PER_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention over a cache whose slots carry their tokens' true positions.

    query (B, Hq, q, D); key (B, Hkv, S, D); value (B, Hkv, S, Dv); Hq a multiple of Hkv (GQA).
    key_positions (B, Hkv, S): -1 marks an empty slot. query_positions (B, q): -1 marks padding.
    Returns the output (B, q, Hq, Dv), as transformers expects from an attention function, and,
    if `want_scores`, the attention each slot received from the real queries, summed over those
    queries and over the query heads that share its KV head: (B, Hkv, S) float32. Logits are in
    the model's dtype and the softmax in float32, as in transformers' eager attention.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    grouped = query.view(batch, kv_heads, group, q_len, dim)
    keys_t = key.transpose(-1, -2)
    key_pos = key_positions[:, :, None, None, :]  # (B, Hkv, 1, 1, S)
    block = max(1, min(q_len, block_elements // max(1, batch * q_heads * slots)))
    scores = query.new_zeros((batch, kv_heads, slots), dtype=torch.float32) if want_scores else None
    outputs = []
    for start in range(0, q_len, block):
        size = min(block, q_len - start)
        # The query heads of a group share one key matrix: fold them into the rows of one matmul.
        q_block = (grouped[:, :, :, start:start + size] * scaling).reshape(batch, kv_heads, group * size, dim)
        logits = torch.matmul(q_block, keys_t).view(batch, kv_heads, group, size, slots)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        q_pos = query_positions[:, None, None, start:start + size, None]  # (B, 1, 1, n, 1)
        visible = (key_pos >= 0) & (key_pos <= q_pos)
        if sliding_window:
            visible &= key_pos > q_pos - sliding_window
        # As in eager attention: the dtype's minimum (finite, so padding rows that see nothing
        # stay NaN-free), then a float32 softmax.
        logits.masked_fill_(~visible, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).view(batch, kv_heads, group * size, slots)
        out = torch.matmul(weights.to(value.dtype), value)
        outputs.append(out.view(batch, kv_heads, group, size, -1))
        if scores is not None:
            # Sum the rows of real queries (padding queries give no attention) in one matmul.
            real = (query_positions[:, start:start + size] >= 0).to(weights.dtype)
            rows = real[:, None, None, :].expand(batch, 1, group, size).reshape(batch, 1, 1, group * size)
            scores += torch.matmul(rows, weights).squeeze(-2)
    output = torch.cat(outputs, dim=3) if len(outputs) > 1 else outputs[0]
    return output.view(batch, q_heads, q_len, -1).transpose(1, 2).contiguous(), scores


def h2o_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function kvprof registers as `kvprof_h2o` (transformers' AttentionInterface)."""
    policy = getattr(module, POLICY_ATTRIBUTE, None)
    if policy is None:  # a model that outlived its run: behave as plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise UsageError(f"h2o: this model's attention uses {unsupported!r}, "
                             "which the h2o plugin does not implement")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return policy.attend(module.layer_idx, query, key, value, scaling,
                         sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"))


def install(model: Any) -> str:
    """Switch `model` to the h2o attention function; returns the implementation it had.

    Raises UsageError for a model whose attention does not go through transformers'
    AttentionInterface (transformers then keeps its own implementation and only warns).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, h2o_attention)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UsageError(f"h2o: cannot install its attention function in {type(model).__name__}: {exc}") from None
    if model.config._attn_implementation != ATTENTION_NAME:
        raise UsageError(
            f"h2o: {type(model).__name__} does not compute attention through transformers' AttentionInterface, "
            "so h2o cannot read its attention scores"
        )
    return previous


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that call the attention function: those that know their layer index."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def attach(model: torch.nn.Module, policy: Any) -> None:
    """Route the h2o attention calls of `model` to `policy.attend`."""
    for module in attention_modules(model):
        setattr(module, POLICY_ATTRIBUTE, policy)


def detach(model: torch.nn.Module, previous_implementation: str | None) -> None:
    """Undo `attach` and `install`."""
    for module in attention_modules(model):
        if hasattr(module, POLICY_ATTRIBUTE):
            delattr(module, POLICY_ATTRIBUTE)
    if previous_implementation and model.config._attn_implementation == ATTENTION_NAME:
        model.set_attn_implementation(previous_implementation)
