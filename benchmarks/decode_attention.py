"""Decode attention over a static cache: the candidate kernels, timed alone on one GPU.

    python benchmarks/decode_attention.py              # Llama-3-8B geometry, 8K slots, batch 1 and 16

One query per row over every slot of a (B, 8, S, 128) bf16 cache with an additive mask, 32 query
heads: kvprof's grouped matmul (`static_cache.decode_attention`) against SDPA variants. CUDA events
over 200 calls after a warm-up; prints ms per call, the share of the copy-bandwidth limit (K and V
read once), and the relative error against a float64 reference.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins"))
from kvprof_transformers.static_cache import decode_attention  # noqa: E402


def grouped_matmul(q, k, v, mask, scale):
    """Query heads of a group folded into one batched matmul, float32 softmax (kvprof's first try)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    logits = torch.matmul(q.reshape(b, hkv, hq // hkv, d), k.transpose(-1, -2)).float() * scale + mask
    return torch.matmul(torch.softmax(logits, -1).to(v.dtype), v).view(b, 1, hq, d)


def sdpa_bool(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask == 0, scale=scale, enable_gqa=True).transpose(1, 2)


def grouped_sdpa(q, k, v, mask, scale):
    # Query heads of a group as rows of one "query" sequence: SDPA then sees Hkv heads, no GQA.
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    grouped = q.reshape(b, hkv, hq // hkv, d)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, 1, hq, d)


def time_ms(fn, *args, reps: int = 200) -> float:
    for _ in range(5):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    torch.manual_seed(0)
    slots, filled, hq, hkv, d = 8224, 8200, 32, 8, 128
    bandwidth = 4.19e12
    for batch in (1, 16):
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, hkv, slots, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = torch.full((batch, 1, 1, slots), float("-inf"), device="cuda", dtype=torch.bfloat16)
        mask[..., :filled] = 0
        scale = d ** -0.5
        ref = grouped_matmul(q.double(), k.double(), v.double(), mask.double(), scale)
        limit_ms = 2 * k.numel() * 2 / bandwidth * 1e3
        for name, fn in (("grouped matmul", grouped_matmul), ("sdpa additive gqa (kvprof)", decode_attention),
                         ("sdpa bool gqa", sdpa_bool), ("grouped sdpa", grouped_sdpa)):
            try:
                out = fn(q, k, v, mask, scale)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                ms = statistics.median(time_ms(fn, q, k, v, mask, scale) for _ in range(3))
                print(f"batch {batch:>2} {name:<24} {ms:7.4f} ms  {limit_ms / ms:5.0%} of limit  err {err:.1e}")
            except Exception as exc:  # noqa: BLE001 - report the variant that does not run
                print(f"batch {batch:>2} {name:<24} failed: {str(exc)[:120]}")


if __name__ == "__main__":
    main()
