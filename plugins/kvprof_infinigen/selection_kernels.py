"""The Triton kernels of `selection.select_fused` (imported only when they are first needed).

See `select_fused` for what each computes; `selection.select_within_cap` is the same rule in torch.
`rope_query_kernel` is the speculative query's RoPE (see `selection.rotate_query`).
`bisection_select_kernel` is the select kernel `radix_select_kernel` replaced (34 passes over a
row instead of 5), kept as the baseline of benchmarks/infinigen_gpu.py.
"""

import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 `x` rounded to `dtype` (to nearest, ties to even, as torch rounds), as float32. For
    bfloat16 by integer ops on the bits: Triton's interpreter truncates in `.to(tl.bfloat16)`."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def rope_query_kernel(query, cos, sin, rotated, trig_stride, batch, HEADS: tl.constexpr, GROUP: tl.constexpr,
                      DIM: tl.constexpr, DIM_P: tl.constexpr):
    """One (batch row, query head) of `apply_rotary_pos_emb`'s query, q*cos + rotate_half(q)*sin,
    rounded to the query's dtype after each product and after the sum, as torch's three ops
    round; stored at [kv_head, batch row, group member] (the layout `torch.bmm` takes)."""
    program = tl.program_id(0)
    row = program // HEADS
    head = program % HEADS
    d = tl.arange(0, DIM_P)
    inside = d < DIM
    half = DIM // 2
    x = tl.load(query + program * DIM + d, mask=inside, other=0.0).to(tl.float32)
    partner = tl.load(query + program * DIM + (d + half) % DIM, mask=inside, other=0.0).to(tl.float32)
    turned = tl.where(d < half, -partner, partner)                 # rotate_half: cat(-x2, x1)
    c = tl.load(cos + row * trig_stride + d, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(sin + row * trig_stride + d, mask=inside, other=0.0).to(tl.float32)
    dtype = rotated.dtype.element_ty
    out = _rounded(_rounded(x * c, dtype) + _rounded(turned * s, dtype), dtype).to(dtype)
    member = (head // GROUP) * batch * GROUP + row * GROUP + head % GROUP
    tl.store(rotated + member * DIM + d, out, mask=inside)


@triton.jit
def _scores(pq, pk, row, s, held, c, g, scaling, q_batch_stride, q_head_stride, KV_HEADS: tl.constexpr,
            GROUP: tl.constexpr, WIDTH: tl.constexpr):
    """[GROUP_P, BLOCK] scaled scores of slots `s` (pk: the row's keys), -inf where a slot or a
    query head is not real."""
    head_query = pq + (row // KV_HEADS) * q_batch_stride + (row % KV_HEADS) * q_head_stride
    q = tl.load(head_query + g[:, None] * WIDTH + c[None, :],
                mask=(g[:, None] < GROUP) & (c[None, :] < WIDTH), other=0.0)
    k = tl.load(pk + s[:, None] * WIDTH + c[None, :],
                mask=(s[:, None] < held) & (c[None, :] < WIDTH), other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee")   # float32 sums
    scores = scores.to(pk.dtype.element_ty).to(tl.float32) * scaling
    return tl.where((s[None, :] < held) & (g[:, None] < GROUP), scores, float("-inf"))


@triton.jit
def block_max_kernel(pq, pk, held_ptr, block_best, row_counts, slots, scaling, q_batch_stride, q_head_stride,
                     BLOCKS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, WIDTH: tl.constexpr,
                     GROUP_P: tl.constexpr, WIDTH_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    g = tl.arange(0, GROUP_P)
    s = block * BLOCK + tl.arange(0, BLOCK)
    scores = _scores(pq, pk + row * slots * WIDTH, row, s, tl.load(held_ptr), tl.arange(0, WIDTH_P), g,
                     scaling, q_batch_stride, q_head_stride, KV_HEADS, GROUP, WIDTH)
    tl.store(block_best + (row * BLOCKS + block) * GROUP_P + g, tl.max(scores, axis=1))
    if block == 0:
        tl.store(row_counts + row, 0)  # score_kernel adds to it (here rather than a memset launch)


@triton.jit
def score_kernel(pq, pk, held_ptr, block_best, scratch, row_counts, slots, scaling, alpha, q_batch_stride,
                 q_head_stride, BLOCKS: tl.constexpr, BLOCKS_P: tl.constexpr, KV_HEADS: tl.constexpr,
                 GROUP: tl.constexpr, WIDTH: tl.constexpr, GROUP_P: tl.constexpr, WIDTH_P: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    g = tl.arange(0, GROUP_P)
    b = tl.arange(0, BLOCKS_P)
    maxima = tl.load(block_best + (row * BLOCKS + b[:, None]) * GROUP_P + g[None, :], mask=b[:, None] < BLOCKS,
                     other=float("-inf"))
    best = tl.max(maxima, axis=0)                                  # each query head's maximum
    s = block * BLOCK + tl.arange(0, BLOCK)
    held = tl.load(held_ptr)
    scores = _scores(pq, pk + row * slots * WIDTH, row, s, held, tl.arange(0, WIDTH_P), g, scaling, q_batch_stride,
                     q_head_stride, KV_HEADS, GROUP, WIDTH)
    relative = tl.where(g[:, None] < GROUP, scores - best[:, None], float("-inf"))
    per_slot = tl.where(s < held, tl.max(relative, axis=0), float("-inf"))
    tl.store(scratch + row * slots + s, per_slot, mask=s < slots)
    tl.atomic_add(row_counts + row, tl.sum((per_slot > -alpha).to(tl.int32), axis=0))


@triton.jit
def _count(row_counts, held_ptr, count_ptr, row, rows, cap, ROWS_P: tl.constexpr):
    """The count rule: min(floor(mean of the rows' counts), held, cap); row 0 stores it."""
    r = tl.arange(0, ROWS_P)
    total = tl.sum(tl.load(row_counts + r, mask=r < rows, other=0).to(tl.int64), axis=0)
    count = tl.minimum(total // rows, tl.minimum(tl.load(held_ptr), cap))
    if row == 0:
        tl.store(count_ptr, count)
    return count


@triton.jit
def _keys(scores, s, slots):
    """Slots `s`' scores as int64 keys in [0, 2**32) in the scores' order: the float's bits, with
    a negative's magnitude bits flipped, as a signed int32, then shifted up by 2**31."""
    bits = tl.load(scores + s, mask=s < slots, other=float("-inf")).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _compact(scores, positions, row, slots, cap, threshold, ties_wanted, BLOCK: tl.constexpr):
    """Stores, in slot order, the slots whose key is above `threshold` and the first
    `ties_wanted` equal to it (a prefix sum per block of slots)."""
    kept = tl.zeros([], tl.int64)
    ties = tl.zeros([], tl.int64)
    for start in range(0, slots, BLOCK):
        s = start + tl.arange(0, BLOCK)
        key = _keys(scores, s, slots)
        inside = s < slots
        tie = (key == threshold) & inside
        tie_rank = ties + tl.cumsum(tie.to(tl.int64), axis=0)
        keep = ((key > threshold) & inside) | (tie & (tie_rank <= ties_wanted))
        rank = kept + tl.cumsum(keep.to(tl.int64), axis=0) - 1
        tl.store(positions + row * cap + rank, s.to(tl.int64), mask=keep & (rank < cap))
        kept += tl.sum(keep.to(tl.int64), axis=0)
        ties += tl.sum(tie.to(tl.int64), axis=0)


@triton.jit
def radix_select_kernel(scratch, row_counts, held_ptr, positions, count_ptr, rows, slots, cap,
                        ROWS_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    count = _count(row_counts, held_ptr, count_ptr, row, rows, cap, ROWS_P)
    scores = scratch + row * slots
    # The count-th largest key, a byte at a time from the top: each round is one pass, a histogram
    # of the next byte over the keys that start with the bytes found so far (`prefix`); the byte
    # is the bin where the count from the top reaches `wanted`, the threshold's rank among them.
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int64)
    wanted = count
    for shift in tl.static_range(24, -8, -8):
        histogram = tl.zeros([256], tl.int32)
        for start in range(0, slots, BLOCK):
            s = start + tl.arange(0, BLOCK)
            key = _keys(scores, s, slots)
            digit = ((key >> shift) & 255).to(tl.int32)
            histogram += tl.histogram(digit, 256, mask=(s < slots) & ((key >> (shift + 8)) == prefix))
        at_or_above = tl.sum(histogram, axis=0) - tl.cumsum(histogram, axis=0) + histogram
        chosen = tl.sum((at_or_above >= wanted).to(tl.int32), axis=0) - 1   # count 0: 255, the top
        wanted -= tl.sum(tl.where(bins > chosen, histogram, 0), axis=0).to(tl.int64)
        prefix = prefix * 256 + chosen
    # Now `prefix` is the count-th largest key and `wanted` the ties at it to keep (count 0: none).
    _compact(scores, positions, row, slots, cap, prefix, wanted, BLOCK)


@triton.jit
def bisection_select_kernel(scratch, row_counts, held_ptr, positions, count_ptr, rows, slots, cap,
                            ROWS_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    count = _count(row_counts, held_ptr, count_ptr, row, rows, cap, ROWS_P)
    scores = scratch + row * slots
    # The count-th largest key: the largest T with #(key >= T) >= count (bisection, 32 rounds).
    low = tl.zeros([], tl.int64)
    high = tl.full([], 4294967296, tl.int64)
    for _ in range(32):
        mid = low + (high - low) // 2
        seen = tl.zeros([BLOCK], tl.int32)
        for start in range(0, slots, BLOCK):
            s = start + tl.arange(0, BLOCK)
            seen += ((_keys(scores, s, slots) >= mid) & (s < slots)).to(tl.int32)
        enough = tl.sum(seen, axis=0) >= count
        low = tl.where(enough, mid, low)
        high = tl.where(enough, high, mid)
    greater = tl.zeros([BLOCK], tl.int32)
    for start in range(0, slots, BLOCK):
        s = start + tl.arange(0, BLOCK)
        greater += ((_keys(scores, s, slots) > low) & (s < slots)).to(tl.int32)
    _compact(scores, positions, row, slots, cap, low, count - tl.sum(greater, axis=0), BLOCK)
