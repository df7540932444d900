"""InfiniGen's speculation and selection rule, as plain tensor functions.

The rule (Lee et al., OSDI 2024; `speculate_attention` in the authors' kv_selection_controller.py):
with speculative attention scores s (scaled logits) of the next layer, keep per head the tokens
with s > max(s) - alpha; the number fetched is that count averaged over heads (and batch rows),
capped by `max_num_kv`; each head then fetches its own top-n tokens.

Grouped-query attention (the authors' code is MHA-only): a KV head serves a group of query heads
and fetches one token set for all of them. kvprof scores each query head relative to its own
maximum (s - max s, the log of the softmax weight relative to the largest) and aggregates over
the group by the maximum, so a KV head keeps a token exactly when at least one of its query heads
would keep it under the paper's rule; the count, cap and per-head top-n are then taken over KV
heads. With one query head per KV head this is the paper's rule unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def speculative_scores(query: torch.Tensor, partial_skew: torch.Tensor, partial_keys: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """Speculative attention logits of one decode step, ``[batch, kv_heads, group, tokens]`` (float32).

    query: the next layer's query for the new token after its position embedding,
        ``[batch, query_heads, head_dim]``; query heads are grouped by KV head in order.
    partial_skew: per KV head, the skew matrix restricted to the partial columns,
        ``[kv_heads, head_dim, partial]``.
    partial_keys: the next layer's cached keys, skewed and restricted likewise,
        ``[batch, kv_heads, tokens, partial]``.
    """
    batch, query_heads, head_dim = query.shape
    kv_heads = partial_skew.shape[0]
    grouped = query.view(batch, kv_heads, query_heads // kv_heads, head_dim)
    partial_query = torch.einsum("bkgd,kdc->bkgc", grouped, partial_skew)
    scores = torch.einsum("bkgc,bksc->bkgs", partial_query, partial_keys)
    return scores.float().mul_(scaling)


def select_tokens(scores: torch.Tensor, alpha: float, max_num_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens each KV head fetches, without leaving the device.

    scores: ``[batch, kv_heads, group, tokens]`` speculative logits (see `speculative_scores`).
    Returns ``(positions, count)``: `positions` is ``[batch, kv_heads, k]`` with k = min(max_num_kv,
    tokens); its first `count` entries per head are the selected positions in ascending order and
    the rest are `tokens` (an out-of-range filler). `count` is a 0-d int64 tensor (the same for
    every head): min(floor(mean over batch rows and KV heads of the per-head count), max_num_kv).
    """
    tokens = scores.shape[-1]
    relative = scores - scores.amax(dim=-1, keepdim=True)        # <= 0; 0 at each query head's max
    per_kv_head = relative.amax(dim=2)                             # [batch, kv_heads, tokens]
    counts = (per_kv_head > -alpha).sum(dim=-1)                    # tokens above max - alpha, per KV head
    limit = min(max_num_kv, tokens)
    count = counts.sum().div(counts.numel(), rounding_mode="floor").clamp(max=limit)  # integer floor(mean)
    top = per_kv_head.topk(limit, dim=-1, sorted=True).indices    # best first
    unchosen = torch.arange(limit, device=scores.device) >= count
    positions = top.masked_fill(unchosen, tokens).sort(dim=-1).values
    return positions, count


