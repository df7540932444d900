"""The runner's attention API: the attention of the last queries, on both engines, and a one-shot
prompt compressor built on it that passes the conformance kit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from compressors import AttentionCompressor
from kvprof import Request
from kvprof.models import resolve_model
from kvprof.testing import conformance
from kvprof_transformers.attention_access import AttentionRequest, AttentionView
from kvprof_transformers.loading import LoadedModel, load_model
from kvprof_transformers.plugin import TransformersStrategy
from kvprof_transformers.runner import CachePolicy, StaticPolicy
from transformers_runs import run_policy

LAST = 4
BUDGET = 24


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(resolve_model("tiny-llama", "random"), "cpu")


def padded_requests() -> list[Request]:
    return [Request("short", list(range(300, 350)), 3, ignore_eos=True),
            Request("long", list(range(500, 570)), 3, ignore_eos=True)]


class Recorder:
    """Keeps every view it is shown: (decoding, layer) -> views in call order."""

    attention_request = AttentionRequest(last_queries=LAST, queries=True, prefill=True, decode=True)

    def on_attention(self, view: AttentionView) -> None:
        self.views.setdefault((view.decoding, view.layer), []).append(
            AttentionView(view.layer, view.decoding, view.keys.clone(), view.query_valid.clone(),
                          view.probabilities.clone(), view.queries.clone()))


class EagerRecorder(Recorder, CachePolicy):
    name = "eager-recorder"

    def __init__(self) -> None:
        self.views: dict[tuple[bool, int], list[AttentionView]] = {}


class StaticRecorder(Recorder, StaticPolicy):
    name = "static-recorder"

    def __init__(self) -> None:
        super().__init__(graphs=False)
        self.views = {}


def reference_attention(loaded: LoadedModel, requests: list[Request]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """transformers' own eager attention weights of the left-padded prompts, per layer
    (batch, q_heads, width, width), and the (batch, width) real-token mask."""
    width = max(len(r.prompt_token_ids) for r in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, request in enumerate(requests):
        ids[row, width - len(request.prompt_token_ids):] = torch.tensor(request.prompt_token_ids)
        mask[row, width - len(request.prompt_token_ids):] = 1
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [a.float() for a in out.attentions], mask.bool()


def test_eager_engine_probabilities_are_transformers_attention_weights(tiny: LoadedModel, tmp_path: Path) -> None:
    policy = EagerRecorder()
    requests = padded_requests()
    run_policy(tiny, policy, requests, tmp_path / "eager.arrow")
    reference, real = reference_attention(tiny, requests)
    layers = tiny.config.get_text_config().num_hidden_layers
    for layer in range(layers):
        (view,) = policy.views[(False, layer)]
        assert view.probabilities.shape[2:] == (LAST, real.shape[1])
        assert torch.equal(view.query_valid, real[:, -LAST:])
        torch.testing.assert_close(view.probabilities, reference[layer][:, :, -LAST:], atol=1e-5, rtol=1e-4)
        assert view.queries.shape[2] == LAST
        # per KV head: every real query's row sums to 1, times the query heads of the group
        assert torch.allclose(view.per_kv_head().sum(-1), torch.full_like(view.per_kv_head().sum(-1),
                                                                          float(view.group * LAST)))
    steps = len(policy.views[(True, 0)])
    assert steps == requests[0].max_new_tokens - 1  # one view per layer and decode step
    assert policy.views[(True, 0)][0].probabilities.shape[2] == 1
    assert tiny.model.config._attn_implementation == "sdpa"  # the tap is removed after the run


def test_the_fast_engine_shows_the_same_attention(tiny: LoadedModel, tmp_path: Path) -> None:
    requests = padded_requests()
    eager, static = EagerRecorder(), StaticRecorder()
    run_policy(tiny, eager, requests, tmp_path / "eager.arrow")
    run_policy(tiny, static, requests, tmp_path / "static.arrow")
    assert eager.views.keys() == static.views.keys()
    for key, eager_views in eager.views.items():
        for seen, expected in zip(static.views[key], eager_views, strict=True):
            slots = expected.probabilities.shape[-1]
            torch.testing.assert_close(seen.probabilities[..., :slots], expected.probabilities, atol=1e-5, rtol=1e-4)
            assert not seen.probabilities[..., slots:].any()  # slots not written yet see nothing
            torch.testing.assert_close(seen.queries, expected.queries)
            assert torch.equal(seen.query_valid, expected.query_valid)


# --- a one-shot prompt compressor on the API --------------------------------------------------


def compressor_strategy(budget: int) -> type:
    class Compressor(TransformersStrategy):
        name = "attention-compressor"

        def make_policy(self, loaded: LoadedModel, options: dict) -> Any:
            return AttentionCompressor(budget)

    return Compressor


@pytest.mark.parametrize("detail", ["step", "layer", "head"])
def test_the_attention_compressor_passes_the_kit(detail: str, tmp_path: Path) -> None:
    report = conformance.check_strategy(compressor_strategy(BUDGET), detail=detail, trace_dir=tmp_path)
    assert report.ok, report.format()
    assert report.counts["evict"] > 0
    assert set(report.analyses.values()) == {"ok"}


def test_the_compressor_keeps_the_tokens_the_last_queries_attend_to(tiny: LoadedModel, tmp_path: Path) -> None:
    requests = padded_requests()
    _, trace = run_policy(tiny, AttentionCompressor(BUDGET, window=8), requests, tmp_path / "compressor.arrow")
    assert conformance.check_trace(trace).ok
    reference, real = reference_attention(tiny, requests)
    text = tiny.config.get_text_config()
    group = text.num_attention_heads // text.num_key_value_heads
    evicts = [e for e in trace.of_kind("evict").to_pylist() if e["reason"] == "attention-compressor"]
    for row, request in enumerate(requests):
        pad = real.shape[1] - len(request.prompt_token_ids)
        for layer in range(text.num_hidden_layers):
            weights = reference[layer][row, :, -8:]                       # (q_heads, 8, width)
            per_kv_head = weights.reshape(text.num_key_value_heads, group * 8, -1).sum(1)[:, pad:]
            (event,) = [e for e in evicts if e["request_id"] == request.request_id and e["layer"] == layer]
            for head, dropped in enumerate(event["positions"]):
                kept = set(range(len(request.prompt_token_ids))) - set(dropped)
                assert kept == set(per_kv_head[head].topk(BUDGET).indices.tolist())
