"""The h2o strategy: the paper's rule against an independent implementation, and its effect on a real model."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from kvprof import ModelSpec, Request, UsageError, WorkloadParams, WorkloadSpec
from kvprof.cli import main
from kvprof.models import resolve_model
from kvprof.strategy import parse_options
from kvprof.trace import Trace
from kvprof_h2o.attention import attend
from kvprof_h2o.heavy_hitters import dropped_positions, select_slots
from kvprof_h2o.plugin import H2OStrategy
from kvprof_h2o.policy import Budget
from kvprof_transformers.loading import LoadedModel, load_model
from kvprof_transformers.runner import CachePolicy, FullCachePolicy
from transformers_runs import run_policy

# --- helpers -----------------------------------------------------------------------------


def h2o_policy(loaded: LoadedModel, **options: str) -> CachePolicy:
    return H2OStrategy().make_policy(loaded, parse_options(H2OStrategy.options, options))


def evictions(trace: Trace, request_id: str) -> dict[tuple[int | None, int], list[list[int]]]:
    """(step, layer) -> evicted positions per KV head, from a trace at detail "layer"."""
    rows = trace.of_kind("evict").to_pylist()
    return {(r["step"], r["layer"]): r["positions"] for r in rows if r["request_id"] == request_id}


def by_step(trace: Trace, kind: str, column: str) -> list:
    return trace.of_kind(kind)[column].to_pylist()


# --- the rule on fixed scores ------------------------------------------------------------


def reference_keep(positions: list[int], scores: list[float], heavy: int, recent: int) -> set[int]:
    """The paper's rule for one sequence and head, on plain lists (any order)."""
    tokens = sorted(zip(positions, scores))
    if len(tokens) <= heavy + recent:
        return set(positions)
    older, newer = tokens[:len(tokens) - recent], tokens[len(tokens) - recent:]
    heavy_hitters = sorted(older, key=lambda token: token[1], reverse=True)[:heavy]
    return {position for position, _ in heavy_hitters + newer}


def test_selection_matches_the_rule_on_fixed_scores_over_several_steps() -> None:
    generator = torch.Generator().manual_seed(0)
    heads, lengths = 2, [23, 17]                     # batch 2, the second left-padded by 6 slots
    heavy, recent = torch.tensor([5, 3]), torch.tensor([4, 2])
    width = max(lengths)
    positions = torch.full((2, heads, width), -1)
    for row, n in enumerate(lengths):
        positions[row, :, width - n:] = torch.arange(n)
    scores = torch.rand((2, heads, width), generator=generator) * (positions >= 0)
    for step in range(6):
        if step:  # a decode step: one new token per sequence, and more attention for everyone
            new = torch.tensor([lengths[0] + step - 1, lengths[1] + step - 1])[:, None, None].expand(2, heads, 1)
            positions = torch.cat([positions, new], dim=-1)
            scores = torch.cat([scores, torch.zeros(2, heads, 1)], dim=-1)
            scores += torch.rand(scores.shape, generator=generator) * (positions >= 0)
        held = (positions[:, 0] >= 0).sum(-1)
        kept_count = torch.minimum(held, heavy + recent)
        slots, kept = select_slots(positions, scores, heavy, recent, int(kept_count.max()))
        most = int((held - kept_count).max())
        dropped = dropped_positions(positions, slots, kept, most)
        new_positions = positions.gather(-1, slots).masked_fill(~kept, -1)
        for row in range(2):
            for head in range(heads):
                valid = positions[row, head] >= 0
                expected = reference_keep(positions[row, head][valid].tolist(), scores[row, head][valid].tolist(),
                                          int(heavy[row]), int(recent[row]))
                got = new_positions[row, head]
                assert set(got[got >= 0].tolist()) == expected
                assert set(positions[row, head][valid].tolist()) - expected == \
                    {p for p in dropped[row, head].tolist() if p >= 0}
        positions = new_positions
        scores = scores.gather(-1, slots).masked_fill(~kept, 0.0)


