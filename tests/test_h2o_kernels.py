"""H2O's Triton prefill-mass kernels (the GPU path), run by Triton's interpreter on the CPU
against the torch pass that the CPU and the eager reference use."""

from __future__ import annotations

from triton_interpreter import run_interpreted

SCRIPT = """
import torch
from kvprof_h2o.fast import _mass_is_conserved, torch_prefill_mass
from kvprof_h2o.mass_kernel import MassTiles, triton_mass
g = torch.Generator().manual_seed(0)
# a group of 2 query heads, and of 3 (SmolLM2's: the stacked tile is padded to a power of two)
for (Hq, Hkv), tiles in (((4, 2), MassTiles()), ((3, 1), MassTiles(block_m=16, block_n=32))):
    B, L, D = 2, 150, 16
    q, k = torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    pos = torch.arange(L).repeat(B, 1)
    pos[1, :37] = -1                      # a left-padded row
    pos[1, 37:] = torch.arange(L - 37)
    expected, got = torch_prefill_mass(q, k, pos, 0.25), triton_mass(q, k, pos, 0.25, tiles)
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4), (expected - got).abs().max()
    assert (got[1, :, :37] == 0).all()    # padding receives nothing
    # every real query hands out exactly one unit of attention per query head
    assert abs(got.sum().item() - Hq * int((pos >= 0).sum())) < 1e-2
    assert _mass_is_conserved(got, pos, Hq // Hkv)
    # given each query's natural log-sum-exp (what the flash forward returns), only the mass kernel runs
    row = pos[:1]
    logits = torch.einsum("bhld,bhmd->bhlm", q[:1], k[:1].repeat_interleave(Hq // Hkv, 1)) * 0.25
    lse = logits.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf")).logsumexp(-1)
    with_lse = triton_mass(q[:1], k[:1], row, 0.25, tiles, lse=lse)
    assert torch.allclose(expected[:1], with_lse, atol=1e-4, rtol=1e-4), (expected[:1] - with_lse).abs().max()
    assert not _mass_is_conserved(triton_mass(q[:1], k[:1], row, 0.25, tiles, lse=lse * 1.4427), row, Hq // Hkv)
print("ok")
"""


def test_the_triton_prefill_mass_equals_the_torch_pass() -> None:
    done = run_interpreted(SCRIPT)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]
