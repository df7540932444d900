"""The infinigen strategy: its selection rule against independent implementations, its skew,
its tokens against `full`, its events, and its refusals."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from kvprof import UsageError
from kvprof.cli import main
from kvprof.models import builtin_aliases, resolve_model
from kvprof.strategy import parse_options
from kvprof.testing import conformance
from kvprof.trace import read_trace
from kvprof_infinigen.plugin import InfiniGenStrategy
from kvprof_infinigen.policy import require_room
from kvprof_infinigen.selection import select_tokens, select_within_cap, speculative_scores
from kvprof_infinigen.skewing import skew_from
from kvprof_transformers.loading import LoadedModel, load_model
from kvprof_transformers.runner import CachePolicy, FullCachePolicy
from transformers_runs import build_requests, offload_events, run_policy
from triton_interpreter import run_interpreted


def infinigen_policy(loaded: LoadedModel, **options: object) -> CachePolicy:
    parsed = parse_options(InfiniGenStrategy.options, {key: str(value) for key, value in options.items()})
    return InfiniGenStrategy().make_policy(loaded, parsed)


# --- the selection rule ----------------------------------------------------------------------


def authors_speculate_attention(scores: torch.Tensor, alpha: float, max_num_kv: int) -> torch.Tensor:
    """The authors' rule (kv_selection_controller.speculate_attention), on their layout:
    scores (batch*heads, 1, tokens) -> prefetch indices (n, 1, batch*heads)."""
    threshold = torch.max(scores, dim=-1, keepdim=True)[0] - alpha
    count = torch.where(scores > threshold, torch.ones_like(scores), torch.zeros_like(scores))
    mean = torch.mean(torch.sum(count, dim=-1)).item()
    return torch.topk(scores.permute(2, 1, 0), min(int(mean), max_num_kv), dim=0)[1]


def loop_selection(scores: list, alpha: float, max_num_kv: int) -> list[list[list[int]]]:
    """kvprof's documented rule for grouped-query attention, on nested lists: per KV head, a
    token's score is the best over its query heads of (score - that query head's maximum)."""
    relative = [[[max(group[q][t] - max(group[q]) for q in range(len(group))) for t in range(len(group[0]))]
                 for group in row] for row in scores]
    counts = [sum(1 for value in head if value > -alpha) for row in relative for head in row]
    count = min(math.floor(sum(counts) / len(counts)), max_num_kv)
    return [[sorted(sorted(range(len(head)), key=lambda t: -head[t])[:count]) for head in row] for row in relative]


def selected(positions: torch.Tensor, count: torch.Tensor) -> list[list[list[int]]]:
    return positions[..., :int(count)].tolist()


@pytest.mark.parametrize("alpha, max_num_kv", [(2.0, 100), (5.0, 100), (5.0, 7), (0.5, 100)])
def test_selection_matches_the_authors_rule_for_one_query_head_per_kv_head(alpha: float, max_num_kv: int) -> None:
    generator = torch.Generator().manual_seed(1)
    batch, heads, tokens = 2, 4, 60
    scores = torch.randn(batch, heads, 1, tokens, generator=generator, dtype=torch.float64) * 3
    positions, count = select_tokens(scores, alpha, max_num_kv)
    theirs = authors_speculate_attention(scores.reshape(batch * heads, 1, tokens), alpha, max_num_kv)
    assert int(count) == theirs.shape[0] > 0
    expected = [sorted(theirs[:, 0, row * heads + head].tolist()) for row in range(batch) for head in range(heads)]
    assert [head for row in selected(positions, count) for head in row] == expected
    assert (positions[..., int(count):] == tokens).all()  # the rest is filler


@pytest.mark.parametrize("alpha, max_num_kv", [(1.0, 50), (3.0, 50), (3.0, 5)])
def test_selection_with_query_groups_matches_a_plain_loop_implementation(alpha: float, max_num_kv: int) -> None:
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 4, 40, generator=generator, dtype=torch.float64) * 2  # 3 KV heads of 4 queries
    positions, count = select_tokens(scores, alpha, max_num_kv)
    assert selected(positions, count) == loop_selection(scores.tolist(), alpha, max_num_kv)


def test_selection_edges() -> None:
    scores = torch.randn(1, 2, 1, 10)
    positions, count = select_tokens(scores, 0.0, 10)  # nothing is above max - 0
    assert int(count) == 0 and (positions == 10).all()
    positions, count = select_tokens(scores, 1e9, 4)  # everything qualifies: the cap decides
    assert int(count) == 4
    positions, count = select_tokens(scores, 1e9, 100)  # cap above the length: all tokens, in order
    assert positions.tolist() == [[list(range(10))] * 2]


@pytest.mark.parametrize("alpha, cap, held", [(1.0, 30, 60), (3.0, 30, 60), (3.0, 5, 60), (5.0, 40, 25),
                                              (0.0, 30, 60), (1e9, 60, 60), (1e9, 80, 33)])
def test_the_graph_safe_selection_equals_the_eager_rule(alpha: float, cap: int, held: int) -> None:
    """select_within_cap (fixed shapes: every slot scored, slots past `held` at -inf; the count
    and cap on the device) selects what select_tokens selects over the held tokens."""
    generator = torch.Generator().manual_seed(int(alpha * 10) + cap + held)
    slots = 80
    scores = torch.randn(2, 3, 4, slots, generator=generator, dtype=torch.float64) * 2
    positions, count = select_tokens(scores[..., :held], alpha, cap)
    masked = scores.clone()
    masked[..., held:] = float("-inf")
    fixed, fixed_count = select_within_cap(masked, alpha, min(cap, slots), torch.tensor([held]))
    assert fixed.shape == (2, 3, min(cap, slots)) and fixed_count.shape == (1,)
    assert int(fixed_count) == int(count)
    assert selected(fixed, fixed_count) == selected(positions, count)


# --- skewing -----------------------------------------------------------------------------------


def test_skew_is_orthogonal_keeps_scores_and_concentrates_energy() -> None:
    generator = torch.Generator().manual_seed(3)
    kv_heads, group, tokens, dim = 2, 3, 200, 16
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    scales = torch.logspace(1, -1, dim, dtype=torch.float64)  # a few directions dominate, not axis-aligned
    queries = (torch.randn(kv_heads * group, tokens, dim, generator=generator, dtype=torch.float64) * scales) @ basis.T
    keys = (torch.randn(kv_heads, tokens, dim, generator=generator, dtype=torch.float64) * scales) @ basis.T
    skew, query_energy, _ = skew_from(queries, keys)
    eye = torch.eye(dim, dtype=torch.float32).expand(kv_heads, dim, dim)
    assert torch.allclose(skew.transpose(-1, -2) @ skew, eye, atol=1e-4)
    # All columns: the speculative scores are the exact scaled logits, (QA)(KA)^T = QK^T.
    query = queries[:, -1].float().unsqueeze(0)                               # [1, query_heads, dim]
    cached = keys.float().unsqueeze(0)                                        # [1, kv_heads, tokens, dim]
    scores = speculative_scores(query, skew, torch.einsum("bknd,kde->bkne", cached, skew), 0.25)
    exact = torch.einsum("bkgd,bknd->bkgn", query.view(1, kv_heads, group, dim), cached) * 0.25
    assert torch.allclose(scores, exact, atol=1e-3)
    # The top 20 % of the skewed columns carry more of |Q| than the top 20 % of the raw ones.
    top = dim // 5
    raw_energy = queries.float().reshape(kv_heads, -1, dim).abs().sum(1)
    assert (query_energy.topk(top).values.sum(-1) > raw_energy.topk(top).values.sum(-1)).all()


# --- on real and tiny models ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["static", "eager"])
def test_alpha_large_enough_to_select_everything_reproduces_full(smollm2: LoadedModel, engine: str,
                                                                 tmp_path: Path) -> None:
    requests = build_requests(smollm2, "passkey", prompt_len=256, output_len=6, num_prompts=2, depth=0.3)
    full, _ = run_policy(smollm2, FullCachePolicy(), requests, tmp_path / "full.arrow")
    policy = infinigen_policy(smollm2, alpha=1e9, budget=1.0, calibration_tokens=256, engine=engine)
    outputs, trace = run_policy(smollm2, policy, requests, tmp_path / "infinigen.arrow")
    assert outputs == full
    speculated = [e for e in offload_events(trace) if e["dst_medium"] == "device" and e["layer"] >= 2]
    assert speculated and all(e["tokens"] == dict(e["ext"])["stored_tokens"] for e in speculated)


def selected_rows(trace: object) -> list[tuple]:
    """Every speculated fetch of a detail-"head" trace: (step, layer, request, KV head, positions)."""
    return sorted((e["step"], e["layer"], e["request_id"], e["kv_head"], tuple(e["positions"][0]))
                  for e in offload_events(trace) if e["dst_medium"] == "device" and e["positions"] is not None)


def assert_fast_engine_selects_as_the_eager_one(loaded: LoadedModel, requests: list, tmp_path: Path,
                                                **options: object) -> list[tuple]:
    eager_tokens, eager = run_policy(loaded, infinigen_policy(loaded, engine="eager", **options), requests,
                                     tmp_path / "eager.arrow", detail="head")
    fast_tokens, fast = run_policy(loaded, infinigen_policy(loaded, engine="static", **options), requests,
                                   tmp_path / "static.arrow", detail="head")
    rows = selected_rows(eager)
    layers = loaded.config.get_text_config().num_hidden_layers
    assert {(step, layer) for step, layer, *_ in rows} == {
        (step, layer) for step in range(len(eager_tokens[0]) - 1) for layer in range(2, layers)}
    assert selected_rows(fast) == rows  # every step, speculated layer, request and KV head
    assert fast_tokens == eager_tokens
    return rows


def test_the_fast_engine_selects_what_the_eager_reference_selects(tiny4: LoadedModel, tmp_path: Path) -> None:
    requests = build_requests(tiny4, "synthetic", prompt_len=64, output_len=5, num_prompts=2)
    rows = assert_fast_engine_selects_as_the_eager_one(tiny4, requests, tmp_path, calibration_tokens=64)
    assert any(len(positions) < 64 for *_, positions in rows)  # a real selection, not everything


@pytest.mark.slow
def test_the_fast_engine_selects_what_the_eager_reference_selects_on_smollm2(smollm2: LoadedModel,
                                                                            tmp_path: Path) -> None:
    """A fixed prompt, SmolLM2 (30 layers: 28 speculated), default alpha and budget: the same
    tokens at every step, speculated layer, request and KV head."""
    requests = build_requests(smollm2, "passkey", prompt_len=256, output_len=4, num_prompts=2, depth=0.3)
    rows = assert_fast_engine_selects_as_the_eager_one(smollm2, requests, tmp_path, calibration_tokens=256)
    assert any(len(positions) < 256 for *_, positions in rows)


def test_the_triton_row_gather_in_the_interpreter(tmp_path: Path) -> None:
    """The GPU gather kernel, run by Triton's interpreter on the CPU, against a plain gather:
    only the first `count` rows are written."""
    script = (
        "import torch\n"
        "from kvprof_transformers import host_store as hs\n"
        "assert hs._triton_available()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "k, v = torch.randn(2, 3, 70, 16, generator=g), torch.randn(2, 3, 70, 16, generator=g)\n"
        "pos = torch.rand(2, 3, 70, generator=g).argsort(-1)[..., :40].sort(-1).values\n"
        "dk, dv = torch.zeros(2, 3, 41, 16), torch.zeros(2, 3, 41, 16)\n"
        "hs._gather_rows_triton(k, v, pos, torch.tensor([35]), dk, dv)\n"
        "i = pos[..., :35].unsqueeze(-1).expand(-1, -1, -1, 16)\n"
        "assert torch.equal(dk[:, :, :35], k.gather(2, i)) and torch.equal(dv[:, :, :35], v.gather(2, i))\n"
        "assert (dk[:, :, 35:] == 0).all() and (dv[:, :, 35:] == 0).all()\n"
        "print('ok')\n")
    done = run_interpreted(script)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_fused_selection_kernels_in_the_interpreter() -> None:
    """select_fused (the GPU's Triton kernels: scores, then count rule, radix-select threshold and
    compaction), run by Triton's interpreter on the CPU, selects what select_within_cap selects
    (and select_tokens, where no scores tie), and so does the bisection it replaced: at one load per row and at
    several (a 64-slot load), with many exact ties (integer scores), NaN and inf in the keys of
    slots not held yet, NaN in the scratch and junk in the counts before the call, count 0,
    count = held and a cap below the count (the bisection: at ties and count 0)."""
    script = (
        "import torch\n"
        "from kvprof_infinigen import selection as sel\n"
        "sel._define_selection_kernels()\n"
        "def case(trial, slots, held, cap, alpha, group, ties, load, bisection_too=False):\n"
        "    g = torch.Generator().manual_seed(trial)\n"
        "    sel.SELECT_BLOCK = load\n"
        "    q, k = torch.randn(2, 3, group, 25, generator=g), torch.randn(2, 3, slots, 25, generator=g)\n"
        "    if ties:  # small integers, scaling 1/4: exact scores, many equal\n"
        "        q, k = q.mul(1.5).round(), k.mul(0.7).round()\n"
        "    scaling = 0.25 if ties else 0.3\n"
        "    scores = torch.einsum('bkgc,bksc->bkgs', q, k) * scaling\n"
        "    k[:, :, held:] = float('nan')\n"
        "    k[:, :, held::3] = float('-inf')\n"
        "    ref, n = sel.select_tokens(scores[..., :held], alpha, cap)\n"
        "    scores[..., held:] = float('-inf')\n"
        "    within, within_n = sel.select_within_cap(scores, alpha, cap, torch.tensor([held]))\n"
        "    assert int(within_n) == int(n)\n"
        "    n = int(n)\n"
        "    if not ties:  # (select_tokens keeps ties at the threshold in topk's order, not the earliest)\n"
        "        assert torch.equal(within[..., :n], ref[..., :n]), trial\n"
        "    for bisection in (False, True) if bisection_too else (False,):\n"
        "        pos, count = torch.full((2, 3, cap), -7), torch.full((1,), -7)\n"
        "        scratch, row_counts = torch.full((6, slots), float('nan')), torch.full((6,), 12345).int()\n"
        "        sel.select_fused(q, k, scaling, alpha, cap, torch.tensor([held]), scratch, row_counts, pos, count,\n"
        "                         bisection=bisection)\n"
        "        assert int(count) == n, (trial, bisection, int(count), n)\n"
        "        assert torch.equal(pos[..., :n], within[..., :n]), trial\n"
        "        assert (pos[..., n:] == -7).all(), trial\n"
        "    return n\n"
        "counts = [\n"
        "    case(0, 300, 209, 50, 1.0, 4, False, 8192),\n"
        "    case(1, 300, 218, 7, 5.0, 4, False, 64),     # cap below the count\n"
        "    case(2, 300, 227, 300, 1e9, 4, False, 64),   # count = held: every held slot\n"
        "    case(3, 200, 200, 120, 2.0, 4, True, 8192, bisection_too=True),  # ties, every slot held\n"
        "    case(4, 333, 301, 90, 3.0, 1, True, 64),     # ties, one query head per KV head\n"
        "    case(5, 300, 250, 60, 1e9, 2, True, 64),     # ties, the cap decides\n"
        "    case(6, 130, 100, 30, 0.0, 4, False, 64, bisection_too=True),  # count 0: nothing above max - 0\n"
        "]\n"
        "assert counts[1] == 7 and counts[2] == 227 and counts[5] == 60 and counts[6] == 0, counts\n"
        "assert 0 < counts[3] < 120 and 0 < counts[4] < 90, counts\n"
        "print('ok', counts)\n")
    done = run_interpreted(script, timeout=600)
    assert done.stdout.strip().startswith("ok"), done.stdout[-1000:] + done.stderr[-2000:]


def test_the_fused_speculative_query_in_the_interpreter() -> None:
    """The speculative query's RoPE kernel (rotate_query) and the bmm of its partial skew
    (partial_query), run by Triton's interpreter on the CPU, equal apply_rotary_pos_emb and
    speculative_scores' einsum bit for bit, in float32 and bfloat16 (whose rounding the kernel does
    itself), at batch 1 and 3 (cos/sin per row or one row for all), a head_dim that is not a power
    of 2, and large angles; select_fused over that strided partial query selects what it selects
    over the contiguous einsum result."""
    script = (
        "import torch\n"
        "from transformers.models.llama.modeling_llama import apply_rotary_pos_emb\n"
        "from kvprof_infinigen import selection as sel\n"
        "sel._define_selection_kernels()\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for batch, kvh, group, dim in ((1, 2, 4, 16), (3, 2, 2, 24)):\n"
        "        g = torch.Generator().manual_seed(batch)\n"
        "        q = (torch.randn(batch, 1, kvh * group * dim, generator=g) * 3).to(dtype)\n"
        "        angles = torch.rand(batch, 1, dim // 2, generator=g) * 4000\n"
        "        cos, sin = (a.repeat(1, 1, 2).to(dtype) for a in (angles.cos(), angles.sin()))\n"
        "        heads = q.view(batch, 1, -1, dim).transpose(1, 2)\n"
        "        ref = apply_rotary_pos_emb(heads, heads[:, :0], cos, sin)[0][:, :, -1]\n"
        "        rotated = torch.full((kvh, batch * group, dim), float('nan'), dtype=dtype)\n"
        "        sel.rotate_query(q, cos, sin, kvh, rotated)\n"
        "        mine = rotated.view(kvh, batch, group, dim).transpose(0, 1).reshape(batch, -1, dim)\n"
        "        assert torch.equal(mine, ref), (dtype, batch)\n"
        "        one = apply_rotary_pos_emb(heads, heads[:, :0], cos[:1], sin[:1])[0][:, :, -1]\n"
        "        sel.rotate_query(q, cos[:1], sin[:1], kvh, rotated)  # cos/sin of one row for all\n"
        "        mine = rotated.view(kvh, batch, group, dim).transpose(0, 1).reshape(batch, -1, dim)\n"
        "        assert torch.equal(mine, one), (dtype, batch)\n"
        "        sel.rotate_query(q, cos, sin, kvh, rotated)\n"
        "        skew = torch.randn(kvh, dim, 5, generator=g).to(dtype)\n"
        "        einsum = torch.einsum('bkgd,kdc->bkgc', ref.view(batch, kvh, group, dim), skew).contiguous()\n"
        "        pq = sel.partial_query(rotated, skew, torch.empty(kvh, batch * group, 5, dtype=dtype), batch)\n"
        "        assert torch.equal(pq, einsum) and (batch == 1 or not pq.is_contiguous()), (dtype, batch)\n"
        "        slots, held, cap = 150, 140, 40\n"
        "        keys = torch.randn(batch, kvh, slots, 5, generator=g).to(dtype)\n"
        "        picks = []\n"
        "        for query in (pq, einsum):\n"
        "            pos, count = torch.full((batch, kvh, cap), -1), torch.zeros(1, dtype=torch.long)\n"
        "            sel.select_fused(query, keys, 0.3, 3.0, cap, torch.tensor([held]),\n"
        "                             torch.empty(batch * kvh, slots), torch.zeros(batch * kvh).int(), pos, count)\n"
        "            picks.append((int(count), pos))\n"
        "        assert picks[0][0] == picks[1][0] > 0 and torch.equal(picks[0][1], picks[1][1]), dtype\n"
        "print('ok')\n")
    done = run_interpreted(script, timeout=600)
    assert done.stdout.strip().startswith("ok"), done.stdout[-1000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny4_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model folder: tiny-llama with 4 layers (layers 2 and 3 are speculated)."""
    config = dict(builtin_aliases()["tiny-llama"].config, num_hidden_layers=4)
    folder = tmp_path_factory.mktemp("tiny4")
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def tiny4(tiny4_folder: str) -> LoadedModel:
    torch.manual_seed(0)  # the same random weights every run: the calibration cache is reused
    return load_model(resolve_model(tiny4_folder, "random"), "cpu")


