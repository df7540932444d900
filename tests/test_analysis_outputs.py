"""The analysis commands end to end: bad input, JSON/CSV output, compare, the Perfetto and
Parquet exports, plots and the report page. Hand-built traces from tests/analysis_traces.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pytest

from analysis_traces import batch_events, batch_trace, ev, retention_trace, run_info, write_trace
from kvprof.analysis import analyze
from kvprof.analysis.export import TRACKS, perfetto, write_parquet
from kvprof.cli import main
from kvprof.events import Kind
from kvprof.trace import arrow_schema, read_trace
from kvprof.trace.schema import META_VERSION

EXAMPLES = sorted((Path(__file__).parent.parent / "traces" / "examples").glob("*.arrow"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- bad input ------------------------------------------------------------------------------


def _arrow_stream(path: Path, schema: pa.Schema) -> Path:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema):
        pass
    return path


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.arrow", "no such trace file"),
    (lambda d: _file(d / "empty.arrow", b""), "empty file"),
    (lambda d: _file(d / "bad.arrow", b"not arrow at all"), "not an Arrow IPC file or stream"),
    (lambda d: _arrow_stream(d / "plain.arrow", pa.schema([("x", pa.int64())])), "not a kvprof trace"),
    (lambda d: _arrow_stream(d / "new.arrow", arrow_schema({}).with_metadata({META_VERSION: b"1.99"})), "newer"),
    (lambda d: write_trace(d / "header.arrow", [], run_info()), "holds no events"),
])
def test_bad_traces_are_one_line_and_exit_2(tmp_path, capsys, make, message):
    for command in ("analyze", "export"):
        status, out, err = run_cli(capsys, command, make(tmp_path))
        assert status == 2, (command, err)
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_retention_asked_of_a_trace_without_probes(tmp_path, capsys):
    status, _, err = run_cli(capsys, "analyze", batch_trace(tmp_path / "b.arrow"), "--only", "retention")
    assert status == 2 and "no retention probes" in err and len(err.strip().splitlines()) == 1
    status, out, _ = run_cli(capsys, "analyze", tmp_path / "b.arrow")  # not asked: a note, not an error
    assert status == 0 and "retention: not applicable" in out


def test_a_truncated_trace_is_analyzed_with_a_warning(tmp_path, capsys):
    path = write_trace(tmp_path / "cut.arrow", batch_events(), run_info(), finish=False)
    status, out, err = run_cli(capsys, "analyze", path, "--json")
    assert status == 0
    assert "warning" in err and "truncated" in err
    document = json.loads(out)
    assert document["truncated"] is True and document["results"]["summary"]["decode"]["steps"] == 3


# --- analyze outputs ------------------------------------------------------------------------


def test_analyze_json_and_terminal(tmp_path, capsys):
    path = batch_trace(tmp_path / "b.arrow")
    status, out, _ = run_cli(capsys, "analyze", path, "--json", "--warmup-steps", "1")
    results = json.loads(out)["results"]
    assert status == 0 and results["summary"]["latency_ms"]["ttft"]["median"] == pytest.approx(10.0)
    assert results["summary"]["warmup_steps"] == 1
    assert "TTFT = end of the request's last prefill chunk" in results["summary"]["formulas"]["ttft"]
    status, out, _ = run_cli(capsys, "analyze", path)
    assert status == 0
    for text in ("TTFT = end of the request's last prefill chunk", "decode throughput", "eviction bookkeeping",
                 "KV transfer", "Memory by component"):
        assert text in out


def test_analyze_csv(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "analyze", batch_trace(tmp_path / "b.arrow"), "--csv", tmp_path / "csv")
    assert status == 0 and "CSV" in out
    rows = {row["metric"]: row for row in csv.DictReader(open(tmp_path / "csv" / "summary.csv"))}
    assert float(rows["decode throughput"]["value"]) == pytest.approx(5 / 0.015)
    assert rows["decode throughput"]["unit"] == "tokens/s"
    breakdown = list(csv.DictReader(open(tmp_path / "csv" / "time-breakdown.csv")))
    assert {row["phase"]: float(row["time (s)"]) for row in breakdown}["prefill"] == pytest.approx(0.010)


def test_compare_command(tmp_path, capsys):
    full = retention_trace(tmp_path / "full.arrow", "full", ("12345", "54321"), evictions=False)
    h2o = retention_trace(tmp_path / "h2o.arrow", "h2o", ("12345", "no"), {"heavy_ratio": 0.1, "recent_ratio": 0.1})
    status, out, _ = run_cli(capsys, "compare", full, h2o, "--json")
    rows = {row["key"]: row for row in json.loads(out)["comparison"]["rows"]}
    assert status == 0
    assert rows["accuracy"]["values"] == [1.0, 0.5] and rows["accuracy_ratio"]["values"] == [1.0, 0.5]
    assert rows["survival"]["ratios"] == pytest.approx([1.0, (2.425 / 3 + 1.0) / 2])
    status, out, _ = run_cli(capsys, "compare", full, h2o, "--baseline", h2o)
    assert status == 0 and "Comparison" in out and "Ratio to h2o" in out

    other = write_trace(tmp_path / "other.arrow", batch_events(), run_info())
    status, _, err = run_cli(capsys, "compare", full, other)
    assert status == 2 and "different workloads" in err and len(err.strip().splitlines()) == 1
    status, _, _ = run_cli(capsys, "compare", full, other, "--allow-different-workloads", "--json")
    assert status == 0


# --- Perfetto -------------------------------------------------------------------------------


def check_chrome_trace(document: dict) -> None:
    """A structural check of the Chrome trace event format as Perfetto reads it."""
    events = document["traceEvents"]
    assert isinstance(events, list) and events
    named = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    flows: dict[int, list[dict]] = {}
    for event in events:
        assert event["ph"] in {"X", "M", "C", "b", "e", "s", "f"}, event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int) and isinstance(event["name"], str)
        if event["ph"] == "M":
            assert event["name"] in {"process_name", "thread_name"} and event["args"]["name"]
            continue
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0
        if event["ph"] == "X":
            assert isinstance(event["dur"], (int, float)) and event["dur"] >= 0 and event["tid"] in named
        elif event["ph"] == "C":
            assert event["args"] and all(isinstance(v, (int, float)) for v in event["args"].values())
        elif event["ph"] in "be":
            assert event["cat"] and event["id"]
        else:
            flows.setdefault(event["id"], []).append(event)
    for pair in flows.values():
        assert sorted(e["ph"] for e in pair) == ["f", "s"]
        source, target = sorted(pair, key=lambda e: e["ph"], reverse=True)
        assert target["bp"] == "e" and target["ts"] >= source["ts"]
    json.dumps(document, allow_nan=False)


def test_phases_on_another_stream_get_their_own_track(tmp_path):
    """Speculation beside the step (ext overlapped=1) overlaps the critical-path phases: on one
    track the slices would not nest."""
    events = batch_events()
    events.insert(6, ev(Kind.PHASE, 12, 16, phase="speculation", step=0, ext={"overlapped": 1.0}))
    document = perfetto(read_trace(write_trace(tmp_path / "s.arrow", events, run_info())))
    check_chrome_trace(document)
    slices = {e["name"]: e for e in document["traceEvents"] if e["ph"] == "X"}
    assert slices["speculation"]["tid"] == TRACKS["phases beside"]
    assert slices["eviction bookkeeping"]["tid"] == TRACKS["phases"]
    assert (slices["speculation"]["ts"], slices["speculation"]["dur"]) == (12_000.0, 4_000.0)


def test_perfetto_export_is_a_valid_chrome_trace(tmp_path):
    trace = read_trace(batch_trace(tmp_path / "b.arrow"))
    document = perfetto(trace)
    check_chrome_trace(document)
    events = document["traceEvents"]
    slices = {e["name"]: e for e in events if e["ph"] == "X"}
    # Microseconds from the run start (0 ms): step 0 ran 11-15 ms.
    assert (slices["decode step 0"]["ts"], slices["decode step 0"]["dur"]) == (11_000.0, 4_000.0)
    assert slices["prefill"]["args"] == {"requests": ["req-0", "req-1"], "tokens": 180}
    assert [e for e in events if e["name"] == "prefill"] == [slices["prefill"]]  # one slice per distinct span
    assert slices["KV transfer"]["tid"] == TRACKS["phases"] and slices["prefetch"]["tid"] == TRACKS["copies fetch"]
    kv = [e for e in events if e["ph"] == "C" and e["name"] == "KV bytes"]
    assert [e["ts"] for e in kv] == [11_000.0, 15_000.0, 20_000.0, 26_000.0]
    assert kv[-1]["args"] == {"device": 51_500.0, "host": 51_500.0}
    memory = [e for e in events if e["ph"] == "C" and e["name"] == "memory bytes"]
    assert memory[0]["args"] == {"allocated": 500e6, "reserved": 700e6} and memory[1]["args"] == {"nvml used": 900e6}
    requests = {(e["id"], e["ph"]): e["ts"] for e in events if e.get("cat") == "request"}
    assert requests[("req-0", "b")] == 1_000.0 and requests[("req-0", "e")] == 26_000.0
    # The store of positions {3, 4} (15-16 ms) is fetched back (position 4, 21-23 ms); the evictions
    # of positions 5-9 never are.
    flows = [e for e in events if e["ph"] in "sf"]
    assert [(e["ph"], e["tid"]) for e in flows] == [("s", TRACKS["copies store"]), ("f", TRACKS["copies fetch"])]
    assert 15_000 <= flows[0]["ts"] <= 16_000 and 21_000 <= flows[1]["ts"] <= 23_000


def test_whole_layer_copies_are_linked_by_layer(tmp_path):
    events = batch_events()
    for event in events:
        if event.kind.value == "offload":
            event.positions = None  # whole-layer copies, as the offload baseline reports them
    document = perfetto(read_trace(write_trace(tmp_path / "w.arrow", events, run_info())))
    check_chrome_trace(document)
    assert document["metadata"]["flows"] == 1


def test_export_commands(tmp_path, capsys):
    path = batch_trace(tmp_path / "b.arrow")
    status, out, _ = run_cli(capsys, "export", path)
    assert status == 0 and "ui.perfetto.dev" in out
    check_chrome_trace(json.loads((tmp_path / "b.perfetto.json").read_text()))
    status, _, _ = run_cli(capsys, "export", path, "--format", "parquet", "-o", tmp_path / "archive.parquet")
    assert status == 0


def test_parquet_keeps_events_and_metadata(tmp_path):
    import pyarrow.parquet as pq

    trace = read_trace(batch_trace(tmp_path / "b.arrow"))
    table = pq.read_table(write_parquet(trace, tmp_path / "b.parquet"))
    assert table.num_rows == trace.table.num_rows
    assert table.schema.metadata == trace.table.schema.metadata
    assert table["positions"].to_pylist() == trace.table["positions"].to_pylist()


# --- plots and report -----------------------------------------------------------------------


def _sweep(tmp_path: Path) -> list[Path]:
    """Two strategies at two batch sizes (the h2o runs take twice as long)."""
    paths = []
    for plugin, factor, options in (("full", 1, {}), ("h2o", 2, {"heavy_ratio": 0.1, "recent_ratio": 0.1})):
        for batch_size in (1, 2):
            events = batch_events()
            for event in events:
                event.start_ns, event.end_ns = event.start_ns * factor * batch_size, event.end_ns * factor * batch_size
            run = run_info(strategy=plugin, options=options, params={"batch_size": batch_size})
            paths.append(write_trace(tmp_path / f"{plugin}-{batch_size}.arrow", events, run))
    return paths


def test_plots_and_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = _sweep(tmp_path)
    status, out, _ = run_cli(capsys, "analyze", *paths, "--plots", tmp_path / "figs", "--report", tmp_path / "report")
    assert status == 0
    figures = {p.stem for p in (tmp_path / "figs").glob("*.png")}
    assert {"throughput_vs_batch_size", "e2e_vs_batch_size",
            "latency_breakdown", "memory_breakdown", "memory_over_time-0", "step_times-0"} <= figures
    # one prompt and one output length: no line against them; no probes: no accuracy
    assert not {"ttft_vs_prompt_length", "decode_time_vs_output_len", "accuracy_vs_budget"} & figures
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (tmp_path / "figs").glob("*.png"))
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<table>") >= 4 * 4 and "data:image/png;base64," in page and "src='figures/" not in page

    status, _, _ = run_cli(capsys, "compare", *paths[::2], "--allow-different-workloads",
                           "--report", tmp_path / "md", "--report-format", "md")
    markdown = (tmp_path / "md" / "README.md").read_text()
    assert status == 0 and "## Comparison" in markdown and "](figures/latency_breakdown.png)" in markdown
    assert markdown.count("Comparison\n") == 1  # the section's heading, not repeated by its table


def test_a_single_run_gets_only_the_figures_that_make_sense_for_one_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = _sweep(tmp_path)[0]
    status, _, _ = run_cli(capsys, "analyze", path, "--plots", tmp_path / "figs")
    assert status == 0
    figures = {p.stem for p in (tmp_path / "figs").glob("*.png")}
    assert figures == {"latency_breakdown", "memory_breakdown", "memory_over_time", "step_times"}


def test_integer_axes_get_integer_ticks(tmp_path):
    pytest.importorskip("matplotlib")
    from kvprof.analysis.plots import _pyplot, step_times, throughput_vs_batch_size

    runs = [analyze(read_trace(path)) for path in _sweep(tmp_path)]
    plt = _pyplot()
    for fig in (throughput_vs_batch_size(plt, runs), step_times(plt, runs[0])):
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
            assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
        plt.close(fig)


def test_report_shows_deviations_and_environment(tmp_path, capsys):
    from kvprof.analysis.report import write_report

    run = run_info(strategy="h2o", options={"heavy_ratio": 0.1})
    run["deviations"] = ["scores are kept per sequence"]
    run["environment"] = {"python": "3.11.7", "platform": "Linux", "versions": {"torch": "2.13.0"},
                          "hardware": {"cpu": "Xeon", "cpu_cores": 2, "memory_bytes": 2**34}}
    path = write_trace(tmp_path / "h2o.arrow", batch_events(), run)
    page = write_report([analyze(read_trace(path))], tmp_path / "report", plots=False).read_text()
    assert "Deviations from the published method" in page and "<li>scores are kept per sequence</li>" in page
    assert "<li>CPU: Xeon, 2 cores, 16.0 GiB memory</li>" in page and "torch 2.13.0" in page


def test_accuracy_against_budget_is_drawn_from_probe_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from kvprof.analysis.plots import draw_figures

    runs = [analyze(read_trace(retention_trace(tmp_path / f"{name}.arrow", name, texts, options)))
            for name, texts, options in (("full", ("12345", "54321"), {}),
                                         ("h2o", ("12345", "no"), {"heavy_ratio": 0.1, "recent_ratio": 0.1}))]
    runs[1] = analyze(read_trace(retention_trace(tmp_path / "h2o-declared.arrow", "h2o", ("12345", "no"),
                                                 kv_budget={"fraction": 0.2, "tokens": None})))
    assert "accuracy_vs_budget" in {p.stem for p in draw_figures(runs, tmp_path / "figs")}


# --- real traces ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_traces(path):
    """The real example traces (traced on the embedded SmolLM2; the passkey ones on the same prompts)."""
    trace = read_trace(path)
    full = read_trace(path.with_name("full-passkey.arrow")) if "passkey" in path.name else None
    run = analyze(trace, baseline=full)
    summary = run.results["summary"]
    assert summary["requests"]["finished"] == summary["requests"]["planned"] > 0
    assert summary["latency_ms"]["ttft"]["median"] > 0 and summary["throughput_tokens_per_s"]["decode"] > 0
    assert summary["kv_per_token"]["kv_bytes_per_token"] > 0
    assert run.results["retention"]["overall"]["baseline_accuracy"] is not None
    if trace.run["strategy"] == "h2o":
        assert summary["evictions"]["tokens"] > 0 and "eviction" in run.results["breakdown"]["time"]["seconds"]
        assert run.results["retention"]["survival"]["asked_mean"] < 1.0
    check_chrome_trace(perfetto(trace))
