"""The analyses on small hand-built traces whose right answers are worked out by hand
(timelines in tests/analysis_traces.py)."""

from __future__ import annotations

import json

import pytest

from analysis_traces import (
    MS,
    batch_events,
    batch_trace,
    ev,
    passkey_requests,
    retention_trace,
    run_info,
    write_trace,
)
from kvprof import Kind, UsageError
from kvprof.analysis import analyze
from kvprof.analysis.breakdown import breakdown
from kvprof.analysis.common import Events
from kvprof.analysis.compare import check_same_schema, check_same_workload, compare
from kvprof.analysis.retention import kv_budget, retention, wilson_interval
from kvprof.analysis.summary import (
    context_tokens_in_flight,
    decode_steps,
    finished_requests,
    inter_token_latencies_ns,
    summary,
)
from kvprof.analysis.tables import breakdown_tables
from kvprof.errors import NotApplicable
from kvprof.trace import Trace, read_trace


@pytest.fixture
def batch(tmp_path) -> Trace:
    return read_trace(batch_trace(tmp_path / "batch.arrow"))


# --- summary --------------------------------------------------------------------------------


def test_latencies_follow_the_published_formulas(batch):
    latency = summary(batch)["latency_ms"]
    # TTFT: both prefills end at 11 ms, both requests arrived at 1 ms.
    assert latency["ttft"]["median"] == pytest.approx(10.0) and latency["ttft"]["count"] == 2
    # E2E: req-0 26 - 1 = 25 ms, req-1 20 - 1 = 19 ms.
    assert (latency["e2e"]["min"], latency["e2e"]["max"]) == pytest.approx((19.0, 25.0))
    # TPOT: req-0 (25 - 10) / 3 = 5 ms, req-1 (19 - 10) / 2 = 4.5 ms.
    assert (latency["tpot"]["min"], latency["tpot"]["max"]) == pytest.approx((4.5, 5.0))
    # Request decode time = E2E - TTFT: 15 and 9 ms.
    assert latency["decode"]["mean"] == pytest.approx(12.0)


def test_inter_token_latencies_are_the_gaps_between_a_requests_tokens(batch):
    events = Events(batch)
    gaps = inter_token_latencies_ns(finished_requests(events), decode_steps(events))
    # req-0 takes steps ending at 15, 20, 26 after its first token at 11; req-1 those at 15, 20.
    assert sorted(gaps / MS) == pytest.approx([4, 4, 5, 5, 6])
    assert summary(batch)["latency_ms"]["itl"]["median"] == pytest.approx(5.0)


def test_throughput(batch):
    result = summary(batch)
    # decode: 2 + 2 + 1 tokens in 4 + 5 + 6 ms; total: 7 output tokens from 1 ms to 26 ms.
    assert result["throughput_tokens_per_s"]["decode"] == pytest.approx(5 / 0.015)
    assert result["throughput_tokens_per_s"]["total"] == pytest.approx(7 / 0.025)
    assert result["decode"] == {"steps": 3, "steps_counted": 3, "tokens": 5, "seconds": pytest.approx(0.015)}


def test_prefill_tokens_scheduled_into_a_step_are_not_decode_tokens(tmp_path):
    events = batch_events()
    step_0 = next(e for e in events if e.kind is Kind.DECODE_STEP)
    step_0.tokens, step_0.ext = 102, {"prefill_tokens": 100.0}  # an engine step that also prefilled
    only_prefill = ev(Kind.DECODE_STEP, 10, 11, step=-1, tokens=50, ext={"prefill_tokens": 50.0})
    events.insert(1, only_prefill)
    result = summary(read_trace(write_trace(tmp_path / "mixed.arrow", events, run_info())))
    # Decode tokens 2 + 2 + 1 over the three steps that had any (4 + 5 + 6 ms), as in `batch`.
    assert result["throughput_tokens_per_s"]["decode"] == pytest.approx(5 / 0.015)


