"""The prefill attention mass of every key in two Triton kernels, without the score matrix.

`fast.torch_prefill_mass` visits blocks of queries with matmuls and a float32 softmax: exact, but at
an 8K prompt and batch 16 it is thousands of small launches per layer and the prefill of H2O
took 5.7x full's (H200). Here, as in flash attention, nothing of size L x L is ever stored:

1. `lse`: per (row, KV head, block of queries), the log-sum-exp of each query's visible logits,
   for all query heads of the KV head's group at once (their queries stacked into one tile, so
   a key block is loaded once for the group); online maximum and sum over key blocks up to the
   query block's end: causal.
2. `mass`: per (row, KV head, block of keys), the sum over the group's query heads and the real
   queries at or after the block of exp(logit - lse): the softmax weights, summed by column.

Both work in base 2 (logits scaled by log2(e), exp2), the cheap instruction.

Visibility is by position, as in `fast.torch_prefill_mass`: key j is seen by query i when
0 <= pos[j] <= pos[i]; padding (position -1) gives and receives nothing. Logits are accumulated
in float32 (the torch pass rounds them to the model's dtype first: near-ties may differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_KERNELS: dict[str, Any] = {}
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MassTiles:
    """Tile sizes and launch settings of the two kernels (`benchmarks/h2o_gpu.py` compares some)."""

    block_m: int = 32   # queries per block, per query head: a tile stacks the group's heads
    block_n: int = 64   # keys per block
    warps: int = 4
    stages: int = 2


TILES = MassTiles()


def triton_mass(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float,
                tiles: MassTiles = TILES, lse: torch.Tensor | None = None) -> torch.Tensor:
    """query (B, Hq, L, D), keys (B, Hkv, L, D), positions (B, L) (-1: padding) -> mass (B, Hkv, L)
    float32; the same quantity as `fast.torch_prefill_mass`. `lse` (B, Hq, L), each query's
    natural log-sum-exp of its scaled logits (the flash forward's), skips the first kernel."""
    import triton

    if not _KERNELS:
        _define_kernels()
    batch, q_heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    query, keys = query.contiguous(), keys.contiguous()
    positions = positions.to(torch.int64).contiguous()
    given = lse
    lse = torch.empty((batch, q_heads, length), dtype=torch.float32, device=query.device)
    mass = torch.empty((batch, kv_heads, length), dtype=torch.float32, device=query.device)
    shapes = dict(Q_HEADS=q_heads, KV_HEADS=kv_heads, DIM=dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(dim)), ROWS=triton.next_power_of_2(group * tiles.block_m),
                  IEEE=query.dtype == torch.float32, num_warps=tiles.warps, num_stages=tiles.stages)
    scale = float(scaling) * LOG2E  # the kernels work in base 2 (exp2 is the fast instruction)
    if given is not None:
        torch.mul(given, LOG2E, out=lse)
    else:
        _KERNELS["lse"][(batch * kv_heads, triton.cdiv(length, tiles.block_m))](
            query, keys, positions, lse, length, scale, **shapes)
    _KERNELS["mass"][(batch * kv_heads, triton.cdiv(length, tiles.block_n))](
        query, keys, positions, lse, mass, length, scale, **shapes)
    return mass


