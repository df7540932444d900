"""Strategies that compress the prompt once, at the end of prefill: peak memory told honestly.

The prompt's whole KV is resident when its forward ends, before the policy cuts it; the runner
measures device KV there too (prefill `ext["forward_kv_device_bytes"]`), so a compressor's peak
device KV is the full prompt's, not the budget's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compressors import KeysOnlyBytes, MaskOnlyCompressor, OneShotCompressor, full_prompt_kv_bytes
from kvprof import Request
from kvprof.analysis.summary import summary
from kvprof.models import resolve_model
from kvprof.testing import conformance
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


# --- the conformance kit checks the cut byte for byte ------------------------------------------


def test_an_honest_compressor_conforms_at_every_detail(tiny: LoadedModel, tmp_path: Path) -> None:
    for detail in ("step", "layer", "head"):
        _, trace = run_policy(tiny, OneShotCompressor(BUDGET), padded_requests(), tmp_path / f"{detail}.arrow",
                              detail=detail)
        report = conformance.check_trace(trace)
        assert report.ok, report.format()
        assert {e["reason"] for e in trace.of_kind("evict").to_pylist()} == {"oneshot", "padding"}


def test_masking_after_prefill_while_reporting_bytes_freed_fails(tiny: LoadedModel, tmp_path: Path) -> None:
    _, trace = run_policy(tiny, MaskOnlyCompressor(BUDGET), padded_requests(), tmp_path / "mask.arrow")
    report = conformance.check_trace(trace)
    first = report.problems[0]
    evicts = trace.of_kind("evict").to_pylist()
    prefill = trace.of_kind("prefill").to_pylist()[0]
    reported = sum(e["bytes"] for e in evicts)
    resident = int(dict(prefill["ext"])["forward_kv_device_bytes"])
    assert resident == prefill["kv_device_bytes"]  # nothing left the device
    assert (first.check, first.seq) == ("accounting", evicts[0]["seq"])
    assert (f"the evict events at seq {evicts[0]['seq']}..{evicts[-1]['seq']} report {reported} bytes freed from "
            f"the device after prefill, but device KV was {resident} bytes when the prompt's forward ended and "
            f"{resident} bytes after the policy's post-prefill work") in first.message
    assert f"{resident} - {resident} = 0 bytes left the device: {reported} bytes reported as freed are still " \
           "resident" in first.message
    assert "Either the strategy only masks those entries" in first.message
    assert "or its evict events over-count bytes" in first.message
    assert str(first).startswith(f"[accounting] seq {evicts[0]['seq']}: ")


def test_under_reported_frees_after_prefill_fail_naming_both_causes(tiny: LoadedModel, tmp_path: Path) -> None:
    _, trace = run_policy(tiny, KeysOnlyBytes(BUDGET), padded_requests(), tmp_path / "keys.arrow")
    report = conformance.check_trace(trace)
    first = report.problems[0]
    prefill = trace.of_kind("prefill").to_pylist()[0]
    before, after = int(dict(prefill["ext"])["forward_kv_device_bytes"]), prefill["kv_device_bytes"]
    reported = sum(e["bytes"] for e in trace.of_kind("evict").to_pylist())
    assert reported * 2 == before - after  # keys only: half of what left
    assert (first.check, first.seq) == ("accounting", prefill["seq"])
    assert f"{before} - {after} = {before - after} bytes left the device" in first.message
    assert f"account for {reported}: {before - after - reported} bytes left the device unreported" in first.message
    assert "Either the strategy dropped entries without an evict event" in first.message
    assert "or its evict events under-count bytes" in first.message
    assert "still resident" not in report.format()  # it points the right way, and only that way