def test_warmup_steps_leave_the_first_steps_out(batch):
    result = summary(batch, warmup_steps=1)
    assert result["throughput_tokens_per_s"]["decode"] == pytest.approx(3 / 0.011)
    assert result["latency_ms"]["itl"]["count"] == 3 and result["latency_ms"]["itl"]["min"] == pytest.approx(5.0)
    assert result["latency_ms"]["ttft"]["median"] == pytest.approx(10.0)  # per request: unchanged
    with pytest.raises(UsageError, match="warmup"):
        summary(batch, warmup_steps=-1)


def test_context_tokens_in_flight(batch):
    events = Events(batch)
    # After step 0: (100 + 1) + (80 + 1); step 1: 102 + 82; step 2: req-0 alone, 103.
    assert context_tokens_in_flight(finished_requests(events), decode_steps(events)).tolist() == [182, 184, 103]


def test_memory_kv_evictions_and_transfers(batch):
    result = summary(batch)
    assert result["memory_peak_bytes"] == {"allocated": 600e6, "reserved": 700e6, "nvml_used": 900e6,
                                           "host_rss": None}
    assert result["kv_bytes"]["device"] == {"peak": 184_000, "final": 51_500}
    assert result["kv_bytes"]["host"] == {"peak": 51_500, "final": 51_500}
    assert result["kv_bytes"]["aux_device"] == {"peak": None, "final": None}
    # 1000 B per context token at every step; device KV per token: 1000, 1000, 500 B -> median 1e6 tokens/GB.
    assert result["kv_per_token"]["kv_bytes_per_token"] == pytest.approx(1000.0)
    assert result["kv_per_token"]["memory_efficiency_tokens_per_gb"] == pytest.approx(1e6)
    assert result["evictions"] == {"events": 2, "tokens": 5, "bytes": 5000, "simulated_events": 0,
                                   "by_reason": {"h2o": {"events": 2, "tokens": 5, "bytes": 5000}}}
    transfers = result["transfers"]
    assert transfers["store"]["bandwidth_bytes_per_s"] == pytest.approx(2e6 / 1e-3)
    assert transfers["fetch"]["bandwidth_bytes_per_s"] == pytest.approx(1e6 / 2e-3)
    assert transfers["prefetch"]["events"] == 1
    assert result["run"]["duration_s"] == pytest.approx(0.030)
    assert result["run"]["profiler_cost_share"] == pytest.approx(0.1)
    assert result["requests"] == {"finished": 2, "planned": None, "failed": None, "unfinished_with_first_token": 0,
                                  "prompt_tokens": 180, "output_tokens": 7}


def test_a_run_of_one_token_has_no_decode_figures(tmp_path):
    events = [ev(Kind.RUN_START, 0), ev(Kind.PREFILL, 1, 11, request_id="req-0", tokens=100),
              ev(Kind.REQUEST_END, 1, 11, request_id="req-0", tokens=1), ev(Kind.RUN_END, 12)]
    trace = read_trace(write_trace(tmp_path / "one.arrow", events, run_info()))
    result = summary(trace)
    assert result["latency_ms"]["ttft"]["median"] == pytest.approx(10.0)
    assert result["latency_ms"]["tpot"]["count"] == 0 and result["throughput_tokens_per_s"]["decode"] is None
    time = breakdown(trace)["time"]
    assert time["seconds"] == pytest.approx({"prefill": 0.010, "other": 0.002})
    assert time["per_step"] == {"start_s": [], "duration_ms": [], "phases_ms": {}, "overlapped_ms": {}}


def test_a_trace_without_events_or_requests_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no events"):
        summary(read_trace(write_trace(tmp_path / "e.arrow", [], run_info())))
    only_markers = [ev(Kind.RUN_START, 0), ev(Kind.RUN_END, 1)]
    with pytest.raises(UsageError, match="no requests"):
        summary(read_trace(write_trace(tmp_path / "m.arrow", only_markers, run_info())))


# --- breakdown ------------------------------------------------------------------------------