def _define_kernels() -> None:
    import triton
    import triton.language as tl

    global _stacked_queries, _logits  # a kernel finds the functions it calls among the module's globals

    @triton.jit
    def _stacked_queries(q_ptr, pos_ptr, row, kv_head, first, length, Q_HEADS: tl.constexpr,
                        KV_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWS: tl.constexpr):
        """The group's query heads at queries [first, first + BLOCK_M), stacked: tile row r is
        head r // BLOCK_M of the group, query first + r % BLOCK_M."""
        group = Q_HEADS // KV_HEADS
        r = tl.arange(0, ROWS)
        m = first + r % BLOCK_M
        real = (r // BLOCK_M < group) & (m < length)
        row_head = row * Q_HEADS + kv_head * group + r // BLOCK_M
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + (row_head * length + m)[:, None] * DIM + d[None, :],
                    mask=real[:, None] & (d[None, :] < DIM), other=0.0)
        q_pos = tl.load(pos_ptr + row * length + m, mask=real, other=-1)
        return q, q_pos, real, row_head * length + m

    @triton.jit
    def _logits(q, k, IEEE: tl.constexpr):
        """q k^T: float32 inputs multiply in float32 (Triton would round them to tf32)."""
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def lse_kernel(q_ptr, k_ptr, pos_ptr, lse_ptr, length, scale, Q_HEADS: tl.constexpr,
                   KV_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr):
        row_kv = tl.program_id(0).to(tl.int64)
        row, kv_head = row_kv // KV_HEADS, row_kv % KV_HEADS
        first = tl.program_id(1) * BLOCK_M
        q, q_pos, real, at = _stacked_queries(q_ptr, pos_ptr, row, kv_head, first, length, Q_HEADS, KV_HEADS,
                                             DIM, BLOCK_M, BLOCK_D, ROWS)
        d = tl.arange(0, BLOCK_D)
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        end = tl.minimum(first + BLOCK_M, length)  # causal: no key after the block
        for start in range(0, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + (row_kv * length + n)[:, None] * DIM + d[None, :],
                        mask=(n[:, None] < length) & (d[None, :] < DIM), other=0.0)
            k_pos = tl.load(pos_ptr + row * length + n, mask=n < length, other=-1)
            logits = _logits(q, k, IEEE) * scale
            visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            logits = tl.where(visible, logits, float("-inf"))
            new_best = tl.maximum(best, tl.max(logits, axis=1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            total = total * tl.exp2(best - safe) + tl.sum(tl.exp2(logits - safe[:, None]), axis=1)
            best = new_best
        lse = tl.where(total > 0, best + tl.log2(total), float("inf"))  # inf: a query that sees nothing
        tl.store(lse_ptr + at, lse, mask=real)

    @triton.jit
    def mass_kernel(q_ptr, k_ptr, pos_ptr, lse_ptr, mass_ptr, length, scale, Q_HEADS: tl.constexpr,
                    KV_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr):
        row_kv = tl.program_id(0).to(tl.int64)
        row, kv_head = row_kv // KV_HEADS, row_kv % KV_HEADS
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        k = tl.load(k_ptr + (row_kv * length + n)[:, None] * DIM + d[None, :],
                    mask=(n[:, None] < length) & (d[None, :] < DIM), other=0.0)
        k_pos = tl.load(pos_ptr + row * length + n, mask=n < length, other=-1)
        # Each query block's weights go into a tile-shaped sum, reduced over rows once at the end:
        # a reduction per block crosses warps (25.1 against 19.2 ms at 8K x 16 on the H200).
        tile_sum = tl.zeros([ROWS, BLOCK_N], tl.float32)
        first = (tl.program_id(1) * BLOCK_N) // BLOCK_M * BLOCK_M  # causal: no query before the block
        for start in range(first, length, BLOCK_M):
            q, q_pos, real, at = _stacked_queries(q_ptr, pos_ptr, row, kv_head, start, length, Q_HEADS, KV_HEADS,
                                                 DIM, BLOCK_M, BLOCK_D, ROWS)
            lse = tl.load(lse_ptr + at, mask=real, other=float("inf"))
            logits = _logits(q, k, IEEE) * scale
            visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] >= 0)
            weights = tl.where(visible, tl.exp2(logits - lse[:, None]), 0.0)
            tile_sum += weights
        tl.store(mass_ptr + row_kv * length + n, tl.sum(tile_sum, axis=0), mask=n < length)

    _KERNELS["lse"] = lse_kernel
    _KERNELS["mass"] = mass_kernel
