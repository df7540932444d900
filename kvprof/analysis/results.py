"""The result file of a run: one JSON document beside its trace, as `vllm bench --save-result`
writes one (`kvprof trace` writes `<trace>.json` unless `--no-result`).

It holds what a person or a script comparing runs needs without reading the trace: the run's
label and metadata (`--label`, `--metadata k=v`), what ran (strategy, options, model,
workload), the hardware and software, the summary (latency distributions with std and the
`--percentiles` chosen, throughput, memory, KV, evictions, transfers; every formula stated),
goodput against `--slo` bounds, failures, the deviations the strategy recorded, and one record
per request. Keys are stable; units are in their names (`_ms`, `_bytes`, `_per_s`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kvprof import __version__
from kvprof.analysis.commands import jsonable
from kvprof.analysis.common import DEFAULT_PERCENTILES, run_label
from kvprof.analysis.summary import request_records, summary
from kvprof.errors import UsageError
from kvprof.trace import Trace

RESULT_VERSION = "1.0"


def result_path(trace_path: Path) -> Path:
    """`traces/run.arrow` -> `traces/run.json`."""
    return trace_path.with_suffix(".json")


def result_document(trace: Trace, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
                    slo: dict[str, float] | None = None, error: BaseException | None = None) -> dict[str, Any]:
    """The result document of one traced run (see the module docstring)."""
    run = trace.run or {}
    model = run.get("model") or {}
    workload = run.get("workload") or {}
    try:
        result = summary(trace, percentiles=percentiles, slo=slo)
    except UsageError:  # the run failed before its first request: no summary, the failure is recorded
        result = None
    requests = result["requests"] if result else {}
    return {
        "kvprof_result_version": RESULT_VERSION,
        "label": run_label(trace),
        "metadata": run.get("metadata") or {},
        "trace": str(trace.path),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {
            "run_id": run.get("run_id"), "strategy": run.get("strategy"), "plugin_version": run.get("plugin_version"),
            "options": run.get("options") or {}, "device": run.get("device"), "seed": run.get("seed"),
            "detail": run.get("detail"), "command": run.get("command"),
            "started": _iso(run.get("started_wall_s")),
            "model": {key: model.get(key) for key in ("name", "source", "weights", "hf_id", "path")},
            "workload": {"name": workload.get("name"), "params": workload.get("params") or {}},
            "extra": run.get("extra") or {},
        },
        "deviations": run.get("deviations") or [],
        "environment": {"kvprof": __version__, **(run.get("environment") or {})},
        "failures": {
            "run_failed": error is not None or not (result and result["run"]["finished"]),
            "error": f"{type(error).__name__}: {error}" if error is not None else None,
            "requests_planned": requests.get("planned"), "requests_finished": requests.get("finished"),
            "requests_failed": requests.get("failed"),
            "trace_warnings": list(trace.warnings),
        },
        "summary": result,
        "goodput": (result or {}).get("goodput"),
        "requests": request_records(trace) if result else [],
    }


def write_result(trace: Trace, path: Path, **options: Any) -> Path:
    """Write the result document of `trace` to `path` (strict JSON: NaN becomes null)."""
    document = jsonable(result_document(trace, **options))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def _iso(seconds: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds)) if seconds else None

