"""Several runs side by side, with ratios to a chosen baseline run.

Runs are comparable when they read the same trace schema version and ran the same workload
(name, parameters and, request by request, the same prompt lengths and probes). Different
workloads are refused unless the caller allows them (`--allow-different-workloads`), because
a ratio between runs of different prompts is not a comparison of strategies.

Each row of the comparison is one metric; `ratios` divide each run's value by the baseline's
(None where either is missing or the baseline is 0). Whether higher is better is stated per
row, so a reader (or a plot) does not have to guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvprof.analysis import RunAnalysis
from kvprof.analysis.breakdown import PHASE_LABELS
from kvprof.analysis.common import nested_number, ratio
from kvprof.errors import UsageError
from kvprof.trace import Trace


def check_same_schema(traces: list[Trace]) -> None:
    """Traces of one MAJOR schema version: minor versions read into the same table (1.0 and 1.1
    differ only in how the file stores it)."""
    versions = {trace.schema_version.split(".")[0] for trace in traces}
    if len(versions) > 1:
        listed = ", ".join(f"{trace.path} {trace.schema_version}" for trace in traces)
        raise UsageError(f"traces of different schema versions cannot be compared: {listed}")


def workload_identity(trace: Trace) -> dict[str, Any]:
    """What must match for two runs to have run the same workload."""
    workload = (trace.run or {}).get("workload") or {}
    return {
        "name": workload.get("name"),
        "params": workload.get("params"),
        "prompts": [(r.get("request_id"), r.get("prompt_tokens"), (r.get("probe") or {}).get("answer"))
                    for r in workload.get("requests") or []],
    }


def check_same_workload(traces: list[Trace]) -> None:
    """Refuse, naming the first difference, runs whose workloads differ."""
    reference = workload_identity(traces[0])
    for trace in traces[1:]:
        other = workload_identity(trace)
        if other == reference:
            continue
        if other["name"] != reference["name"]:
            what = f"workload {reference['name']} vs {other['name']}"
        elif other["params"] != reference["params"]:
            ours, theirs = reference["params"] or {}, other["params"] or {}
            keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            what = ", ".join(f"{k}={ours.get(k)} vs {theirs.get(k)}" for k in keys)
        else:
            what = "the prompts differ"
        raise UsageError(
            f"{traces[0].path} and {trace.path} ran different workloads ({what}); "
            "pass --allow-different-workloads to compare them anyway"
        )


@dataclass(frozen=True)
class Metric:
    """One comparison row: how to read it from a run's results."""

    key: str
    label: str
    unit: str
    higher_is_better: bool | None
    read: Callable[[dict[str, Any]], float | None]


def _path(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda results: nested_number(results, *keys)


METRICS: tuple[Metric, ...] = (
    Metric("ttft_median", "TTFT median", "ms", False, _path("summary", "latency_ms", "ttft", "median")),
    Metric("ttft_p99", "TTFT p99", "ms", False, _path("summary", "latency_ms", "ttft", "p99")),
    Metric("tpot_median", "TPOT median", "ms", False, _path("summary", "latency_ms", "tpot", "median")),
    Metric("itl_median", "ITL median", "ms", False, _path("summary", "latency_ms", "itl", "median")),
    Metric("itl_p99", "ITL p99", "ms", False, _path("summary", "latency_ms", "itl", "p99")),
    Metric("e2e_median", "E2E latency median", "ms", False, _path("summary", "latency_ms", "e2e", "median")),
    Metric("decode_throughput", "decode throughput", "tokens/s", True,
           _path("summary", "throughput_tokens_per_s", "decode")),
    Metric("total_throughput", "total throughput", "tokens/s", True,
           _path("summary", "throughput_tokens_per_s", "total")),
    Metric("peak_allocated", "peak allocated", "bytes", False, _path("summary", "memory_peak_bytes", "allocated")),
    Metric("peak_reserved", "peak reserved", "bytes", False, _path("summary", "memory_peak_bytes", "reserved")),
    Metric("peak_nvml", "peak NVML used", "bytes", False, _path("summary", "memory_peak_bytes", "nvml_used")),
    Metric("peak_host_rss", "peak host RSS", "bytes", False, _path("summary", "memory_peak_bytes", "host_rss")),
    Metric("kv_device_peak", "KV on device, peak", "bytes", False, _path("summary", "kv_bytes", "device", "peak")),
    Metric("kv_host_peak", "KV on host, peak", "bytes", None, _path("summary", "kv_bytes", "host", "peak")),
    Metric("aux_device_peak", "aux structures on device, peak", "bytes", False,
           _path("summary", "kv_bytes", "aux_device", "peak")),
    Metric("kv_bytes_per_token", "KV bytes per token", "bytes", False,
           _path("summary", "kv_per_token", "kv_bytes_per_token")),
    Metric("memory_efficiency", "memory efficiency (device KV)", "tokens/GB", True,
           _path("summary", "kv_per_token", "memory_efficiency_tokens_per_gb")),
    Metric("memory_efficiency_total", "memory efficiency (total KV)", "tokens/GB", True,
           _path("summary", "kv_per_token", "memory_efficiency_total_tokens_per_gb")),
    Metric("evicted_tokens", "evicted tokens", "tokens", None, _path("summary", "evictions", "tokens")),
    Metric("stored_bytes", "offloaded to host", "bytes", None, _path("summary", "transfers", "store", "bytes")),
    Metric("fetched_bytes", "fetched from host", "bytes", None, _path("summary", "transfers", "fetch", "bytes")),
    Metric("fetch_bandwidth", "fetch bandwidth", "bytes/s", True,
           _path("summary", "transfers", "fetch", "bandwidth_bytes_per_s")),
    Metric("accuracy", "retention accuracy", "share", True, _path("retention", "overall", "accuracy")),
    Metric("accuracy_ratio", "accuracy / full", "ratio", True, _path("retention", "overall", "ratio")),
    Metric("survival", "asked span still cached", "share", True, _path("retention", "survival", "asked_mean")),
)


def _phase_metrics(runs: list[RunAnalysis]) -> list[Metric]:
    """One row per phase any run has (seconds), in the breakdown's order."""
    seen: dict[str, None] = {}
    for run in runs:
        seen.update(dict.fromkeys(run.results.get("breakdown", {}).get("time", {}).get("seconds", {})))
    return [Metric(f"time_{phase}", f"time in {PHASE_LABELS.get(phase, phase)}", "s", False,
                   _path("breakdown", "time", "seconds", phase)) for phase in seen]


def compare(runs: list[RunAnalysis], baseline: int = 0) -> dict[str, Any]:
    """The comparison table of `runs` (already analyzed), ratios to `runs[baseline]`.
    Rows that no run has a value for are left out."""
    if not 0 <= baseline < len(runs):
        raise UsageError(f"--baseline {baseline}: there are {len(runs)} traces (0 to {len(runs) - 1})")
    rows = []
    for metric in (*METRICS[:-3], *_phase_metrics(runs), *METRICS[-3:]):
        values = [metric.read(run.results) for run in runs]
        if all(value is None for value in values):
            continue
        rows.append({
            "key": metric.key, "label": metric.label, "unit": metric.unit,
            "higher_is_better": metric.higher_is_better, "values": values,
            "ratios": [ratio(value, values[baseline]) for value in values],
        })
    return {
        "labels": [run.label for run in runs],
        "traces": [str(run.trace.path) for run in runs],
        "baseline": runs[baseline].label,
        "rows": rows,
    }