@pytest.mark.parametrize("engine", ["static", "eager"])
def test_infinigen_fetches_the_selected_tokens_and_reports_them(tiny4: LoadedModel, engine: str,
                                                                tmp_path: Path) -> None:
    prompt, output, budget = 64, 5, 0.2
    requests = build_requests(tiny4, "synthetic", prompt_len=prompt, output_len=output, num_prompts=2)
    policy = infinigen_policy(tiny4, budget=budget, calibration_tokens=64, engine=engine)
    _, trace = run_policy(tiny4, policy, requests, tmp_path / "infinigen.arrow", detail="head")
    cap = int(budget * (prompt + output))
    config = tiny4.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads, steps = config.num_key_value_heads, output - 1
    token_bytes = 2 * 2 * kv_heads * head_dim * 4

    fetches = [e for e in offload_events(trace) if e["dst_medium"] == "device"]
    whole = [e for e in fetches if e["layer"] < 2]
    assert [(e["step"], e["layer"], e["tokens"]) for e in whole] == [
        (s, layer, prompt + s) for s in range(steps) for layer in (0, 1)]
    rows = [e for e in fetches if e["layer"] >= 2]  # detail "head": one per request and KV head
    assert len(rows) == steps * 2 * 2 * kv_heads
    for event in rows:
        ext = dict(event["ext"])
        stored = prompt + event["step"]
        assert ext["stored_tokens"] == stored and ext["max_num_kv"] == cap
        assert event["tokens"] == ext["selected_tokens"] <= cap
        [positions] = event["positions"]
        assert positions == sorted(set(positions)) and len(positions) == event["tokens"]
        assert all(0 <= p < stored for p in positions)
        assert event["bytes"] == event["tokens"] * token_bytes // (2 * kv_heads)

    speculation = [p for p in trace.of_kind("phase").to_pylist() if p["phase"] == "speculation"]
    assert [(p["step"], p["layer"]) for p in speculation] == [(s, layer) for s in range(steps) for layer in (2, 3)]
    decode = trace.of_kind("decode_step").to_pylist()
    partial = max(1, int(head_dim * 0.2))
    partial_keys = [2 * 2 * kv_heads * (prompt + s + 1) * partial * 4 for s in range(steps)]  # layers 2-3
    skews = 2 * kv_heads * head_dim * partial * 4
    assert [d["aux_device_bytes"] for d in decode] == [k + skews for k in partial_keys]
    assert [d["kv_host_bytes"] for d in decode] == [4 * (prompt + s + 1) * token_bytes for s in range(steps)]


