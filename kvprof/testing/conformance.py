"""The conformance kit: run a strategy on a tiny model and check what it recorded.

    from kvprof.testing import conformance

    report = conformance.check_strategy("streamingllm", options={"recent_tokens": 32})
    assert report.ok, report.format()

`check_strategy` runs a registered strategy (by name) or any `Strategy` class on a small
workload, writes the trace and hands it to `check_trace`, which checks it against the published
schema (`kvprof validate`), the event contract (`kvprof.testing.checks`), and runs every
registered analysis on it. A strategy on an engine that cannot run here records a trace its own
way and calls `check_trace(path)`. In pytest, the `kvprof_conformance` fixture does the same and
fails the test with the report.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvprof.errors import UsageError
from kvprof.plugins import load_plugins
from kvprof.session import TraceSettings, run_trace
from kvprof.strategy import Strategy
from kvprof.testing.checks import Problem, run_checks
from kvprof.trace import Trace, partial_path, read_trace
from kvprof.trace.validate import validate_trace
from kvprof.workloads import WorkloadParams, WorkloadSpec


@dataclass
class ConformanceReport:
    """What the kit found. `ok` when there are no problems; `format()` is the readable text."""

    trace_path: Path
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)       # events per kind
    analyses: dict[str, str] = field(default_factory=dict)     # analysis -> "ok" | "skipped: why"
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items())) or "none"
        analyses = ", ".join(f"{name} {result}" for name, result in self.analyses.items()) or "none registered"
        verdict = "conforms" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"kvprof conformance: {self.trace_path}: {verdict}", f"  events: {counts}",
                 f"  analyses: {analyses}"]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise AssertionError with the report when there are problems."""
        if self.problems:
            raise AssertionError(self.format())


def check_trace(trace: str | os.PathLike | Trace) -> ConformanceReport:
    """Check a recorded trace: schema, event contract, and every registered analysis."""
    path = trace.path if isinstance(trace, Trace) else Path(trace)
    schema_problems, warnings = validate_trace(path)
    report = ConformanceReport(path, [Problem("schema", message) for message in schema_problems], warnings=warnings)
    try:
        loaded = trace if isinstance(trace, Trace) else read_trace(path)
    except UsageError:
        return report  # validate_trace has said why it cannot be read
    report.counts = dict(Counter(loaded.table["kind"].cast("string").to_pylist()))
    report.problems += run_checks(loaded)
    _run_analyses(loaded, report)
    return report


def _run_analyses(trace: Trace, report: ConformanceReport) -> None:
    for name, entry in load_plugins().registry.analyses.items():
        try:
            entry.function(trace)
        except UsageError as exc:  # the trace lacks what this analysis needs (say, probes)
            report.analyses[name] = f"skipped: {exc}"
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            report.analyses[name] = "failed"
            report.problems.append(Problem("analyses", f"analysis {name!r} failed on this trace: "
                                           f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"))
        else:
            report.analyses[name] = "ok"


def check_strategy(
    strategy: str | type[Strategy],
    options: dict[str, Any] | None = None,
    *,
    model: str = "tiny-llama",
    weights: str = "random",
    workload: str = "passkey",
    params: WorkloadParams | None = None,
    detail: str = "layer",
    device: str = "cpu",
    trace_dir: str | os.PathLike | None = None,
) -> ConformanceReport:
    """Run `strategy` (a registered name or a Strategy class) on a tiny model and check its trace.

    The defaults run two passkey requests of 128 tokens in one batch on `tiny-llama` (two
    layers, random weights) and generate 8 tokens each: seconds on a CPU. Choose `options` that
    make the strategy act on such a run (say, a cache budget below 128 tokens). A strategy that
    raises is a problem; the trace it wrote up to then is still checked.
    """
    params = params or WorkloadParams(prompt_len=128, output_len=8, batch_size=2, num_prompts=2)
    trace_dir = Path(trace_dir) if trace_dir is not None else Path(tempfile.mkdtemp(prefix="kvprof-conformance-"))
    plugins = load_plugins()
    strategy_cls = plugins.strategy(strategy) if isinstance(strategy, str) else strategy
    trace_path = trace_dir / f"{strategy_cls.name}-{detail}.arrow"
    settings = TraceSettings(strategy=strategy_cls.name, model=model, weights=weights,
                             workload=WorkloadSpec(workload, params), options=options or {}, device=device,
                             detail=detail, seed=params.seed, trace_path=trace_path, overwrite=True)
    error = run_trace(settings, plugins, strategy_cls).error
    report = check_trace(trace_path if error is None else partial_path(trace_path))
    if error is not None:
        report.problems.insert(0, Problem("run", f"strategy {strategy_cls.name!r} raised "
                                          f"{type(error).__name__}: {error}"))
    return report


