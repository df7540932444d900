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


# --- the same on a GPU, fused: two Triton kernels instead of some thirty small ones ----------------

_KERNELS: dict[str, object] = {}


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
                 count: torch.Tensor) -> None:
    """`speculative_scores` then `select_within_cap`, in two kernels, into `positions`
    ``[batch, kv_heads, cap]`` and `count` (1,) (int64, preallocated; graph-safe, no host value).

    partial_query ``[batch, kv_heads, group, partial]`` (the model's dtype, as the eager path
    rounds it); partial_keys ``[batch, kv_heads, slots, partial]``; slots from `held` on are not
    scored. Kernel 1, per (batch row, KV head): the scores (accumulated in float32, rounded to the
    model's dtype as a matmul in that dtype would, then scaled), each query head's maximum, the
    best relative score over the group per slot (into `scratch` ``[batch*kv_heads, slots]``
    float32) and the count above -alpha (`row_counts`, int32). Kernel 2, per row: the count rule,
    then the count-th largest score by bisection on the scores' order-preserving integer keys,
    then a prefix-sum compaction in slot order (ties at the threshold: the earliest slots).
    """
    import triton

    batch, kv_heads, group, width = partial_query.shape
    slots = partial_keys.shape[2]
    rows = batch * kv_heads
    _KERNELS["score"][(rows,)](
        partial_query, partial_keys, held, scratch, row_counts, slots, float(scaling), float(alpha),
        GROUP=group, WIDTH=width, GROUP_P=max(16, triton.next_power_of_2(group)),
        WIDTH_P=max(16, triton.next_power_of_2(width)), BLOCK=128, num_warps=4)
    _KERNELS["select"][(rows,)](
        scratch, row_counts, held, positions, count, rows, slots, cap,
        ROWS_P=triton.next_power_of_2(rows), BLOCK=1024, num_warps=4)


def _define_selection_kernels() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def score_kernel(pq, pk, held_ptr, scratch, row_counts, slots, scaling, alpha,
                     GROUP: tl.constexpr, WIDTH: tl.constexpr, GROUP_P: tl.constexpr, WIDTH_P: tl.constexpr,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        held = tl.load(held_ptr)
        g = tl.arange(0, GROUP_P)
        c = tl.arange(0, WIDTH_P)
        q = tl.load(pq + row * GROUP * WIDTH + g[:, None] * WIDTH + c[None, :],
                    mask=(g[:, None] < GROUP) & (c[None, :] < WIDTH), other=0.0)
        best = tl.full([GROUP_P], float("-inf"), tl.float32)
        for start in range(0, slots, BLOCK):
            s = start + tl.arange(0, BLOCK)
            k = tl.load(pk + (row * slots + s)[:, None] * WIDTH + c[None, :],
                        mask=(s[:, None] < held) & (c[None, :] < WIDTH), other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")   # [GROUP_P, BLOCK], float32 sums
            scores = scores.to(pk.dtype.element_ty).to(tl.float32) * scaling
            scores = tl.where((s[None, :] < held) & (g[:, None] < GROUP), scores, float("-inf"))
            best = tl.maximum(best, tl.max(scores, axis=1))
        total = tl.zeros([BLOCK], tl.int32)
        for start in range(0, slots, BLOCK):
            s = start + tl.arange(0, BLOCK)
            k = tl.load(pk + (row * slots + s)[:, None] * WIDTH + c[None, :],
                        mask=(s[:, None] < held) & (c[None, :] < WIDTH), other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            scores = scores.to(pk.dtype.element_ty).to(tl.float32) * scaling
            relative = tl.where(g[:, None] < GROUP, scores - best[:, None], float("-inf"))
            per_slot = tl.max(relative, axis=0)
            per_slot = tl.where(s < held, per_slot, float("-inf"))
            tl.store(scratch + row * slots + s, per_slot, mask=s < slots)
            total += (per_slot > -alpha).to(tl.int32)
        tl.store(row_counts + row, tl.sum(total, axis=0))

    @triton.jit
    def select_kernel(scratch, row_counts, held_ptr, positions, count_ptr, rows, slots, cap,
                      ROWS_P: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, ROWS_P)
        total = tl.sum(tl.load(row_counts + r, mask=r < rows, other=0).to(tl.int64), axis=0)
        held = tl.load(held_ptr)
        count = tl.minimum(total // rows, tl.minimum(held, cap))
        if row == 0:
            tl.store(count_ptr, count)
        # The count-th largest key: the largest T with #(key >= T) >= count (bisection, 32 rounds).
        low = tl.full([], -2147483648, tl.int64)
        high = tl.full([], 2147483648, tl.int64)
        for _ in range(32):
            mid = low + (high - low) // 2
            seen = tl.zeros([BLOCK], tl.int32)
            for start in range(0, slots, BLOCK):
                s = start + tl.arange(0, BLOCK)
                bits = tl.load(scratch + row * slots + s, mask=s < slots, other=float("-inf")).to(tl.int32,
                                                                                                   bitcast=True)
                key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
                seen += ((key >= mid) & (s < slots)).to(tl.int32)
            enough = tl.sum(seen, axis=0) >= count
            low = tl.where(enough, mid, low)
            high = tl.where(enough, high, mid)
        greater = tl.zeros([BLOCK], tl.int32)
        for start in range(0, slots, BLOCK):
            s = start + tl.arange(0, BLOCK)
            bits = tl.load(scratch + row * slots + s, mask=s < slots, other=float("-inf")).to(tl.int32, bitcast=True)
            key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
            greater += ((key > low) & (s < slots)).to(tl.int32)
        ties_wanted = count - tl.sum(greater, axis=0)
        kept = tl.zeros([], tl.int64)
        ties = tl.zeros([], tl.int64)
        for start in range(0, slots, BLOCK):
            s = start + tl.arange(0, BLOCK)
            bits = tl.load(scratch + row * slots + s, mask=s < slots, other=float("-inf")).to(tl.int32, bitcast=True)
            key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
            inside = s < slots
            tie = (key == low) & inside
            tie_rank = ties + tl.cumsum(tie.to(tl.int64), axis=0)
            keep = ((key > low) & inside) | (tie & (tie_rank <= ties_wanted))  # count 0: low is the top key
            rank = kept + tl.cumsum(keep.to(tl.int64), axis=0) - 1
            tl.store(positions + row * cap + rank, s.to(tl.int64), mask=keep & (rank < cap))
            kept += tl.sum(keep.to(tl.int64), axis=0)
            ties += tl.sum(tie.to(tl.int64), axis=0)

    _KERNELS.update(score=score_kernel, select=select_kernel)
