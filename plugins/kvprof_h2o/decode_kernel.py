"""H2O's decode step for one layer in two Triton kernels (the torch path is `FastH2OPolicy._torch_decode`).

The torch step is ~20 small kernels per layer; at an 8K prompt on an H200 they cost more than the
smaller cache saves. Here, as in flash-decoding, the slots of each (row, KV head) are cut into
`splits` chunks so that a batch of one still fills the GPU:

1. `attend_kernel`, one program per (row, KV head, chunk): writes the step's key and value into
   the free slot (if it lies in the chunk), computes the logits of the group's query heads over
   the chunk (the query scaled and the logits rounded in the model's dtype, as the torch matmul
   does; empty slots masked with the dtype's minimum, as `masked_fill` does), stores them to a
   float32 scratch, and keeps the chunk's softmax maximum, sum and unnormalised output.
2. `finish_kernel`, one program per (row, KV head): merges the chunks into the output, then
   walks the slots once more: the float32 softmax weights from the stored logits, summed over
   the group into the scores; the slot's position and score reset for the new token; and the
   next free slot by `fast.next_free`'s rule (an empty usable slot first, else the
   lowest-scoring slot outside the recent window; slots >= cap unusable; ties to the lowest
   index, as `argmin` breaks them). The victim's position (-1 if the slot was empty) goes to
   `evicted[step]`, `step` read from the device.

Everything is read from device tensors and every buffer has a fixed shape per layer: the pair
is captured in the decode step's CUDA graph like the torch step.

Where it differs from the torch step: the order of float32 sums (the logits' dot products, the
softmax denominator, merged per chunk) and the output's weights, which are rounded to the model
dtype relative to their chunk's maximum rather than after normalisation. A near-tie in the
scores may therefore fall the other way; the output differs at the model dtype's rounding.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_KERNELS: dict[str, Any] = {}
BLOCK_N = 64      # slots per block in the attend kernel
MAX_BLOCK_W = 2048  # slots per block in the finish kernel (one block at an 8K prompt's 20 % budget)
_SM_COUNT: dict[int, int] = {}


def default_splits(rows_heads: int, width: int, device: torch.device) -> int:
    """Chunks per (row, KV head): at most two programs per SM (rounded down: at batch 16 on an
    H200, 2 chunks ran a layer in 0.049 ms, 3 in 0.058), at least one block of slots each."""
    if device.type != "cuda":
        return min(4, _blocks(width))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = 2 * _SM_COUNT[index] // rows_heads
    return max(1, min(wanted, _blocks(width)))


def _blocks(width: int) -> int:
    return -(-width // BLOCK_N)


def fused_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache_keys: torch.Tensor,
                 cache_values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor, free: torch.Tensor,
                 now: torch.Tensor, recent: torch.Tensor, cap: torch.Tensor, evicted: torch.Tensor,
                 step: torch.Tensor, scaling: float, splits: int | None = None) -> torch.Tensor:
    """One layer's H2O decode step, in place; returns the attention output (B, 1, Hq, D).

    query (B, Hq, 1, D); keys, values (B, Hkv, 1, D) the step's new token; cache_keys,
    cache_values (B, Hkv, W, D); positions (B, Hkv, W) int64 (-1: empty); scores (B, Hkv, W)
    float32; free (B, Hkv) int64 the slot the new token goes to (updated to the next one);
    now (B, 1) the new token's position; recent (B,) and cap (B, 1, 1) per-row window and usable
    slots; evicted (T, B, Hkv) int64 this layer's victims by step (a view is fine, its last two
    dimensions contiguous); step (1,) the row of `evicted` to write.
    """
    import triton

    if not _KERNELS:
        _define_kernels()
    batch, kv_heads, width, dim = cache_keys.shape
    q_heads = query.shape[1]
    group = q_heads // kv_heads
    rows_heads = batch * kv_heads
    for name, tensor in (("cache_keys", cache_keys), ("cache_values", cache_values), ("positions", positions),
                         ("scores", scores), ("free", free)):
        if not tensor.is_contiguous():
            raise ValueError(f"fused_decode: {name} must be contiguous (it is updated in place)")
    if evicted.stride(2) != 1 or evicted.stride(1) != kv_heads:
        raise ValueError("fused_decode: evicted's last two dimensions must be contiguous")
    splits = splits or default_splits(rows_heads, width, cache_keys.device)
    splits = max(1, min(splits, _blocks(width)))
    chunk = -(-_blocks(width) // splits) * BLOCK_N
    pad_group = max(16, triton.next_power_of_2(group))  # tl.dot wants at least 16 rows
    block_d = max(16, triton.next_power_of_2(dim))
    device = cache_keys.device
    query, keys, values = query.contiguous(), keys.contiguous(), values.contiguous()
    logits = torch.empty((rows_heads, group, width), dtype=torch.float32, device=device)
    maxima = torch.empty((rows_heads, splits, pad_group), dtype=torch.float32, device=device)
    sums = torch.empty_like(maxima)
    partial = torch.empty((rows_heads, splits, pad_group, block_d), dtype=torch.float32, device=device)
    output = torch.empty((batch, 1, q_heads, dim), dtype=query.dtype, device=device)
    masked = torch.finfo(query.dtype).min
    # float32 operands: exact float32 products (no TF32). Triton's interpreter multiplies bf16/fp16
    # operands wrongly, so there the products are taken in float32 too (the same exact products).
    dot_fp32 = query.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    _KERNELS["attend"][(rows_heads, splits)](
        query, keys, values, cache_keys, cache_values, positions, free, logits, maxima, sums, partial,
        width, chunk, float(scaling), masked, KV_HEADS=kv_heads, GROUP=group, DIM=dim, PAD_GROUP=pad_group,
        BLOCK_D=block_d, BLOCK_N=BLOCK_N, SPLITS=splits, DOT_FP32=dot_fp32,
        MODEL_BF16=query.dtype == torch.bfloat16)
    _KERNELS["finish"][(rows_heads,)](
        logits, maxima, sums, partial, output, positions, scores, free, now, recent, cap, evicted, step,
        evicted.stride(0), width, KV_HEADS=kv_heads, GROUP=group, DIM=dim, PAD_GROUP=pad_group,
        GROUP_P=triton.next_power_of_2(group), BLOCK_D=block_d,
        BLOCK_W=min(MAX_BLOCK_W, triton.next_power_of_2(width)), SPLITS=splits,
        SPLITS_P=triton.next_power_of_2(splits), num_warps=8)
    return output


def _define_kernels() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def attend_kernel(q_ptr, new_k_ptr, new_v_ptr, k_ptr, v_ptr, pos_ptr, free_ptr, logits_ptr,
                      max_ptr, sum_ptr, partial_ptr, width, chunk, scaling, masked, KV_HEADS: tl.constexpr,
                      GROUP: tl.constexpr, DIM: tl.constexpr, PAD_GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, DOT_FP32: tl.constexpr,
                      MODEL_BF16: tl.constexpr):
        row_head = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        g = tl.arange(0, PAD_GROUP)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < DIM
        # The group's query heads are rows_head * GROUP + g of (B, Hq, D); scaled in the model dtype.
        q = tl.load(q_ptr + (row_head * GROUP + g)[:, None] * DIM + d[None, :],
                    mask=(g[:, None] < GROUP) & d_ok[None, :], other=0.0)
        q = q.to(tl.float32) * scaling
        if MODEL_BF16:  # round to nearest even by hand: Triton's interpreter truncates
            q = ((q.to(tl.uint32, bitcast=True) + 0x7FFF + ((q.to(tl.uint32, bitcast=True) >> 16) & 1))
                 >> 16 << 16).to(tl.float32, bitcast=True)
        q = q.to(q_ptr.dtype.element_ty)
        free = tl.load(free_ptr + row_head)
        new_k = tl.load(new_k_ptr + row_head * DIM + d, mask=d_ok, other=0.0)
        new_v = tl.load(new_v_ptr + row_head * DIM + d, mask=d_ok, other=0.0)
        begin = split * chunk
        end = tl.minimum(begin + chunk, width)
        if (free >= begin) & (free < end):
            tl.store(k_ptr + (row_head * width + free) * DIM + d, new_k, mask=d_ok)
            tl.store(v_ptr + (row_head * width + free) * DIM + d, new_v, mask=d_ok)
        best = tl.full([PAD_GROUP], float("-inf"), tl.float32)
        total = tl.zeros([PAD_GROUP], tl.float32)
        acc = tl.zeros([PAD_GROUP, BLOCK_D], tl.float32)
        for start in range(begin, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = n < end
            is_new = n == free  # read the new token from registers: no ordering against the store above
            offsets = (row_head * width + n)[:, None] * DIM + d[None, :]
            k = tl.load(k_ptr + offsets, mask=inside[:, None] & d_ok[None, :], other=0.0)
            k = tl.where(is_new[:, None], new_k[None, :], k)
            v = tl.load(v_ptr + offsets, mask=inside[:, None] & d_ok[None, :], other=0.0)
            v = tl.where(is_new[:, None], new_v[None, :], v)
            pos = tl.load(pos_ptr + row_head * width + n, mask=inside, other=-1)
            occupied = (pos >= 0) | is_new
            if DOT_FP32:
                x = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                x = tl.dot(q, tl.trans(k))
            if MODEL_BF16:  # the torch matmul's rounding to the model dtype (by hand, as above)
                x = ((x.to(tl.uint32, bitcast=True) + 0x7FFF + ((x.to(tl.uint32, bitcast=True) >> 16) & 1))
                     >> 16 << 16).to(tl.float32, bitcast=True)
            else:
                x = x.to(k_ptr.dtype.element_ty).to(tl.float32)
            x = tl.where(occupied[None, :], x, masked)
            tl.store(logits_ptr + (row_head * GROUP + g)[:, None] * width + n[None, :], x,
                     mask=(g[:, None] < GROUP) & inside[None, :])
            x = tl.where(inside[None, :], x, float("-inf"))
            new_best = tl.maximum(best, tl.max(x, axis=1))
            p = tl.exp(x - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(p, axis=1)
            p_model = p.to(v_ptr.dtype.element_ty)  # the torch step rounds its weights too
            if DOT_FP32:
                acc = acc * rescale[:, None] + tl.dot(p_model.to(tl.float32), v.to(tl.float32),
                                                      input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p_model, v)
            best = new_best
        slot = row_head * SPLITS + split
        real = g < GROUP  # the padding rows of the group are not stored (nor read)
        tl.store(max_ptr + slot * PAD_GROUP + g, best, mask=real)
        tl.store(sum_ptr + slot * PAD_GROUP + g, total, mask=real)
        tl.store(partial_ptr + (slot * PAD_GROUP + g)[:, None] * BLOCK_D + d[None, :], acc, mask=real[:, None])

    @triton.jit
    def finish_kernel(logits_ptr, max_ptr, sum_ptr, partial_ptr, out_ptr, pos_ptr, scores_ptr, free_ptr, now_ptr,
                      recent_ptr, cap_ptr, evicted_ptr, step_ptr, evicted_step_stride, width,
                      KV_HEADS: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr, PAD_GROUP: tl.constexpr,
                      GROUP_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, SPLITS: tl.constexpr,
                      SPLITS_P: tl.constexpr):
        row_head = tl.program_id(0).to(tl.int64)
        row = row_head // KV_HEADS
        g = tl.arange(0, GROUP_P)
        g_ok = g < GROUP
        d = tl.arange(0, BLOCK_D)
        s = tl.arange(0, SPLITS_P)
        # Merge the chunks: the softmax's maximum and sum, and the output.
        chunk_max = tl.load(max_ptr + (row_head * SPLITS + s)[:, None] * PAD_GROUP + g[None, :],
                            mask=(s[:, None] < SPLITS) & g_ok[None, :], other=float("-inf"))
        best = tl.max(chunk_max, axis=0)
        best = tl.where(g_ok, best, 0.0)
        total = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, BLOCK_D], tl.float32)
        for split in range(SPLITS):
            slot = row_head * SPLITS + split
            weight = tl.exp(tl.load(max_ptr + slot * PAD_GROUP + g, mask=g_ok, other=float("-inf")) - best)
            total += weight * tl.load(sum_ptr + slot * PAD_GROUP + g, mask=g_ok, other=0.0)
            acc += weight[:, None] * tl.load(partial_ptr + (slot * PAD_GROUP + g)[:, None] * BLOCK_D + d[None, :],
                                             mask=g_ok[:, None], other=0.0)
        total = tl.where(g_ok, total, 1.0)
        out = acc / total[:, None]
        tl.store(out_ptr + (row_head * GROUP + g)[:, None] * DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & (d[None, :] < DIM))
        # The scores, the new token's bookkeeping and the next free slot.
        free = tl.load(free_ptr + row_head)
        now = tl.load(now_ptr + row)
        oldest_recent = now - tl.load(recent_ptr + row)
        cap = tl.load(cap_ptr + row)
        lowest = tl.full([], float("inf"), tl.float32)
        chosen = tl.full([], 0, tl.int64)
        for start in range(0, width, BLOCK_W):
            n = start + tl.arange(0, BLOCK_W)
            inside = n < width
            x = tl.load(logits_ptr + (row_head * GROUP + g)[:, None] * width + n[None, :],
                        mask=g_ok[:, None] & inside[None, :], other=float("-inf"))
            weights = tl.where(g_ok[:, None], tl.exp(x - best[:, None]) / total[:, None], 0.0)
            is_new = n == free
            pos = tl.load(pos_ptr + row_head * width + n, mask=inside, other=-1)
            pos = tl.where(is_new, now, pos)
            score = tl.load(scores_ptr + row_head * width + n, mask=inside, other=0.0)
            score = tl.where(is_new, 0.0, score) + tl.sum(weights, axis=0)
            tl.store(scores_ptr + row_head * width + n, score, mask=inside)
            valid = pos >= 0
            usable = n < cap
            priority = tl.where((valid & (pos > oldest_recent)) | ~usable, float("inf"), score)
            priority = tl.where(~valid & usable, float("-inf"), priority)
            priority = tl.where(inside, priority, float("inf"))
            block_low = tl.min(priority, axis=0)
            block_first = tl.min(tl.where(priority == block_low, n, width + BLOCK_W), axis=0).to(tl.int64)
            better = block_low < lowest
            chosen = tl.where(better, block_first, chosen)
            lowest = tl.where(better, block_low, lowest)
        tl.store(pos_ptr + row_head * width + free, now)
        victim = tl.load(pos_ptr + row_head * width + chosen)
        victim = tl.where(chosen == free, now, victim)
        tl.store(free_ptr + row_head, chosen)
        tl.store(evicted_ptr + tl.load(step_ptr) * evicted_step_stride + row_head, victim)

    _KERNELS["attend"] = attend_kernel
    _KERNELS["finish"] = finish_kernel
