"""Retention measured on real runs of the embedded SmolLM2: the question modes and token survival."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvprof import WorkloadParams, WorkloadSpec
from kvprof.analysis.retention import retention
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.trace import Trace, read_trace

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from common import run_strategy  # noqa: E402  (one in-process `kvprof trace` on a loaded model)


def trace(smollm2, tmp_path: Path, plugin: str, options: dict[str, str], question: str,
          detail: str = "layer", depth: float = 0.1) -> Trace:
    workload = WorkloadSpec("passkey", WorkloadParams(prompt_len=256, output_len=4, num_prompts=1, depth=depth,
                                                      question=question))
    path = tmp_path / f"{plugin}-{'-'.join(options.values())}-{question}-{detail}.arrow"
    run_strategy(load_plugins().registry, plugin, resolve_model("smollm2-135m"), smollm2,
                 options, workload, path, detail=detail)
    return read_trace(path)


@pytest.mark.parametrize("engine", ["static", "eager"])
def test_token_survival_is_the_same_at_every_detail_level(smollm2, tmp_path, engine):
    options = {"heavy_ratio": "0.1", "recent_ratio": "0.1", "engine": engine}
    details = ("step", "layer", "head") if engine == "static" else ("step", "layer")
    survival = {detail: retention(trace(smollm2, tmp_path, "h2o", options, "after", detail))["survival"]
                for detail in details}
    assert 0.0 < survival["layer"]["asked_mean"] < 1.0  # it evicted part of the needle, not all of it
    for detail in details:
        assert survival[detail] == survival["layer"], detail


def test_after_mode_evicts_before_the_question_is_seen(smollm2, tmp_path):
    """A strategy that keeps only the last tokens (and 4 sinks) loses a needle placed early: with the
    question after the context, already from the first answer token; with the question in the prompt,
    the first token still attends over everything (the cut follows the prefill's attention)."""
    last_n = {"sink_tokens": "4", "recent_tokens": "40"}
    after = trace(smollm2, tmp_path, "streamingllm", last_n, "after")
    in_prompt = trace(smollm2, tmp_path, "streamingllm", last_n, "in_prompt")
    survival = retention(after)["survival"]
    assert survival["asked_first_token"] == 0.0 and survival["asked_mean"] == 0.0
    assert retention(in_prompt)["survival"]["asked_first_token"] == 1.0
    # The needle's eviction comes before the follow-up turn (the question) is prefilled.
    prefills = [e for e in after.of_kind("prefill").to_pylist() if e["request_id"] == "req-0"]
    followup = next(e for e in prefills if dict(e["ext"]).get("followup") == 1.0)
    assert dict(followup["ext"])["prompt_tokens"] == 256 and followup["tokens"] < 40
    (start, end), = after.run["workload"]["requests"][0]["probe"]["spans"]
    needle_gone = [e for e in after.of_kind("evict").to_pylist() if e["request_id"] == "req-0"
                   and any(start <= p < end for head in e["positions"] for p in head)]
    assert needle_gone and needle_gone[0]["end_ns"] <= followup["start_ns"]
