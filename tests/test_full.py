"""The `full` baseline on the real embedded model, end to end through the CLI."""

import json
import subprocess
import sys

import pytest

from kvprof.trace import read_trace
from kvprof.trace.validate import validate_trace
from kvprof.workloads import answer_is_correct

KVPROF = [sys.executable, "-m", "kvprof.cli"]
PASSKEY_CONTEXT = 1024  # tokens


@pytest.fixture(scope="module")
def passkey_trace(tmp_path_factory, embedded_checkpoint_dir):
    path = tmp_path_factory.mktemp("full") / "passkey.arrow"
    result = subprocess.run(
        [*KVPROF, "trace", "--plugin", "full", "--model", "smollm2-135m", "--workload", "passkey",
         "--prompt-len", str(PASSKEY_CONTEXT), "--output-len", "10", "--batch-size", "2",
         "--depth", "0.4", "-o", str(path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return path


@pytest.mark.slow
def test_full_answers_the_passkey_on_the_real_model(passkey_trace):
    trace = read_trace(passkey_trace)
    probes = {r["request_id"]: r["probe"] for r in trace.run["workload"]["requests"]}
    ends = trace.of_kind("request_end").to_pylist()
    assert len(ends) == 2
    for end in ends:
        assert answer_is_correct(probes[end["request_id"]], end["text"]), (end["text"], probes[end["request_id"]])
    assert trace.run["model"]["weights"] == "real"
    assert all(r["prompt_tokens"] == PASSKEY_CONTEXT for r in trace.run["workload"]["requests"])


@pytest.mark.slow
def test_events_are_complete_and_measured(passkey_trace):
    trace = read_trace(passkey_trace)
    assert validate_trace(passkey_trace) == ([], [])
    kinds = trace.table["kind"].cast("string").to_pylist()
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    steps = trace.of_kind("decode_step").to_pylist()
    assert steps, "no decode steps"
    # KV bytes are measured from the tensors: 2 (K,V) x layers x batch x kv heads x head dim x
    # dtype bytes per cached token, and they grow by exactly one token per step.
    config = trace.run["model"]["config"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4  # fp32
    growth = [b["kv_device_bytes"] - a["kv_device_bytes"] for a, b in zip(steps, steps[1:])]
    assert set(growth) == {per_token}
    prefill = trace.of_kind("prefill").to_pylist()[0]
    assert prefill["end_ns"] > prefill["start_ns"]
    assert prefill["kv_device_bytes"] == per_token * PASSKEY_CONTEXT
    assert all(s["start_ns"] >= prefill["end_ns"] for s in steps)


@pytest.mark.slow
def test_analyze_prints_the_summary(passkey_trace):
    result = subprocess.run([*KVPROF, "analyze", str(passkey_trace), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary  # the analyses' own tests check each figure; here: it runs on a real trace
    table = subprocess.run([*KVPROF, "analyze", str(passkey_trace)], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "TTFT" in table.stdout