def test_attend_equals_plain_softmax_attention_in_blocks_with_gqa_padding_and_window() -> None:
    torch.manual_seed(0)
    batch, q_heads, kv_heads, length, dim, window = 2, 6, 2, 37, 8, 9
    group = q_heads // kv_heads
    query = torch.randn(batch, q_heads, length, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    pads = [0, 5]
    query_positions = torch.stack([torch.arange(length) - pad for pad in pads]).clamp(min=-1)
    key_positions = query_positions[:, None, :].expand(batch, kv_heads, length)
    # A block of 4 queries at a time: the blocked path is what long prompts take.
    output, scores = attend(query, key, value, key_positions, query_positions, dim ** -0.5,
                            sliding_window=window, block_elements=batch * q_heads * length * 4)
    for row, pad in enumerate(pads):
        q = query[row, :, pad:]
        k = key[row, :, pad:].repeat_interleave(group, dim=0)
        v = value[row, :, pad:].repeat_interleave(group, dim=0)
        n = length - pad
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & (j > i - window)
        weights = torch.softmax((q @ k.transpose(-1, -2) * dim ** -0.5).masked_fill(~allowed, float("-inf")), -1)
        torch.testing.assert_close(output[row, pad:], (weights @ v).transpose(0, 1))
        expected_scores = weights.sum(1).view(kv_heads, group, n).sum(1)
        torch.testing.assert_close(scores[row, :, pad:], expected_scores)
        assert scores[row, :, :pad].abs().sum() == 0


# --- the plugin against an independent H2O on a real (random-weight) model ---------------------


def reference_h2o(model: torch.nn.Module, prompt: list[int], heavy: int, recent: int, new_tokens: int
                  ) -> tuple[list[int], dict[tuple[int | None, int], list[list[int]]]]:
    """H2O on one sequence in plain PyTorch, after the authors' real-drop code.

    transformers' eager attention returns the post-softmax weights; a hook after each attention
    adds them (summed over queries, and over the query heads of each KV head) to the scores,
    then keeps the top-`heavy` older tokens and the `recent` newest ones of every KV head.
    Returns the greedy tokens and (step, layer) -> evicted positions per KV head.
    """
    from transformers import DynamicCache

    config = model.config
    kv_heads = config.num_key_value_heads
    group = config.num_attention_heads // kv_heads
    model.set_attn_implementation("eager")
    cache = DynamicCache()
    books: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # layer -> (scores, positions), (Hkv, S)
    evicted: dict[tuple[int | None, int], list[list[int]]] = {}
    now: dict = {}

    def after_attention(module, args, kwargs, output):
        layer = module.layer_idx
        weights = output[1][0]                                          # (Hq, q, S)
        scores = weights.reshape(kv_heads, group, weights.shape[1], -1).sum(dim=(1, 2))
        positions = now["positions"].expand(kv_heads, -1)
        if layer in books:
            old_scores, old_positions = books[layer]
            scores[:, :old_scores.shape[1]] += old_scores
            positions = torch.cat([old_positions, positions], dim=1)
        length = positions.shape[1]
        if length > heavy + recent:
            keep = torch.stack([
                torch.cat([scores[h, :length - recent].topk(heavy).indices.sort().values,
                           torch.arange(length - recent, length)])
                for h in range(kv_heads)
            ])
            evicted[(now["step"], layer)] = [
                sorted(set(positions[h].tolist()) - set(positions[h, keep[h]].tolist())) for h in range(kv_heads)
            ]
            stored = cache.layers[layer]
            stored.keys = torch.stack([stored.keys[0, h, keep[h]] for h in range(kv_heads)])[None]
            stored.values = torch.stack([stored.values[0, h, keep[h]] for h in range(kv_heads)])[None]
            scores, positions = scores.gather(1, keep), positions.gather(1, keep)
        books[layer] = (scores, positions)

    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_hook(after_attention, with_kwargs=True) for layer in layers]
    try:
        with torch.inference_mode():
            tokens: list[int] = []
            ids, positions = torch.tensor([prompt]), torch.arange(len(prompt))[None]
            for step in [None, *range(new_tokens - 1)]:
                now.update(step=step, positions=positions)
                logits = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True).logits
                tokens.append(int(logits[0, -1].argmax()))
                ids, positions = torch.tensor([[tokens[-1]]]), positions[:, -1:] + 1
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, evicted


@pytest.fixture(scope="module")
def peaky_tiny_llama() -> ModelSpec:
    """tiny-llama (GQA 4 query / 2 KV heads) with random weights large enough for uneven attention."""
    spec = resolve_model("tiny-llama", "random")
    return dataclasses.replace(spec, config={**spec.config, "initializer_range": 0.15})