def test_time_breakdown_by_hand(batch):
    time = breakdown(batch)["time"]
    # prefill 1-11; steps 11-26 minus eviction 16-17 and kv_transfer 21-23; other 0-1 and 26-30.
    assert time["seconds"] == pytest.approx({"eviction": 0.001, "kv_transfer": 0.002, "prefill": 0.010,
                                             "decode_compute": 0.012, "other": 0.005})
    assert sum(time["share"].values()) == pytest.approx(1.0)
    per_step = time["per_step"]
    assert per_step["duration_ms"] == pytest.approx([4, 5, 6])
    assert per_step["phases_ms"] == {"kv_transfer": pytest.approx([0, 0, 2]), "eviction": pytest.approx([0, 1, 0]),
                                     "decode_compute": pytest.approx([4, 4, 4])}
    assert per_step["start_s"] == pytest.approx([0.011, 0.015, 0.020])


def test_phases_a_run_does_not_have_are_absent(tmp_path):
    plain = [e for e in batch_events() if e.kind is not Kind.PHASE]
    time = breakdown(read_trace(write_trace(tmp_path / "p.arrow", plain, run_info())))["time"]
    assert set(time["seconds"]) == {"prefill", "decode_compute", "other"}
    assert time["seconds"]["decode_compute"] == pytest.approx(0.015)


def test_overlapped_phases_are_reported_beside_the_split_not_in_it(tmp_path, batch):
    """Speculation on a side stream (ext overlapped=1) leaves the split as it was; the time its
    spans cover (their union) is reported beside it, in total and per decode step."""
    side = {"overlapped": 1.0}
    events = batch_events()
    events[6:6] = [ev(Kind.PHASE, 12, 14, phase="speculation", step=0, ext=side),
                   ev(Kind.PHASE, 13, 14, phase="speculation", step=0, ext=side),  # inside the first
                   ev(Kind.PHASE, 14.5, 16.5, phase="speculation", step=1, ext=side)]  # across steps 0 and 1
    time = breakdown(read_trace(write_trace(tmp_path / "o.arrow", events, run_info())))["time"]
    alone = breakdown(batch)["time"]
    assert time["seconds"] == pytest.approx(alone["seconds"]) and time["share"] == pytest.approx(alone["share"])
    assert time["per_step"]["phases_ms"] == alone["per_step"]["phases_ms"]
    assert time["overlapped"]["seconds"] == pytest.approx({"speculation": 0.004})
    assert time["overlapped"]["share"] == pytest.approx({"speculation": 4 / 30})
    assert time["per_step"]["overlapped_ms"] == {"speculation": pytest.approx([2.5, 1.5, 0.0])}
    assert alone["overlapped"] == {"labels": {}, "seconds": {}, "share": {}}
    (table, _) = breakdown_tables(breakdown(read_trace(tmp_path / "o.arrow")))
    assert table.rows[-1][0] == "speculation (beside)" and "not in their 100 %" in table.notes[-1]


def test_a_phase_inside_prefill_is_taken_from_prefill(tmp_path):
    events = batch_events()
    events.insert(3, ev(Kind.PHASE, 9, 11, phase="eviction"))  # H2O's eviction right after prefill
    time = breakdown(read_trace(write_trace(tmp_path / "p.arrow", events, run_info())))["time"]
    assert time["seconds"]["prefill"] == pytest.approx(0.008)
    assert time["seconds"]["eviction"] == pytest.approx(0.003)


def test_memory_breakdown_by_component(batch):
    memory = breakdown(batch)["memory"]
    assert memory["components"] == ["weights", "kv_device", "kv_host", "workspace"]
    series = memory["series"]
    # Moments: 11 ms (prefill, sample), 12 (sample), 15, 20, 26 (steps).
    assert series["t_s"] == pytest.approx([0.011, 0.012, 0.015, 0.020, 0.026])
    assert series["kv_device"] == [180_000, 180_000, 182_000, 184_000, 51_500]
    # workspace = allocated 500 MB - weights 100 MB - KV on the device.
    assert series["workspace"] == pytest.approx([500e6 - 100e6 - kv for kv in series["kv_device"]])
    assert memory["peak_bytes"]["kv_host"] == 51_500


