"""The prefill attention mass of every key in two Triton kernels, without the score matrix.

`fast.torch_prefill_mass` visits blocks of queries with matmuls and a float32 softmax: exact, but at
an 8K prompt and batch 16 it is thousands of small launches per layer and the prefill of H2O
took 5.7x full's (H200). Here, as in flash attention, nothing of size L x L is ever stored:

1. `lse`: per (row, query head, block of queries), the log-sum-exp of each query's visible
   logits (online maximum and sum over key blocks up to the query block's end: causal).
2. `mass`: per (row, KV head, block of keys), the sum over the group's query heads and the real
   queries at or after the block of exp(logit - lse): the softmax weights, summed by column.

Visibility is by position, as in `fast.torch_prefill_mass`: key j is seen by query i when
0 <= pos[j] <= pos[i]; padding (position -1) gives and receives nothing. Logits are accumulated
in float32 (the torch pass rounds them to the model's dtype first: near-ties may differ).
"""

from __future__ import annotations

from typing import Any

import torch

_KERNELS: dict[str, Any] = {}
BLOCK_M = 64  # queries per block
BLOCK_N = 64  # keys per block


def triton_mass(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """query (B, Hq, L, D), keys (B, Hkv, L, D), positions (B, L) (-1: padding) -> mass (B, Hkv, L)
    float32; the same quantity as `fast.torch_prefill_mass`."""
    import triton

    if not _KERNELS:
        _define_kernels()
    batch, q_heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    query, keys = query.contiguous(), keys.contiguous()
    positions = positions.to(torch.int64).contiguous()
    lse = torch.empty((batch, q_heads, length), dtype=torch.float32, device=query.device)
    mass = torch.empty((batch, kv_heads, length), dtype=torch.float32, device=query.device)
    block_d = max(16, triton.next_power_of_2(dim))
    _KERNELS["lse"][(batch * q_heads, triton.cdiv(length, BLOCK_M))](
        query, keys, positions, lse, length, float(scaling), Q_HEADS=q_heads, KV_HEADS=kv_heads, DIM=dim,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    _KERNELS["mass"][(batch * kv_heads, triton.cdiv(length, BLOCK_N))](
        query, keys, positions, lse, mass, length, float(scaling), Q_HEADS=q_heads, KV_HEADS=kv_heads,
        DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    return mass


def _define_kernels() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def lse_kernel(q_ptr, k_ptr, pos_ptr, lse_ptr, length, scaling, Q_HEADS: tl.constexpr,
                   KV_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        row_head = tl.program_id(0).to(tl.int64)
        row, head = row_head // Q_HEADS, row_head % Q_HEADS
        kv_head = head // (Q_HEADS // KV_HEADS)
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + (row_head * length + m)[:, None] * DIM + d[None, :],
                    mask=(m[:, None] < length) & (d[None, :] < DIM), other=0.0)
        q_pos = tl.load(pos_ptr + row * length + m, mask=m < length, other=-1)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        k_base = (row * KV_HEADS + kv_head) * length
        end = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, length)  # causal: no key after the block
        for start in range(0, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + (k_base + n)[:, None] * DIM + d[None, :],
                        mask=(n[:, None] < length) & (d[None, :] < DIM), other=0.0)
            k_pos = tl.load(pos_ptr + row * length + n, mask=n < length, other=-1)
            logits = tl.dot(q, tl.trans(k)) * scaling
            visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            logits = tl.where(visible, logits, float("-inf"))
            new_best = tl.maximum(best, tl.max(logits, axis=1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            total = total * tl.exp(best - safe) + tl.sum(tl.exp(logits - safe[:, None]), axis=1)
            best = new_best
        lse = tl.where(total > 0, best + tl.log(total), float("inf"))  # inf: a query that sees nothing
        tl.store(lse_ptr + row_head * length + m, lse, mask=m < length)

    @triton.jit
    def mass_kernel(q_ptr, k_ptr, pos_ptr, lse_ptr, mass_ptr, length, scaling, Q_HEADS: tl.constexpr,
                    KV_HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        row_kv = tl.program_id(0).to(tl.int64)
        row, kv_head = row_kv // KV_HEADS, row_kv % KV_HEADS
        group = Q_HEADS // KV_HEADS
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        k = tl.load(k_ptr + (row_kv * length + n)[:, None] * DIM + d[None, :],
                    mask=(n[:, None] < length) & (d[None, :] < DIM), other=0.0)
        k_pos = tl.load(pos_ptr + row * length + n, mask=n < length, other=-1)
        acc = tl.zeros([BLOCK_N], tl.float32)
        first = (tl.program_id(1) * BLOCK_N) // BLOCK_M * BLOCK_M  # causal: no query before the block
        for g in range(0, group):
            row_head = row * Q_HEADS + kv_head * group + g
            for start in range(first, length, BLOCK_M):
                m = start + tl.arange(0, BLOCK_M)
                q = tl.load(q_ptr + (row_head * length + m)[:, None] * DIM + d[None, :],
                            mask=(m[:, None] < length) & (d[None, :] < DIM), other=0.0)
                q_pos = tl.load(pos_ptr + row * length + m, mask=m < length, other=-1)
                lse = tl.load(lse_ptr + row_head * length + m, mask=m < length, other=float("inf"))
                logits = tl.dot(q, tl.trans(k)) * scaling
                visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] >= 0)
                weights = tl.where(visible, tl.exp(logits - lse[:, None]), 0.0)
                acc += tl.sum(weights, axis=0)
        tl.store(mass_ptr + row_kv * length + n, acc, mask=n < length)

    _KERNELS["lse"] = lse_kernel
    _KERNELS["mass"] = mass_kernel
