"""The Triton kernels of `selection.select_fused` (imported only when they are first needed).

See `select_fused` for what each computes; `selection.select_within_cap` is the same rule in torch.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(pq, pk, row, s, held, c, g, scaling, GROUP: tl.constexpr, WIDTH: tl.constexpr):
    """[GROUP_P, BLOCK] scaled scores of slots `s` (pk: the row's keys), -inf where a slot or a
    query head is not real."""
    q = tl.load(pq + row * GROUP * WIDTH + g[:, None] * WIDTH + c[None, :],
                mask=(g[:, None] < GROUP) & (c[None, :] < WIDTH), other=0.0)
    k = tl.load(pk + s[:, None] * WIDTH + c[None, :],
                mask=(s[:, None] < held) & (c[None, :] < WIDTH), other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee")   # float32 sums
    scores = scores.to(pk.dtype.element_ty).to(tl.float32) * scaling
    return tl.where((s[None, :] < held) & (g[:, None] < GROUP), scores, float("-inf"))


@triton.jit
def block_max_kernel(pq, pk, held_ptr, block_best, slots, scaling, BLOCKS: tl.constexpr,
                     GROUP: tl.constexpr, WIDTH: tl.constexpr, GROUP_P: tl.constexpr, WIDTH_P: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    g = tl.arange(0, GROUP_P)
    s = block * BLOCK + tl.arange(0, BLOCK)
    scores = _scores(pq, pk + row * slots * WIDTH, row, s, tl.load(held_ptr), tl.arange(0, WIDTH_P), g,
                     scaling, GROUP, WIDTH)
    tl.store(block_best + (row * BLOCKS + block) * GROUP_P + g, tl.max(scores, axis=1))


@triton.jit
def score_kernel(pq, pk, held_ptr, block_best, scratch, row_counts, slots, scaling, alpha,
                 BLOCKS: tl.constexpr, BLOCKS_P: tl.constexpr, GROUP: tl.constexpr, WIDTH: tl.constexpr,
                 GROUP_P: tl.constexpr, WIDTH_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    g = tl.arange(0, GROUP_P)
    b = tl.arange(0, BLOCKS_P)
    maxima = tl.load(block_best + (row * BLOCKS + b[:, None]) * GROUP_P + g[None, :], mask=b[:, None] < BLOCKS,
                     other=float("-inf"))
    best = tl.max(maxima, axis=0)                                  # each query head's maximum
    s = block * BLOCK + tl.arange(0, BLOCK)
    held = tl.load(held_ptr)
    scores = _scores(pq, pk + row * slots * WIDTH, row, s, held, tl.arange(0, WIDTH_P), g, scaling, GROUP, WIDTH)
    relative = tl.where(g[:, None] < GROUP, scores - best[:, None], float("-inf"))
    per_slot = tl.where(s < held, tl.max(relative, axis=0), float("-inf"))
    tl.store(scratch + row * slots + s, per_slot, mask=s < slots)
    tl.atomic_add(row_counts + row, tl.sum((per_slot > -alpha).to(tl.int32), axis=0))


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