def test_speculation_on_the_main_stream_selects_what_the_eager_reference_selects(
        tiny4: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark switch that moves speculation onto the compute stream (on a CPU the same
    ops, without the side stream's input copies): the same rows at every step."""
    from kvprof_infinigen.fast import SpeculationSwitches, StaticInfiniGenPolicy

    monkeypatch.setattr(StaticInfiniGenPolicy, "switches", SpeculationSwitches(on_main_stream=True))
    requests = build_requests(tiny4, "synthetic", prompt_len=64, output_len=4, num_prompts=2)
    assert_fast_engine_selects_as_the_eager_one(tiny4, requests, tmp_path, calibration_tokens=64)


def test_the_fixed_selection_ablation_fetches_one_speculation_every_step(
        tiny4: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/infinigen_spec.py's ablation: each layer's selection is the eager rule
    (select_tokens) over the speculative scores of the prompt's last token, made once; every step
    fetches exactly it, and no speculation is timed."""
    from kvprof_infinigen.fast import SpeculationSwitches, StaticInfiniGenPolicy

    prompt, output = 64, 5
    expected: dict[int, tuple[int, torch.Tensor]] = {}

    def probe(policy: StaticInfiniGenPolicy) -> None:
        for target in policy.speculated:
            hidden, cos, sin = policy.prompt_inputs[target - 1]
            query = policy.access.query(target, hidden, (cos, sin))[:, :, -1]
            scores = speculative_scores(query, policy.partial_skew[target], policy.partial_keys[target][:, :, :prompt],
                                        policy.access.scaling(target))
            positions, count = select_tokens(scores, policy.settings.alpha, policy.cap)
            fixed = int(policy.fixed_counts[target])
            assert fixed == int(count)
            assert torch.equal(policy.fixed_positions[target][..., :fixed], positions[..., :fixed])
            expected[target] = (fixed, positions[..., :fixed])

    monkeypatch.setattr(StaticInfiniGenPolicy, "switches", SpeculationSwitches(fixed_selection=True, probe=probe))
    requests = build_requests(tiny4, "synthetic", prompt_len=prompt, output_len=output, num_prompts=2)
    policy = infinigen_policy(tiny4, calibration_tokens=64)
    _, trace = run_policy(tiny4, policy, requests, tmp_path / "fixed.arrow")
    assert sorted(expected) == [2, 3] and all(0 < count < prompt for count, _ in expected.values())
    fetches = [e for e in offload_events(trace) if e["dst_medium"] == "device" and e["layer"] >= 2]
    assert [(e["step"], e["layer"], e["tokens"]) for e in fetches] == [
        (step, layer, expected[layer][0]) for step in range(output - 1) for layer in (2, 3)]
    speculation = [p for p in trace.of_kind("phase").to_pylist() if p["phase"] == "speculation"]
    assert speculation and all(p["end_ns"] == p["start_ns"] for p in speculation)


@pytest.mark.parametrize("engine", ["static", "eager"])
@pytest.mark.parametrize("columns", ["prefill", "calibration"])
def test_both_column_choices_reproduce_full_when_everything_is_selected(tiny4: LoadedModel, columns: str,
                                                                      engine: str, tmp_path: Path) -> None:
    requests = build_requests(tiny4, "synthetic", prompt_len=48, output_len=5, num_prompts=2)
    full, _ = run_policy(tiny4, FullCachePolicy(), requests, tmp_path / "full.arrow")
    policy = infinigen_policy(tiny4, alpha=1e9, budget=1.0, calibration_tokens=64, partial_columns=columns,
                              engine=engine)
    outputs, trace = run_policy(tiny4, policy, requests, tmp_path / "infinigen.arrow")
    assert outputs == full
    skews = getattr(policy, "calibrated", None) if engine == "static" else policy.partial_skew
    widths = {tuple(p.shape) for p in skews.values()} if columns == "calibration" else set()
    assert len(widths) <= 1  # calibration: one width for all layers (zero columns pad the narrower)
    assert trace.of_kind("phase").num_rows > 0


def test_calibration_is_cached_with_its_text_and_size(tiny4: LoadedModel) -> None:
    first = infinigen_policy(tiny4, calibration_tokens=96).skew_data
    path = Path(first.meta["path"])
    assert path.is_file() and path.parent.name == "infinigen"
    assert first.meta["text"] == "calibration.txt" and first.meta["tokens"] == 96
    modified = path.stat().st_mtime_ns
    again = infinigen_policy(tiny4, calibration_tokens=96).skew_data
    assert path.stat().st_mtime_ns == modified  # read back, not recomputed
    assert torch.equal(again.matrices, first.matrices) and again.meta == first.meta


def test_a_padded_batch_is_refused(tiny4: LoadedModel, tmp_path: Path) -> None:
    requests = build_requests(tiny4, "synthetic", prompt_len=40, output_len=3, num_prompts=2)
    requests[1] = dataclasses.replace(requests[1], prompt_token_ids=requests[1].prompt_token_ids[5:])
    with pytest.raises(UsageError, match="equal-length prompts"):
        run_policy(tiny4, infinigen_policy(tiny4, calibration_tokens=64), requests, tmp_path / "padded.arrow")


def test_the_device_room_check() -> None:
    require_room(100, 200)
    with pytest.raises(UsageError, match="partial key cache and fetch buffers need"):
        require_room(3 * 2**30, 2**30)


@pytest.mark.parametrize("detail", ["step", "layer", "head"])
def test_infinigen_conforms_at_every_detail(tiny4_folder: str, detail: str, tmp_path: Path) -> None:
    report = conformance.check_strategy("infinigen", {"calibration_tokens": 64}, model=tiny4_folder,
                                        detail=detail, trace_dir=tmp_path)
    report.raise_for_problems()
    assert report.counts["phase"] > 0
    run = read_trace(report.trace_path).run
    assert run["extra"]["infinigen_calibration"]["text"] == "calibration.txt"
    assert any("grouped-query attention" in deviation for deviation in run["deviations"])


# --- bad input ---------------------------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    """The CLI's own error lines (libraries may log warnings to stderr too)."""
    return [line for line in stderr.splitlines() if line.startswith("kvprof: error:")]


@pytest.mark.parametrize("option", ["alpha=-1", "partial_weight_ratio=0", "partial_weight_ratio=1.5", "budget=0",
                                    "budget=2", "max_num_kv=-3", "partial_columns=random"])
def test_bad_options_are_one_line_and_exit_2(option: str, capsys: pytest.CaptureFixture) -> None:
    code = main(["trace", "--plugin", "infinigen", "--model", "tiny-llama", "--weights", "random", "--opt", option])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and option.split("=")[0] in errors[0]


def test_a_model_whose_attention_cannot_be_hooked_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    opt = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 32, "ffn_dim": 64,
           "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 49152, "word_embed_proj_dim": 32,
           "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(opt))
    code = main(["trace", "--plugin", "infinigen", "--model", str(tmp_path), "--weights", "random",
                 "--prompt-len", "32", "--output-len", "2", "-o", str(tmp_path / "t.arrow")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and "infinigen cannot hook OPTForCausalLM" in errors[0]
