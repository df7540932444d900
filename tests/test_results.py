"""The JSON result file `kvprof trace` writes beside its trace, TTFT with queueing on a
multi-batch run, goodput, and CSVs that carry the run label."""

import csv
import json

import numpy as np
import pytest

from kvprof import UsageError, cli
from kvprof.analysis.common import distribution, parse_percentiles
from kvprof.analysis.summary import parse_slo

TINY = ["--plugin", "full", "--model", "tiny-llama", "--weights", "random", "--prompt-len", "16", "--output-len", "4"]


@pytest.fixture(scope="module")
def three_batches(tmp_path_factory):
    """5 requests in batches of 2 (3 batches, all arriving at the run's start), with a result file."""
    folder = tmp_path_factory.mktemp("results")
    trace = folder / "run.arrow"
    status = cli.main(["trace", *TINY, "--batch-size", "2", "--num-prompts", "5", "-o", str(trace),
                       "--label", "tiny full", "--metadata", "host=ci", "--metadata", "note=a=b",
                       "--percentiles", "50,95,99.9", "--slo", "ttft=100000,tpot=100000"])
    assert status == 0
    return trace, json.loads(trace.with_suffix(".json").read_text())


def test_result_file_fields(three_batches):
    trace, result = three_batches
    assert result["trace"] == str(trace)
    assert result["label"] == "tiny full"
    assert result["metadata"] == {"host": "ci", "note": "a=b"}
    assert result["run"]["strategy"] == "full"
    assert result["run"]["model"]["name"] == "tiny-llama" and result["run"]["model"]["weights"] == "random"
    assert result["run"]["workload"]["params"]["num_prompts"] == 5
    environment = result["environment"]
    assert environment["versions"]["torch"] and environment["python"]
    assert environment["hardware"]["cpu_cores"] >= 1 and environment["hardware"]["memory_bytes"] > 0
    assert result["failures"] == {"run_failed": False, "error": None, "requests_planned": 5, "requests_finished": 5,
                                  "requests_failed": 0, "trace_warnings": []}
    ttft = result["summary"]["latency_ms"]["ttft"]
    assert {"count", "mean", "std", "median", "p50", "p95", "p99.9", "min", "max"} == set(ttft)
    records = [r for r in result["requests"] if r["finished"]]
    assert len(records) == 5
    values = np.array([r["ttft_ms"] for r in records])
    assert ttft["std"] == pytest.approx(values.std()) and ttft["p95"] == pytest.approx(np.percentile(values, 95))
    assert result["summary"]["formulas"]["ttft"].startswith("TTFT = end of the request's last prefill chunk - arrival")
    assert all(r["output_tokens"] == 4 and r["prompt_tokens"] == 16 for r in records)


def test_ttft_counts_the_queueing_of_later_batches(three_batches):
    _, result = three_batches
    by_id = {r["request_id"]: r for r in result["requests"]}
    batches = [["req-0", "req-1"], ["req-2", "req-3"], ["req-4"]]
    assert all(by_id[r]["arrival_ms"] == 0 for batch in batches for r in batch)  # a batch runner: all at once
    for earlier, later in zip(batches, batches[1:]):
        # a later batch starts after the earlier one's last token: it queued at least that long
        for request in later:
            assert by_id[request]["queue_ms"] >= max(by_id[r]["e2e_ms"] for r in earlier)
            assert by_id[request]["ttft_ms"] > by_id[request]["queue_ms"]
    assert max(by_id[r]["queue_ms"] for r in batches[0]) < min(by_id[r]["queue_ms"] for r in batches[1])
    queue = result["summary"]["latency_ms"]["queue"]
    assert queue["max"] == pytest.approx(max(r["queue_ms"] for r in by_id.values()))


def test_goodput_counts_the_requests_within_every_bound(three_batches, capsys):
    trace, result = three_batches
    assert result["goodput"]["good_requests"] == 5 and result["goodput"]["share"] == 1.0
    records = [r for r in result["requests"] if r["finished"]]
    bound = next(r["ttft_ms"] for r in records if r["request_id"] == "req-2")  # the first two batches meet it
    assert cli.main(["analyze", str(trace), "--only", "summary", "--json", "--slo", f"ttft={bound!r}"]) == 0
    goodput = json.loads(capsys.readouterr().out)["results"]["summary"]["goodput"]
    assert goodput["good_requests"] == 4 and goodput["share"] == pytest.approx(0.8)
    assert goodput["requests_per_s"] > 0


def test_csvs_say_which_run_each_row_is_from(three_batches, tmp_path):
    trace, _ = three_batches
    assert cli.main(["analyze", str(trace), "--only", "summary", "--csv", str(tmp_path)]) == 0
    for path in tmp_path.glob("*.csv"):
        rows = list(csv.reader(path.open()))
        assert rows[0][0] == "run" and {row[0] for row in rows[1:]} == {"tiny full"}, path.name


def test_a_failed_run_gets_a_result_file_that_says_so(tmp_path, monkeypatch, capsys):
    from kvprof.trace import partial_path
    from tests.test_cli import CrashingPlugin, trace_with_extra_plugin

    trace = tmp_path / "crash.arrow"
    status, _ = trace_with_extra_plugin(monkeypatch, capsys, CrashingPlugin(), "crasher",
                                        ["--plugin", "crashes", "-o", str(trace)])
    assert status == 1
    # beside the trace it describes, under the partial name: a previous run's result stays
    failures = json.loads(partial_path(trace).with_suffix(".json").read_text())["failures"]
    assert failures["run_failed"] is True
    assert failures["error"] == "RuntimeError: boom inside the plugin"


def test_no_result_and_result_path(tmp_path):
    assert cli.main(["trace", *TINY, "-o", str(tmp_path / "a.arrow"), "--no-result"]) == 0
    assert not (tmp_path / "a.json").exists()
    assert cli.main(["trace", *TINY, "-o", str(tmp_path / "b.arrow"), "--result", str(tmp_path / "r" / "b.json")]) == 0
    assert json.loads((tmp_path / "r" / "b.json").read_text())["summary"]["requests"]["finished"] == 1


def test_percentile_and_slo_parsing():
    assert parse_percentiles("50, 90,99.9") == (50.0, 90.0, 99.9)
    assert parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    for bad in ("0", "101", "a"):
        with pytest.raises(UsageError, match="--percentiles"):
            parse_percentiles(bad)
    for bad in ("ttft", "itl=5", "ttft=-1", "ttft=x", ""):
        with pytest.raises(UsageError, match="--slo"):
            parse_slo(bad)
    dist = distribution(np.array([1.0, 2.0, 3.0, np.nan]), percentiles=(50.0, 99.9))
    assert dist["std"] == pytest.approx(np.std([1, 2, 3])) and dist["p99.9"] == pytest.approx(2.998)