def select_within_cap(scores: torch.Tensor, alpha: float, cap: int,
                      held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_tokens`' rule on fixed shapes, with no host value: graph-capturable.

    scores: ``[batch, kv_heads, group, slots]`` speculative logits over every slot of the cache,
    -inf where a slot holds no token yet; cap: the fixed `max_num_kv` (<= slots); held: (1,)
    int64 device tensor, the tokens held (the count is capped by min(cap, held), as
    `select_tokens` caps by min(max_num_kv, tokens)).

    Returns ``(positions, count)``: positions ``[batch, kv_heads, cap]`` int64 whose first `count`
    entries per head are the selected slots in ascending order (the rest are unspecified), and
    `count` (1,) int64, equal to `select_tokens`' count. The selected set is each head's top
    `count` tokens, found without a top-k of the positions or a sort: the count-th largest score
    per head (from the top-cap values) is a threshold, and the slots at or above it are
    compacted in slot order by a prefix sum (ties at the threshold: the earliest slots).
    """
    batch, kv_heads, _, slots = scores.shape
    relative = scores - scores.amax(dim=-1, keepdim=True)
    per_kv_head = relative.amax(dim=2)                                       # [batch, kv_heads, slots]
    counts = (per_kv_head > -alpha).sum(dim=-1)
    limit = held.clamp(max=cap)
    count = torch.minimum(counts.sum().div(counts.numel(), rounding_mode="floor").view(1), limit)
    top = per_kv_head.topk(cap, dim=-1, sorted=True).values                  # [batch, kv_heads, cap]
    index = (count - 1).clamp(min=0).view(1, 1, 1).expand(batch, kv_heads, 1)
    threshold = top.gather(-1, index)                                        # the count-th largest
    above = per_kv_head > threshold
    ties = per_kv_head == threshold
    wanted = count.view(1, 1, 1) - above.sum(dim=-1, keepdim=True)           # ties to keep: the earliest
    keep = (above | (ties & (ties.cumsum(dim=-1) <= wanted))) & (count > 0).view(1, 1, 1)
    order = keep.cumsum(dim=-1)
    target = torch.where(keep, order - 1, cap)                                # dropped ones: a spare column
    positions = torch.zeros((batch, kv_heads, cap + 1), dtype=torch.long, device=scores.device)
    slot_ids = torch.arange(slots, device=scores.device).expand(batch, kv_heads, slots)
    positions.scatter_(-1, target, slot_ids)
    return positions[..., :cap], count


# --- the same on a GPU, fused: three Triton kernels instead of some thirty small ones ----------------

_KERNELS: dict[str, Any] = {}
_SCRATCH: dict[tuple, torch.Tensor] = {}


def fused_selection_available(device: torch.device) -> bool:
    """Whether `select_fused` can run on `device` (CUDA with Triton; a kernel that fails to build
    at its first launch turns it off, see `select_fused`)."""
    if device.type != "cuda" or _KERNELS.get("failed"):
        return False
    if "score" not in _KERNELS:
        try:
            _define_selection_kernels()
        except Exception as exc:  # noqa: BLE001 - no Triton, or it cannot build: the torch path
            _KERNELS["failed"] = f"{type(exc).__name__}: {exc}"
            return False
    return True


def select_fused(partial_query: torch.Tensor, partial_keys: torch.Tensor, scaling: float, alpha: float, cap: int,
                 held: torch.Tensor, scratch: torch.Tensor, row_counts: torch.Tensor, positions: torch.Tensor,
                 count: torch.Tensor, bisection: bool = False) -> None:
    """`speculative_scores` then `select_within_cap`, in three kernels, into `positions`
    ``[batch, kv_heads, cap]`` and `count` (1,) (int64, preallocated; graph-safe, no host value).

    partial_query ``[batch, kv_heads, group, partial]`` (the model's dtype, as the eager path
    rounds it; any strides of batch and KV head, e.g. `partial_query`'s [kv_heads, batch] layout);
    partial_keys ``[batch, kv_heads, slots, partial]``; slots from `held` on are not scored.
    Kernels 1 and 2, per (batch row, KV head, block of 128 slots), so that a row's slots are
    scored by many programs at once: the scores (accumulated in float32, rounded to the
    model's dtype as a matmul in that dtype would, then scaled) and each query head's maximum in
    the block; then, from the blocks' maxima, the best relative score over the group per slot
    (into `scratch` ``[batch*kv_heads, slots]`` float32) and the count above -alpha, added to
    `row_counts` (int32, zeroed by kernel 1). Kernel 3, per row: the count rule, then the
    count-th largest score by a radix select on the scores' order-preserving 32-bit keys (four
    passes over the row, one per byte from the top, each a 256-bin histogram of that byte over
    the keys that start with the bytes found so far), then a prefix-sum compaction in slot order
    (ties at the threshold: the earliest slots); up to 8K slots per load.

    bisection: kernel 3 finds the threshold by the 32-round bisection it used before (34 passes
    over the row), the baseline of benchmarks/infinigen_gpu.py; it selects the same.
    """
    import triton

    batch, kv_heads, group, width = partial_query.shape
    if partial_query.stride(3) != 1 or partial_query.stride(2) != width:
        raise ValueError("select_fused: each KV head's partial query must be a contiguous [group, partial]")
    slots = partial_keys.shape[2]
    rows = batch * kv_heads
    blocks = triton.cdiv(slots, SCORE_BLOCK)
    shapes = dict(KV_HEADS=kv_heads, GROUP=group, WIDTH=width, GROUP_P=max(16, triton.next_power_of_2(group)),
                  WIDTH_P=max(16, triton.next_power_of_2(width)), BLOCK=SCORE_BLOCK)
    strides = partial_query.stride(0), partial_query.stride(1)
    block_best = _block_best(rows, blocks, shapes["GROUP_P"], partial_keys.device)
    _KERNELS["block_max"][(rows, blocks)](partial_query, partial_keys, held, block_best, row_counts, slots,
                                          float(scaling), *strides, BLOCKS=blocks, **shapes, num_warps=4)
    _KERNELS["score"][(rows, blocks)](partial_query, partial_keys, held, block_best, scratch, row_counts, slots,
                                      float(scaling), float(alpha), *strides, BLOCKS=blocks,
                                      BLOCKS_P=triton.next_power_of_2(blocks), **shapes, num_warps=4)
    select_block = min(triton.next_power_of_2(slots), SELECT_BLOCK)
    _KERNELS["bisection_select" if bisection else "select"][(rows,)](
        scratch, row_counts, held, positions, count, rows, slots, cap,
        ROWS_P=triton.next_power_of_2(rows), BLOCK=select_block, num_warps=16 if select_block >= 4096 else 4)


def rotate_query(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_heads: int,
                 rotated: torch.Tensor) -> torch.Tensor:
    """The speculative query's RoPE in one kernel: `apply_rotary_pos_emb`'s q*cos + rotate_half(q)*sin
    (Llama's half rotation), rounded as torch's ops round (bit-identical to them).

    query: one token's ``[batch, 1, query_heads * head_dim]`` (the q projection's output); cos, sin:
    ``[batch, 1, head_dim]``; rotated: the output ``[kv_heads, batch * group, head_dim]`` (query
    heads grouped by KV head, the layout `partial_query` multiplies)."""
    batch, dim = query.shape[0], cos.shape[-1]
    query_heads = query.shape[-1] // dim
    if not (query.is_contiguous() and cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
            and cos.shape[0] in (1, batch) and dim % 2 == 0
            and rotated.shape == (kv_heads, batch * query_heads // kv_heads, dim)):
        raise ValueError("rotate_query: unexpected query, cos/sin or output layout")
    import triton

    trig_stride = cos.stride(0) if cos.shape[0] == batch else 0   # one row of cos/sin for all: broadcast
    _KERNELS["rope"][(batch * query_heads,)](query, cos, sin, rotated, trig_stride, batch, HEADS=query_heads,
                                             GROUP=query_heads // kv_heads, DIM=dim,
                                             DIM_P=triton.next_power_of_2(dim), num_warps=1)
    return rotated


def partial_query(rotated: torch.Tensor, partial_skew: torch.Tensor, out: torch.Tensor,
                  batch: int) -> torch.Tensor:
    """`speculative_scores`' partial query, ``einsum("bkgd,kdc->bkgc")``, as the one `torch.bmm`
    that einsum makes of it, on `rotate_query`'s layout: rotated ``[kv_heads, batch * group, dim]``,
    partial_skew ``[kv_heads, dim, partial]``, out ``[kv_heads, batch * group, partial]``.
    Returns out viewed ``[batch, kv_heads, group, partial]`` (strided; `select_fused` takes it)."""
    torch.bmm(rotated, partial_skew, out=out)
    kv_heads, rows, width = out.shape
    return out.view(kv_heads, batch, rows // batch, width).permute(1, 0, 2, 3)


SCORE_BLOCK = 128     # slots per program of the score kernels: (rows x slots / 128) programs
SELECT_BLOCK = 8192   # slots the select kernel loads at once: up to 8K slots, one load per pass


def _block_best(rows: int, blocks: int, group_p: int, device: torch.device) -> torch.Tensor:
    """Each score block's per-query-head maximum (float32 scratch), allocated once per shape
    (during the eager warm-up, so a captured graph reuses it)."""
    key = ("block_best", rows, blocks, group_p, str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty((rows, blocks, group_p), dtype=torch.float32, device=device)
    return _SCRATCH[key]


def _define_selection_kernels() -> None:
    from kvprof_infinigen import selection_kernels as k  # imports Triton: only when a GPU asks

    _KERNELS.update(block_max=k.block_max_kernel, score=k.score_kernel, select=k.radix_select_kernel,
                    bisection_select=k.bisection_select_kernel, rope=k.rope_query_kernel)