def test_memory_breakdown_without_allocator_has_no_workspace(tmp_path):
    cpu = [e for e in batch_events() if e.kind is not Kind.SAMPLE]
    memory = breakdown(read_trace(write_trace(tmp_path / "c.arrow", cpu, run_info(weights_bytes=None))))["memory"]
    assert memory["components"] == ["kv_device", "kv_host"]
    # Largest KV total (device + host) is after step 1: 184 000 B.
    assert memory["at_peak"] == {"t_s": pytest.approx(0.020), "kv_device": 184_000, "kv_host": 0}


# --- retention ------------------------------------------------------------------------------


@pytest.fixture
def h2o_and_full(tmp_path) -> tuple[Trace, Trace]:
    h2o = retention_trace(tmp_path / "h2o.arrow", "h2o", ("The pass key is 12345.", "no idea"),
                          {"heavy_ratio": 0.1, "recent_ratio": 0.1}, kv_budget={"fraction": 0.2, "tokens": None})
    full = retention_trace(tmp_path / "full.arrow", "full", ("12345", "54321"), evictions=False)
    return read_trace(h2o), read_trace(full)


def test_accuracy_and_ratio_to_full(h2o_and_full):
    h2o, full = h2o_and_full
    result = retention(h2o, baseline=full)
    half = pytest.approx((0.0945, 0.9055), abs=1e-4)  # Wilson, 1 of 2 at 95 %
    assert result["overall"] == {"requests": 2, "correct": 1, "accuracy": 0.5, "interval_95": half,
                                 "baseline_accuracy": 1.0, "ratio": 0.5}
    assert result["accuracy"] == [{"kind": "passkey", "context_tokens": 100, "depth": 0.1, "question": "in_prompt",
                                   "budget": pytest.approx(0.2), "requests": 2, "correct": 1, "accuracy": 0.5,
                                   "interval_95": half, "baseline_accuracy": 1.0, "ratio": 0.5}]
    assert retention(h2o)["overall"]["ratio"] is None  # no baseline given: no ratio
    assert retention(full)["baseline"] == "self"
    assert retention(full)["budget"] is None and retention(full)["coverage"] is None


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_token_survival_per_answer_token_layer_and_head(h2o_and_full):
    h2o, full = h2o_and_full
    survival = retention(h2o)["survival"]
    spans = {s["request_id"]: s for s in survival["spans"]}
    # Span [10, 20), 10 tokens. Token 0 saw everything (evictions follow attention); token 1 lost the
    # prefill's evictions (L0H0 0.6, L0H1 0.8, L1H0 0.9, L1H1 0.7); token 2 also step 0's (L0H0 0.4, L0H1 0.7).
    req_0 = spans["req-0"]
    assert req_0["per_answer_token"] == pytest.approx([1.0, 0.75, 0.675])
    assert (req_0["first_token"], req_0["last_token"], req_0["min"]) == pytest.approx((1.0, 0.675, 0.4))
    layer_0, layer_1 = req_0["per_layer_head"]  # mean over the answer tokens
    assert (layer_0, layer_1) == (pytest.approx([2.0 / 3, 2.5 / 3]), pytest.approx([2.8 / 3, 0.8]))
    assert req_0["mean"] == pytest.approx(2.425 / 3)
    assert spans["req-1"]["mean"] == 1.0 and spans["req-1"]["answer_tokens"] == 2
    assert survival["asked_mean"] == pytest.approx((2.425 / 3 + 1.0) / 2)
    assert survival["asked_first_token"] == 1.0
    assert retention(full)["survival"]["asked_mean"] == 1.0


