"""Strategies that compress the prompt once, at the end of prefill: peak memory told honestly.

The prompt's whole KV is resident when its forward ends, before the policy cuts it; the runner
measures device KV there too (prefill `ext["forward_kv_device_bytes"]`), so a compressor's peak
device KV is the full prompt's, not the budget's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compressors import OneShotCompressor, full_prompt_kv_bytes
from kvprof import Request
from kvprof.analysis.summary import summary
from kvprof.models import resolve_model
from kvprof_transformers.loading import LoadedModel, load_model
from transformers_runs import run_policy

BUDGET = 24


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(resolve_model("tiny-llama", "random"), "cpu")


def padded_requests() -> list[Request]:
    """Two prompts of different lengths: the short one is left-padded."""
    return [Request("short", list(range(300, 360)), 4, ignore_eos=True),
            Request("long", list(range(300, 390)), 4, ignore_eos=True)]


def test_a_compressors_peak_device_kv_is_the_full_prompts(tiny: LoadedModel, tmp_path: Path) -> None:
    requests = padded_requests()
    _, trace = run_policy(tiny, OneShotCompressor(BUDGET), requests, tmp_path / "oneshot.arrow")
    width = max(len(r.prompt_token_ids) for r in requests)
    full_prompt = full_prompt_kv_bytes(tiny.config, len(requests), width, tiny.dtype)
    budget = full_prompt_kv_bytes(tiny.config, len(requests), BUDGET, tiny.dtype)

    prefills = trace.of_kind("prefill").to_pylist()
    assert {dict(p["ext"])["forward_kv_device_bytes"] for p in prefills} == {full_prompt}
    assert {p["kv_device_bytes"] for p in prefills} == {budget}  # after the cut
    steps = trace.of_kind("decode_step")["kv_device_bytes"].to_pylist()
    assert max(steps) < full_prompt  # the steps alone would understate the peak
    assert summary(trace)["kv_bytes"]["device"]["peak"] == full_prompt


def test_policy_ns_spans_the_policys_after_prefill_work(tiny: LoadedModel, tmp_path: Path) -> None:
    _, trace = run_policy(tiny, OneShotCompressor(BUDGET), padded_requests(), tmp_path / "oneshot.arrow")
    prefill = trace.of_kind("prefill").to_pylist()[0]
    cut = [e for e in trace.of_kind("evict").to_pylist() if e["step"] is None]
    policy_start = prefill["end_ns"] - dict(prefill["ext"])["policy_ns"]
    assert cut and all(policy_start <= e["start_ns"] <= e["end_ns"] <= prefill["end_ns"] for e in cut)
