"""Tests of kvprof-streamingllm, written as any plugin author would: through kvprof's public kit.

The `kvprof_conformance` fixture comes from kvprof's pytest plugin (entry point `pytest11`), so
installing kvprof is all it takes; it fails the test with a readable report on any problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvprof import WorkloadParams
from kvprof.cli import main
from kvprof.trace import read_trace

SINKS, RECENT = 4, 32
OPTIONS = {"sink_tokens": SINKS, "recent_tokens": RECENT}


def test_conforms(kvprof_conformance) -> None:
    report = kvprof_conformance.check_strategy("streamingllm", options=OPTIONS)
    assert report.counts["evict"] > 0  # the 128-token prompts overflow the 36-entry cache


def test_conforms_as_a_plain_sliding_window_at_step_detail(kvprof_conformance) -> None:
    kvprof_conformance.check_strategy("streamingllm", options={"sink_tokens": 0, "recent_tokens": 16}, detail="step")


def test_keeps_the_sinks_and_the_recent_window(kvprof_conformance) -> None:
    params = WorkloadParams(prompt_len=96, output_len=6, batch_size=2, num_prompts=2)
    report = kvprof_conformance.check_strategy("streamingllm", options=OPTIONS, workload="synthetic", params=params)
    trace = read_trace(report.trace_path)
    evicts = trace.of_kind("evict").to_pylist()
    last_fed = params.prompt_len + params.output_len - 2  # the last generated token is never fed back
    for request in ("req-0", "req-1"):
        evicted = [p for e in evicts if e["request_id"] == request for p in e["positions"][0]]
        assert sorted(evicted) == list(range(SINKS, last_fed + 1 - RECENT))  # each once, sinks never
    steps = trace.of_kind("decode_step").to_pylist()
    entry_bytes = evicts[0]["bytes"] // evicts[0]["tokens"]
    assert {s["kv_device_bytes"] for s in steps} == {2 * (SINKS + RECENT) * entry_bytes}  # really freed
    assert trace.run["deviations"][0].startswith("positions: cached keys keep the rotary positions")


def test_rows_of_different_lengths_lose_their_padding_too(tmp_path: Path, kvprof_conformance) -> None:
    # The built-in workloads give every request the same length; drive the runner directly.
    from kvprof import Profiler, Request, RunInfo
    from kvprof.models import resolve_model
    from kvprof.plugins import load_plugins
    from kvprof_streamingllm.policy import StreamingLLMPolicy
    from kvprof_transformers.loading import load_model
    from kvprof_transformers.runner import Runner

    model = resolve_model("tiny-llama", "random")
    path = tmp_path / "padded.arrow"
    run = RunInfo(strategy="streamingllm", model=model.to_dict(), workload={}, options=OPTIONS, trace_path=str(path))
    profiler = Profiler(load_plugins().manager, run)
    profiler.start()
    requests = [Request("short", list(range(300, 360)), 4, ignore_eos=True),
                Request("long", list(range(300, 390)), 4, ignore_eos=True)]
    Runner(load_model(model, "cpu"), StreamingLLMPolicy(SINKS, RECENT), profiler).run(requests, batch_size=2)
    profiler.end()

    kvprof_conformance.check_trace(path)
    after_prefill = [e for e in read_trace(path).of_kind("evict").to_pylist() if e["step"] is None]
    cut = {(e["request_id"], e["reason"]): e["tokens"] for e in after_prefill}
    # 90 slots cut to 36: the long row loses 54 tokens, the short one 30 padding slots and 24 tokens.
    assert cut == {("short", "streamingllm"): 24, ("short", "padding"): 30, ("long", "streamingllm"): 54}


def test_cli_trace_and_analyze(tmp_path: Path, capsys) -> None:
    path = tmp_path / "streamingllm.arrow"
    prompt_len, output_len = 128, 6
    assert main(["trace", "--plugin", "streamingllm", "--model", "tiny-llama", "--weights", "random",
                 "--workload", "passkey", "--prompt-len", str(prompt_len), "--output-len", str(output_len),
                 "--batch-size", "2", "--opt", f"recent_tokens={RECENT}", "-o", str(path)]) == 0
    capsys.readouterr()
    assert main(["analyze", str(path), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    # Per request: the prompt is cut to the cache after prefill, then one token goes per step.
    steps = output_len - 1
    evicted = results["summary"]["evictions"]["by_reason"]["streamingllm"]["tokens"]
    assert evicted == 2 * (prompt_len - (SINKS + RECENT) + steps)
    # The pass key sits mid-prompt: neither a sink nor recent. The first answer token was computed
    # before the cut (the question is in the prompt); none of the key is left for the other five.
    survival = results["retention"]["survival"]
    assert (survival["asked_first_token"], survival["asked_last_token"]) == (1.0, 0.0)
    assert survival["asked_mean"] == pytest.approx(1 / output_len)
    # The budget the strategy declares (kv_budget: sink + recent tokens) fills the budget column.
    budget = (SINKS + RECENT) / prompt_len
    assert read_trace(path).run["extra"]["kv_budget"] == {"fraction": None, "tokens": SINKS + RECENT}
    assert results["retention"]["budget"] == pytest.approx(budget)
    assert [row["budget"] for row in results["retention"]["accuracy"]] == [pytest.approx(budget)]
    assert main(["analyze", str(path), "--only", "retention"]) == 0
    table = capsys.readouterr().out
    (row,) = [line for line in table.splitlines() if "passkey" in line]
    assert row.replace("│", " ").split()[3] == f"{budget:.3f}", table  # the budget column
