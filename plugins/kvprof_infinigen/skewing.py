"""InfiniGen's offline skewing: per layer and KV head, an orthogonal matrix A from the SVD of the
queries of a calibration run, such that few columns of Q·A (and K·A) dominate Q·Kᵀ = (QA)(KA)ᵀ.

As in the authors' Llama code (accuracy/setup/gen_llama_skewing_matrix.py), A is computed from
post-RoPE queries and keys and applied at run time (RoPE keeps it from being folded into W_q):
``_, s_q, V_q = svd(Q)``, ``s_k = svd(K).S``, and A is V_q with its columns ordered by s_q·s_k.
kvprof orders them descending (the authors ascending); a column permutation changes nothing,
since columns are later picked by magnitude. With grouped-query attention a KV head's queries are
its query group's queries stacked, so one A serves the whole group (Q·A·(K·A)ᵀ = Q·Kᵀ needs the
same A on both sides).

The calibration text is `calibration.txt` next to this file (public-domain prose: the Declaration
of Independence, the Gettysburg Address, the opening of Moby-Dick; the authors use the first
2048 tokens of PG-19's first book, not available offline), repeated if the tokenizer makes it
shorter than asked. The result is cached per model in $KVPROF_CACHE/infinigen/<model-key>.pt,
with the text's name, hash and token count; the key fingerprints the weights, so random-weight
models (calibrated on themselves, which is fast) get their own entry per seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvprof import UsageError
from kvprof.models import cache_dir
from kvprof_infinigen.attention import AttentionAccess
from kvprof_transformers.loading import LoadedModel

CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")


@dataclass
class Skew:
    """Skewing matrices and calibration statistics of one model."""

    matrices: torch.Tensor       # [layers, kv_heads, head_dim, head_dim], float32, orthogonal
    query_energy: torch.Tensor   # [layers, kv_heads, head_dim]: sum over tokens and group of |Q·A|
    key_energy: torch.Tensor     # [layers, kv_heads, head_dim]: sum over tokens of |K·A|
    meta: dict[str, Any]         # calibration text, tokens, model key, cache path, seconds


def calibration_ids(loaded: LoadedModel, tokens: int) -> tuple[list[int], dict[str, Any]]:
    """The first `tokens` token ids of the calibration text (repeated if needed), and what they are."""
    text = CALIBRATION_FILE.read_text()
    ids = loaded.encode(text)
    repeats = -(-tokens // len(ids))
    vocab = loaded.config.get_text_config().vocab_size
    chosen = [token % vocab for token in (ids * repeats)[:tokens]]
    meta = {"text": CALIBRATION_FILE.name, "text_sha1": hashlib.sha1(text.encode()).hexdigest(),
            "text_tokens": len(ids), "tokens": len(chosen), "repeats": repeats}
    return chosen, meta


def model_key(loaded: LoadedModel, access: AttentionAccess, calibration: dict[str, Any]) -> str:
    """A cache key for the model's weights and the calibration: architecture, dtype, a hash of a
    slice of every layer's W_q and W_k, and the calibration text and length."""
    digest = hashlib.sha1()
    text = loaded.config.get_text_config()
    shape = {"layers": text.num_hidden_layers, "hidden": text.hidden_size, "heads": access.query_heads,
             "kv_heads": access.kv_heads, "head_dim": access.head_dim, "dtype": str(loaded.dtype)}
    digest.update(json.dumps([shape, calibration["text_sha1"], calibration["tokens"]], sort_keys=True).encode())
    for attention in access.modules:
        for weight in (attention.q_proj.weight, attention.k_proj.weight):
            digest.update(weight.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return f"{getattr(text, 'model_type', 'model')}-{digest.hexdigest()[:16]}"


def load_or_compute(loaded: LoadedModel, access: AttentionAccess, tokens: int) -> Skew:
    """The model's skew, from the cache or computed now (and cached)."""
    if tokens < access.head_dim:
        raise UsageError(f"option calibration_tokens={tokens}: at least head_dim={access.head_dim} tokens are needed")
    ids, calibration = calibration_ids(loaded, tokens)
    path = cache_dir() / "infinigen" / f"{model_key(loaded, access, calibration)}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        return Skew(stored["matrices"], stored["query_energy"], stored["key_energy"], stored["meta"])
    started = time.perf_counter()
    matrices, query_energy, key_energy = compute_skew(loaded, access, ids)
    meta = {**calibration, "model_key": path.stem, "path": str(path),
            "computed_s": round(time.perf_counter() - started, 3)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"matrices": matrices, "query_energy": query_energy, "key_energy": key_energy, "meta": meta}, partial)
    os.replace(partial, path)  # atomic: a concurrent reader sees all of it or nothing
    return Skew(matrices, query_energy, key_energy, meta)


@torch.inference_mode()
def compute_skew(loaded: LoadedModel, access: AttentionAccess,
                 ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the calibration ids through the model once; per layer, skew from its queries and keys."""
    from transformers import DynamicCache

    layers, heads, dim = len(access.modules), access.kv_heads, access.head_dim
    matrices = torch.empty(layers, heads, dim, dim)
    query_energy = torch.empty(layers, heads, dim)
    key_energy = torch.empty(layers, heads, dim)

    def after_attention(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        layer = module.layer_idx
        queries = access.query(layer, kwargs["hidden_states"], kwargs["position_embeddings"])[0]
        keys = kwargs["past_key_values"].layers[layer].keys[0]  # cached post-RoPE
        skew, q_energy, k_energy = skew_from(queries, keys)
        matrices[layer], query_energy[layer], key_energy[layer] = skew.cpu(), q_energy.cpu(), k_energy.cpu()

    hooks = [m.register_forward_hook(after_attention, with_kwargs=True) for m in access.modules]
    try:
        input_ids = torch.tensor([ids], device=loaded.device)
        loaded.model(input_ids=input_ids, past_key_values=DynamicCache(config=loaded.config), use_cache=True,
                     logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return matrices, query_energy, key_energy


def skew_from(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per KV head: A ``[kv_heads, d, d]`` and the column energies of Q·A and K·A ``[kv_heads, d]``.

    queries: ``[query_heads, tokens, d]`` (grouped by KV head, in order); keys ``[kv_heads, tokens, d]``.
    """
    kv_heads, _, dim = keys.shape
    grouped = queries.float().reshape(kv_heads, -1, dim)   # a KV head's group, stacked
    keys = keys.float()
    _, query_singular, query_vh = torch.linalg.svd(grouped, full_matrices=False)
    key_singular = torch.linalg.svdvals(keys)
    order = (query_singular * key_singular).argsort(dim=-1, descending=True)
    right_vectors = query_vh.transpose(-1, -2)                # columns: right singular vectors
    skew = right_vectors.gather(-1, order.unsqueeze(-2).expand(-1, dim, -1))
    return skew, (grouped @ skew).abs().sum(dim=1), (keys @ skew).abs().sum(dim=1)
