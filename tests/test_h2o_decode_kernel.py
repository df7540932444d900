"""H2O's fused decode kernels (the GPU path), run by Triton's interpreter on the CPU against the
torch step that the CPU path uses: several steps of one layer with GQA, batch 2 with different
caps and recent windows, a cache that starts partly empty; the slots in 1 to 3 chunks and the
finish kernel over one block of slots or several."""

from __future__ import annotations

import os

from triton_interpreter import run_interpreted

SCRIPT = """
import sys
import torch
from kvprof_h2o.fast import next_free, torch_decode
from kvprof_h2o import decode_kernel
from kvprof_h2o.decode_kernel import fused_decode

def state(dtype, g):
    B, Hq, Hkv, W, D = 2, 8, 2, 150, 16
    cap = torch.tensor([W, 120]).view(B, 1, 1)
    recent = torch.tensor([5, 3])
    positions = torch.full((B, Hkv, W), -1)
    scores = torch.zeros(B, Hkv, W)
    for row, held in enumerate([W - 3, 117]):     # both fill up after 3 steps; empty slots past row 1's cap stay empty
        for head in range(Hkv):
            slots = torch.randperm(int(cap[row]), generator=g)[:held]
            positions[row, head, slots] = torch.randperm(180, generator=g)[:held].sort().values
            scores[row, head, slots] = torch.rand(held, generator=g) * 3
    keys = torch.randn(B, Hkv, W, D, generator=g).to(dtype)
    values = torch.randn(B, Hkv, W, D, generator=g).to(dtype)
    now = torch.tensor([[200], [190]])
    free = next_free(positions, scores, None, recent, cap)
    evicted = torch.full((12, 3, B, Hkv), -1)
    return dict(cache_keys=keys, cache_values=values, positions=positions, scores=scores, free=free, now=now,
                recent=recent, cap=cap, evicted=evicted, step=torch.zeros(1, dtype=torch.long))

def run(dtype, splits, steps):
    g = torch.Generator().manual_seed(splits)
    ref = state(dtype, g)
    got = {k: v.clone() for k, v in ref.items()}
    B, Hkv, W, D = ref["cache_keys"].shape
    victims = 0
    for step in range(steps):
        q = torch.randn(B, 4 * Hkv, 1, D, generator=g).to(dtype) * 2
        k, v = torch.randn(B, Hkv, 1, D, generator=g).to(dtype), torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
        outs = []
        for s, fn in ((ref, torch_decode), (got, lambda *a: fused_decode(*a, splits=splits))):
            outs.append(fn(q, k, v, s["cache_keys"], s["cache_values"], s["positions"], s["scores"], s["free"],
                           s["now"], s["recent"], s["cap"], s["evicted"][:, 1], s["step"], 0.25))
            s["now"] += 1
            s["step"] += 1
        expected, output = outs
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert output.dtype == expected.dtype and output.shape == expected.shape == (B, 1, 4 * Hkv, D)
        assert torch.allclose(output.float(), expected.float(), atol=tol, rtol=tol), (output - expected).abs().max()
        for name in ("cache_keys", "cache_values", "positions", "free", "evicted"):
            assert torch.equal(ref[name], got[name]), (dtype, splits, step, name)
        difference = (ref["scores"] - got["scores"]).abs().max()
        assert torch.allclose(ref["scores"], got["scores"], atol=1e-5, rtol=1e-5), difference
        victims += int((ref["evicted"][step, 1] >= 0).sum())
    assert victims > 0 and (ref["evicted"][:steps, 1] == -1).any()   # some steps evict, some fill an empty slot
    assert (ref["free"] >= ref["cap"][:, :, 0]).sum() == 0             # never a slot beyond the cap

for dtype, splits, finish_block in ((torch.float32, 1, 2048), (torch.float32, 2, 64), (torch.float32, 3, 2048),
                                   (torch.bfloat16, 2, 2048)):
    decode_kernel.MAX_BLOCK_W = finish_block         # 64: the finish kernel walks the slots in 3 blocks
    run(dtype, splits, 6)
print("ok")
"""


def test_the_fused_decode_kernels_step_as_the_torch_path() -> None:
    done = run_interpreted(SCRIPT)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]


RUN_SCRIPT = """
import dataclasses, random, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from transformers_runs import run_policy
from kvprof import Request
from kvprof.models import resolve_model
from kvprof.strategy import parse_options
from kvprof_h2o import decode_kernel, fast
from kvprof_h2o.plugin import H2OStrategy
from kvprof_transformers.loading import load_model

spec = resolve_model("tiny-llama", "random")
spec = dataclasses.replace(spec, config={**spec.config, "initializer_range": 0.15})  # uneven attention
torch.manual_seed(0)
loaded = load_model(spec, "cpu", "float32")
rng = random.Random(0)
prompts = [[rng.randrange(256, 49152) for _ in range(n)] for n in (40, 29)]
requests = [Request(f"req-{i}", p, max_new_tokens=7, ignore_eos=True) for i, p in enumerate(prompts)]
found = []
for kernels in (False, True):
    fast._TRITON_DECODE["cpu"] = kernels
    policy = H2OStrategy().make_policy(loaded, parse_options(H2OStrategy.options, {"heavy_ratio": "0.2",
                                                                                  "recent_ratio": "0.1"}))
    path = Path(tempfile.mkdtemp()) / "h2o.arrow"
    outputs, trace = run_policy(loaded, policy, requests, path)
    rows = trace.of_kind("evict").to_pylist()
    found.append((outputs, sorted((r["request_id"], r["step"] if r["step"] is not None else -1, r["layer"],
                                   r["positions"]) for r in rows)))
assert decode_kernel._KERNELS and fast._TRITON_DECODE["usable"]   # the kernels ran, no fallback to torch
(torch_outputs, torch_evictions), (kernel_outputs, kernel_evictions) = found
assert kernel_outputs == torch_outputs
assert kernel_evictions == torch_evictions
assert sum(1 for _, step, *_ in torch_evictions if step >= 0) >= 10   # decode steps evicted
print("ok")
"""


def test_a_run_with_the_decode_kernels_evicts_what_the_torch_step_evicts() -> None:
    """The fast engine's h2o on tiny-llama (GQA, batch 2 of different lengths, 7 new tokens) with
    the decode kernels (in the interpreter) and with the torch step: the same tokens generated
    and the same evict events."""
    done = run_interpreted(RUN_SCRIPT, os.path.dirname(__file__))
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]