def test_fetched_coverage_on_a_hand_built_trace(tmp_path):
    """req-0's span [10, 20) over 2 layers x 2 KV heads. Step 0 (its 2nd token): layer 0 fetched
    whole, layer 1 head 0 half the span, head 1 none of it; step 1 (3rd token): layer 1 head 0
    all, head 1 half (one event per layer: a list per head). Its 1st token came from the prefill."""
    fetch = {"src_medium": "host", "dst_medium": "device"}
    events = [
        ev(Kind.RUN_START, 0),
        ev(Kind.PREFILL, 1, 11, request_id="req-0", tokens=100, ext={"prompt_tokens": 100.0}),
        ev(Kind.OFFLOAD, 11, 12, step=0, layer=0, tokens=101, **fetch),
        ev(Kind.OFFLOAD, 12, 13, step=0, request_id="req-0", layer=1, kv_head=0, tokens=7,
           positions=[[3, 10, 11, 12, 13, 14, 50]], ext={"speculated": 1.0}, **fetch),
        ev(Kind.OFFLOAD, 12, 13, step=0, request_id="req-0", layer=1, kv_head=1, tokens=1, positions=[[60]],
           ext={"speculated": 1.0}, **fetch),
        ev(Kind.DECODE_STEP, 11, 14, step=0, batch_size=1, tokens=1),
        ev(Kind.OFFLOAD, 14, 15, step=1, layer=0, tokens=102, **fetch),
        ev(Kind.OFFLOAD, 15, 16, step=1, request_id="req-0", layer=1, tokens=15,
           positions=[list(range(10, 20)), [15, 16, 17, 18, 19]], ext={"speculated": 1.0}, **fetch),
        ev(Kind.DECODE_STEP, 14, 17, step=1, batch_size=1, tokens=1),
        ev(Kind.REQUEST_END, 1, 17, request_id="req-0", tokens=3, text="12345"),
        ev(Kind.RUN_END, 18),
    ]
    run = run_info(strategy="infinigen", workload="passkey", requests=passkey_requests(("12345",)))
    coverage = retention(read_trace(write_trace(tmp_path / "ig.arrow", events, run)))["coverage"]
    (span,) = coverage["spans"]
    assert coverage["available"] and span["per_answer_token"] == pytest.approx([1.0, 0.625, 0.875])
    layer_0, layer_1 = span["per_layer_head"]  # mean over the answer tokens
    assert (layer_0, layer_1) == (pytest.approx([1.0, 1.0]), pytest.approx([2.5 / 3, 0.5]))
    assert coverage["asked_mean"] == pytest.approx(2.5 / 3) and coverage["asked_last_token"] == pytest.approx(0.875)
    # Speculated fetches without positions (below --detail head) cannot say what was fetched.
    unnamed = [e for e in events if e.kind != Kind.OFFLOAD or e.positions is None] + [
        ev(Kind.OFFLOAD, 12, 13, step=0, layer=1, tokens=8, ext={"speculated": 1.0}, **fetch)]
    trace = read_trace(write_trace(tmp_path / "unnamed.arrow", sorted(unnamed, key=lambda e: e.start_ns), run))
    assert retention(trace)["coverage"]["available"] is False


def test_retention_needs_probes(batch):
    with pytest.raises(NotApplicable, match="no retention probes"):
        retention(batch)
    run = analyze(batch)
    assert "retention" in run.skipped and set(run.results) == {"summary", "breakdown"}
    with pytest.raises(NotApplicable):
        analyze(batch, only=["retention"])


def test_baseline_must_have_run_the_same_prompts(tmp_path, h2o_and_full):
    h2o, _ = h2o_and_full
    other = run_info(strategy="full", workload="passkey", requests=passkey_requests(("99999", "54321")))
    baseline = read_trace(write_trace(tmp_path / "other.arrow", batch_events(), other))
    with pytest.raises(UsageError, match="did not run the same prompts"):
        retention(h2o, baseline=baseline)


