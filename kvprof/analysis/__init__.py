"""Analyses of kvprof traces. They read traces only, never a model or a framework.

    summary    latency (TTFT, TPOT, ITL, E2E, formulas stated), throughput, peak memory, KV per
               tier, evictions, offload volume and bandwidth, KV bytes per token
    breakdown  time per phase (per step and in total), memory per component over time
    retention  probe answer accuracy against the full baseline, token survival per layer/head
    compare    several runs side by side with ratios to a baseline
    export     Perfetto (Chrome trace JSON) and Parquet
    plots      the study's figures (matplotlib, optional)
    report     an HTML or Markdown page of tables and plots

`analyze(trace)` runs the built-in analyses (summary, breakdown, retention) on one trace;
`kvprof analyze` runs every analysis registered through `kvprof_register_analyses`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvprof.errors import UsageError
from kvprof.trace import Trace


@dataclass
class RunAnalysis:
    """One trace with the results of the analyses run on it."""

    trace: Trace
    label: str
    results: dict[str, Any] = field(default_factory=dict)   # analysis name -> JSON-ready result
    skipped: dict[str, str] = field(default_factory=dict)   # analysis name -> why it did not apply


def _accepted(function: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `params` that `function` takes (all of them if it takes **kwargs)."""
    signature = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        return dict(params)
    return {name: value for name, value in params.items() if name in signature}


def analyze(trace: Trace, analyses: Mapping[str, Callable[..., Any]] | None = None,
            only: list[str] | None = None, label: str | None = None, **params: Any) -> RunAnalysis:
    """Run `analyses` (name -> function(trace, **params); default: the built-in ones) on `trace`.

    Each function gets the `params` it accepts (warmup_steps, baseline, ...). An analysis that
    does not apply (`NotApplicable`) is skipped with its reason, unless it was named in `only`.
    """
    from kvprof.analysis.builtin import BUILTIN_ANALYSES
    from kvprof.analysis.common import run_label
    from kvprof.errors import NotApplicable

    analyses = dict(BUILTIN_ANALYSES if analyses is None else analyses)
    unknown = sorted(set(only or ()) - set(analyses))
    if unknown:
        raise UsageError(f"unknown analysis {', '.join(unknown)}; available: {', '.join(sorted(analyses))}")
    run = RunAnalysis(trace, label or run_label(trace))
    for name, function in analyses.items():
        if only and name not in only:
            continue
        try:
            run.results[name] = function(trace, **_accepted(function, params))
        except NotApplicable as exc:
            if only:
                raise
            run.skipped[name] = str(exc)
    return run


__all__ = ["RunAnalysis", "analyze"]