@pytest.mark.slow
def test_h2o_evicts_what_an_independent_implementation_evicts_with_gqa_and_batch_2(
        peaky_tiny_llama: ModelSpec, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(peaky_tiny_llama, "cpu", "float32")
    rng = random.Random(0)
    prompts = [[rng.randrange(256, 49152) for _ in range(n)] for n in (40, 29)]  # different lengths
    requests = [Request(f"req-{i}", p, max_new_tokens=7, ignore_eos=True) for i, p in enumerate(prompts)]
    heavy_ratio, recent_ratio = 0.2, 0.1
    outputs, trace = run_policy(loaded, h2o_policy(loaded, heavy_ratio=str(heavy_ratio),
                                                   recent_ratio=str(recent_ratio)), requests, tmp_path / "h2o.arrow")
    for request, output in zip(requests, outputs):
        n = len(request.prompt_token_ids)
        tokens, expected = reference_h2o(loaded.model, request.prompt_token_ids, int(heavy_ratio * n),
                                         int(recent_ratio * n), request.max_new_tokens)
        got = evictions(trace, request.request_id)
        assert set(expected) == {(None, 0), (None, 1)} | {(s, layer) for s in range(6) for layer in (0, 1)}
        assert got == expected
        assert output == tokens


def test_exempt_layers_keep_their_whole_cache(peaky_tiny_llama: ModelSpec, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(peaky_tiny_llama, "cpu", "float32")
    lengths = (40, 30)
    requests = [Request(f"req-{i}", list(range(300, 300 + n)), max_new_tokens=3, ignore_eos=True)
                for i, n in enumerate(lengths)]
    policy = h2o_policy(loaded, exempt_layers="0", engine="eager")
    _, trace = run_policy(loaded, policy, requests, tmp_path / "h2o.arrow")
    assert {r["layer"] for r in trace.of_kind("evict").to_pylist()} == {1}
    config = loaded.config
    head_dim = config.hidden_size // config.num_attention_heads
    slot_bytes = len(lengths) * config.num_key_value_heads * head_dim * 2 * 4  # K and V, float32
    budget = max(int(0.1 * n) + int(0.1 * n) for n in lengths)
    assert by_step(trace, "prefill", "kv_device_bytes")[0] == (max(lengths) + budget) * slot_bytes
    assert by_step(trace, "decode_step", "kv_device_bytes") == [(max(lengths) + step + 1 + budget) * slot_bytes
                                                                for step in range(2)]


def test_detail_levels_shape_the_evict_events(peaky_tiny_llama: ModelSpec, tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(peaky_tiny_llama, "cpu", "float32")
    requests = [Request("req-0", list(range(300, 340)), max_new_tokens=3, ignore_eos=True)]
    counts = {}
    for detail in ("step", "layer", "head"):
        _, trace = run_policy(loaded, h2o_policy(loaded, engine="eager"), requests, tmp_path / f"{detail}.arrow",
                              detail)
        events = trace.of_kind("evict").to_pylist()
        counts[detail] = len(events)
        assert sum(e["tokens"] for e in events) == 2 * 2 * (40 - 8 + 2)  # layers x heads x (prefill + 2 steps)
        assert len(by_step(trace, "phase", "phase")) == (3 if detail == "step" else 6)
    assert counts == {"step": 3, "layer": 6, "head": 12}


@pytest.mark.parametrize("detail", ["step", "layer", "head"])
def test_h2o_traces_conform_at_every_detail(kvprof_conformance, detail: str) -> None:
    kvprof_conformance.check_strategy("h2o", {"heavy_ratio": "0.2"}, detail=detail)


def test_sliding_window_models_attend_as_with_the_full_cache(tmp_path: Path) -> None:
    # Mistral-style sliding window (8 tokens): h2o masks by true positions, transformers by its
    # sliding cache; with a budget that never evicts, the tokens must agree.
    tokenizer = resolve_model("tiny-llama", "random").tokenizer_path
    config = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 49152, "sliding_window": 8,
              "initializer_range": 0.15}
    torch.manual_seed(0)
    loaded = load_model(ModelSpec("tiny-mistral", "alias", None, config, "random", tokenizer), "cpu", "float32")
    rng = random.Random(1)
    requests = [Request(f"req-{i}", [rng.randrange(256, 49152) for _ in range(24)], max_new_tokens=6,
                        ignore_eos=True) for i in range(2)]
    full, _ = run_policy(loaded, FullCachePolicy(), requests, tmp_path / "full.arrow")
    with pytest.raises(UsageError, match="engine=eager"):
        h2o_policy(loaded, heavy_tokens="21", recent_tokens="8")
    h2o, trace = run_policy(loaded, h2o_policy(loaded, heavy_tokens="21", recent_tokens="8", engine="eager"),
                            requests, tmp_path / "h2o.arrow")
    assert trace.of_kind("evict").num_rows == 0
    assert h2o == full


# --- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"heavy_ratio": "-0.1"}, {"recent_ratio": "1.5"}, {"heavy_tokens": "-3"}, {"heavy_ratio": "lots"},
    {"exempt_layers": "0;1"}, {"budget": "0.2"},
])
def test_bad_options_are_usage_errors(options: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        parse_options(H2OStrategy.options, options)


@pytest.mark.parametrize("budget, prompt_len", [
    (Budget(heavy_ratio=0.0, recent_ratio=0.0), 100),
    (Budget(heavy_ratio=0.05, recent_ratio=0.05), 9),            # rounds down to 0 tokens
    (Budget(heavy_tokens=60, recent_tokens=50), 100),             # larger than prompt + 10 new tokens - 1
    (Budget(heavy_ratio=0.7, recent_ratio=0.4), 100),             # ratios larger than the prompt
])
def test_bad_budgets_are_usage_errors(budget: Budget, prompt_len: int) -> None:
    with pytest.raises(UsageError):
        budget.check()
        budget.for_request(prompt_len, max_new_tokens=10)


def test_token_budgets_may_cover_the_new_tokens() -> None:
    assert Budget(heavy_tokens=60, recent_tokens=49).for_request(100, max_new_tokens=10) == (60, 49)
    assert Budget().for_request(100, max_new_tokens=10) == (10, 10)


def test_cli_exits_2_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["trace", "--plugin", "h2o", "--model", "tiny-llama", "--weights", "random", "--prompt-len", "32",
            "--output-len", "2", "-o", str(tmp_path / "t.arrow")]
    for options in (["--opt", "heavy_ratio=-1"], ["--opt", "speed=fast"], ["--opt", "heavy_tokens=40"],
                    ["--opt", "exempt_layers=7"]):
        assert main(base + options) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvprof: error:")]
        assert len(errors) == 1, errors


def test_a_model_whose_attention_cannot_be_hooked_is_a_usage_error() -> None:
    # Bloom computes attention in its own module, not through transformers' AttentionInterface.
    tokenizer = resolve_model("tiny-llama", "random").tokenizer_path
    spec = ModelSpec("tiny-bloom", "alias", None, {"model_type": "bloom", "hidden_size": 32, "n_layer": 1,
                                                    "n_head": 2, "vocab_size": 49152}, "random", tokenizer)
    loaded = load_model(spec, "cpu", "float32", attn_implementation="eager")  # it has no sdpa either
    for engine in ("static", "eager"):
        with pytest.raises(UsageError, match="AttentionInterface"):
            h2o_policy(loaded, engine=engine)


# --- the embedded model (SmolLM2, real weights) ----------------------------------------------


@pytest.fixture(scope="module")
def passkey_requests(smollm2: LoadedModel) -> list[Request]:
    spec = WorkloadSpec("passkey", WorkloadParams(prompt_len=256, output_len=12, num_prompts=2, depth=0.4))
    return spec.build(smollm2.encode, smollm2.chat_wrapping()).requests


@pytest.fixture(scope="module")
def full_run(smollm2: LoadedModel, passkey_requests: list[Request], tmp_path_factory: pytest.TempPathFactory):
    return run_policy(smollm2, FullCachePolicy(), passkey_requests, tmp_path_factory.mktemp("full") / "full.arrow")


@pytest.mark.slow
def test_a_budget_holding_the_whole_sequence_gives_full_tokens(smollm2, passkey_requests, full_run, tmp_path) -> None:
    # H2O keeps its cache at the budget, evicting one token per decode step once the cache is
    # full; a budget of prompt + new tokens - 1 never evicts, and must then change nothing.
    longest = {len(r.prompt_token_ids) + r.max_new_tokens - 1 for r in passkey_requests}
    assert len(longest) == 1
    recent = 32
    policy = h2o_policy(smollm2, heavy_tokens=str(longest.pop() - recent), recent_tokens=str(recent))
    outputs, trace = run_policy(smollm2, policy, passkey_requests, tmp_path / "h2o.arrow")
    assert outputs == full_run[0]
    assert trace.of_kind("evict").num_rows == 0
    assert trace.of_kind("phase").num_rows > 0  # scores were kept all along


@pytest.mark.slow
def test_kv_bytes_at_a_20_percent_budget_are_20_percent_of_full(smollm2, passkey_requests, full_run, tmp_path) -> None:
    _, trace = run_policy(smollm2, h2o_policy(smollm2), passkey_requests, tmp_path / "h2o.arrow")
    full_trace = full_run[1]
    length = max(len(r.prompt_token_ids) for r in passkey_requests)
    budget = max(2 * int(0.1 * len(r.prompt_token_ids)) for r in passkey_requests)
    full_prefill = by_step(full_trace, "prefill", "kv_device_bytes")[0]
    h2o_prefill = by_step(trace, "prefill", "kv_device_bytes")[0]
    assert h2o_prefill == full_prefill * budget // length
    assert 0.18 < h2o_prefill / full_prefill <= 0.2
    # Decode adds a token and evicts one: the measured cache stays at the budget while full's
    # grows by a token per step (the runs may stop at different steps: EOS).
    full_steps = by_step(full_trace, "decode_step", "kv_device_bytes")
    h2o_steps = by_step(trace, "decode_step", "kv_device_bytes")
    assert min(len(full_steps), len(h2o_steps)) > 0
    assert set(h2o_steps) == {h2o_prefill}
    for step, (full_bytes, h2o_bytes) in enumerate(zip(full_steps, h2o_steps)):
        assert h2o_bytes == full_bytes * budget // (length + step + 1)