def test_kv_budget_is_what_the_strategy_declared():
    def run(declared: dict | None, prompt_len: int = 256) -> dict:
        return {"extra": {} if declared is None else {"kv_budget": declared},
                "workload": {"params": {"prompt_len": prompt_len}}}

    assert kv_budget(run({"fraction": 0.15, "tokens": None})) == pytest.approx(0.15)
    assert kv_budget(run({"fraction": 0.2, "tokens": 64})) == pytest.approx(0.45)
    assert kv_budget(run({"fraction": None, "tokens": 64})) == 0.25
    assert kv_budget(run({"fraction": None, "tokens": 1024})) == 1.0
    assert kv_budget(run(None)) is None  # full and strategies that declare nothing: no budget


# --- compare --------------------------------------------------------------------------------


def _slowed(factor: int) -> list:
    events = batch_events()
    for event in events:
        event.start_ns, event.end_ns = event.start_ns * factor, event.end_ns * factor
    return events


def test_compare_ratios_to_the_baseline(tmp_path):
    fast = read_trace(write_trace(tmp_path / "fast.arrow", batch_events(), run_info(strategy="full")))
    slow = read_trace(write_trace(tmp_path / "slow.arrow", _slowed(2), run_info(strategy="h2o",
                                                                                  options={"heavy_ratio": 0.1})))
    result = compare([analyze(fast), analyze(slow)], baseline=0)
    rows = {row["key"]: row for row in result["rows"]}
    assert result["labels"] == ["full", "h2o heavy_ratio=0.1"] and result["baseline"] == "full"
    assert rows["ttft_median"]["values"] == pytest.approx([10.0, 20.0])
    assert rows["ttft_median"]["ratios"] == pytest.approx([1.0, 2.0])
    assert rows["decode_throughput"]["ratios"] == pytest.approx([1.0, 0.5])
    assert rows["decode_throughput"]["higher_is_better"] is True
    assert rows["time_eviction"]["values"] == pytest.approx([0.001, 0.002])
    assert "accuracy" not in rows  # no run has probes


def test_compare_refuses_different_workloads(tmp_path):
    a = read_trace(write_trace(tmp_path / "a.arrow", batch_events(), run_info()))
    b = read_trace(write_trace(tmp_path / "b.arrow", batch_events(), run_info(params={"prompt_len": 512})))
    with pytest.raises(UsageError, match=r"different workloads \(prompt_len=100 vs 512\).*--allow-different"):
        check_same_workload([a, b])
    check_same_workload([a, a])


def test_compare_refuses_different_schema_versions(batch):
    older = Trace(batch.path.with_name("old.arrow"), batch.table, batch.run, "0.9")
    with pytest.raises(UsageError, match="different schema versions"):
        check_same_schema([batch, older])
    check_same_schema([batch, Trace(batch.path.with_name("1.0.arrow"), batch.table, batch.run, "1.0")])


def test_the_built_in_analyses_are_registered_through_the_plugin_hook():
    from kvprof.plugins import load_plugins

    analyses = load_plugins().registry.analyses
    assert {"summary", "breakdown", "retention"} <= set(analyses)
    assert analyses["summary"].function is summary


def test_results_are_strict_json(batch):
    json.dumps(analyze(batch).results, allow_nan=False)



def test_labels_name_the_options_that_vary(tmp_path):
    from kvprof.analysis.common import strategy_labels, unique_labels

    def trace(name: str, plugin: str, options: dict) -> Trace:
        run = run_info(strategy=plugin, options=options)
        return read_trace(write_trace(tmp_path / f"{name}.arrow", batch_events(), run))

    runs = [trace("a", "h2o", {"heavy_ratio": 0.1, "recent_ratio": 0.1}),
            trace("b", "h2o", {"heavy_ratio": 0.2, "recent_ratio": 0.1}),
            trace("c", "full", {}), trace("d", "full", {})]
    assert strategy_labels(runs) == ["h2o heavy_ratio=0.1", "h2o heavy_ratio=0.2", "full", "full"]
    assert unique_labels(runs)[2:] == ["full [c]", "full [d]"]
