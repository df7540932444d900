"""What InfiniGen needs from a model's attention modules, and the check that they have it.

Supported: Llama-style rotary attention (Llama, Mistral without sliding windows, Qwen2, SmolLM2):
`self_attn` with q_proj/k_proj/v_proj, a `head_dim` and `scaling`, and the modeling module's
`apply_rotary_pos_emb`; no per-head q/k norms (Qwen3, OLMo2 normalize before RoPE, which the
speculative query would have to repeat). Anything else is a UsageError naming the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from kvprof import UsageError
from kvprof_transformers.offload import decoder_layers


class AttentionAccess:
    """The model's attention modules and how to compute a layer's post-RoPE queries."""

    def __init__(self, model: Any) -> None:
        architecture = type(model).__name__
        try:
            layers = decoder_layers(model)
        except UsageError:
            raise UsageError(f"infinigen cannot hook {architecture}: no decoder layers found") from None
        self.modules = [getattr(layer, "self_attn", None) for layer in layers]
        self.rope: Callable[..., Any] | None = None
        problem = self._problem()
        if problem:
            raise UsageError(
                f"infinigen cannot hook {architecture}: {problem} (supported: Llama-style rotary attention)"
            )
        text = model.config.get_text_config()
        self.query_heads = text.num_attention_heads
        self.kv_heads = text.num_key_value_heads
        self.head_dim = self.modules[0].head_dim

    def _problem(self) -> str | None:
        first = self.modules[0] if self.modules else None
        if first is None:
            return "its decoder layers have no self_attn module"
        for name in ("q_proj", "k_proj", "v_proj", "head_dim", "scaling"):
            if not hasattr(first, name):
                return f"its attention has no {name}"
        if hasattr(first, "q_norm") or hasattr(first, "k_norm"):
            return "its attention normalizes queries and keys per head"
        self.rope = getattr(sys.modules[type(first).__module__], "apply_rotary_pos_emb", None)
        if self.rope is None:
            return "it has no rotary position embedding (apply_rotary_pos_emb)"
        return None

    def query(self, layer: int, hidden_states: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """Layer `layer`'s queries for `hidden_states` (its attention input), after RoPE:
        ``[batch, query_heads, tokens, head_dim]``."""
        attention = self.modules[layer]
        batch, tokens, _ = hidden_states.shape
        query = attention.q_proj(hidden_states).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, _ = self.rope(query, query[:, :0], cos, sin)  # no keys: 0 heads, no kernels for them
        return query

    def scaling(self, layer: int) -> float:
        return float(self.modules[layer].scaling)
