"""`kvprof sweep`: a grid of runs (strategies by prompt length, batch size, output length, KV
budget, request rate, and for the probe workloads prompts per point, passkey depth, fact count and
question mode), one trace per point, and the study's figures drawn from them.

A point's trace is `<folder>/<strategy>[-key=value...]-p<prompt>-b<batch>-o<output>[-r<rate>]` plus
`-n<prompts>` when they are not one batch, `-d<depth>`, `-f<facts>`, `-q<question>` when not the
defaults, then `.arrow`, with its result file (`.json`, see kvprof.analysis.results) beside it. A
run writes its trace under the partial name until it finishes (kvprof.trace.writer), so a point is
done exactly when its trace is complete: a resumed sweep skips those and runs every other point
again (killed, interrupted, failed, or an old trace that is truncated). Points that fail are
reported and left out of the figures; the sweep goes on with the next.

Probe workloads (passkey, facts) measure accuracy, so a point runs `PROBES_PER_POINT` prompts
unless `num_prompts` is given; other workloads run one batch per point.
"""

from __future__ import annotations

import gc
import itertools
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvprof.analysis.results import result_path, write_result
from kvprof.errors import UsageError
from kvprof.plugins import load_plugins
from kvprof.session import TraceSettings, run_trace
from kvprof.trace import TraceError, partial_path, read_trace
from kvprof.workloads import PROBE_WORKLOADS, WorkloadParams, WorkloadSpec

PROBES_PER_POINT = 20  # an accuracy from fewer prompts has an interval too wide to draw a figure from
DEFAULTS = WorkloadParams()
# Workload parameters named in a trace's file name when not their default: (name, letter).
NAMED_WHEN_SET = (("depth", "d"), ("num_facts", "f"), ("question", "q"))


@dataclass(frozen=True)
class SweepPoint:
    strategy: str
    options: tuple[tuple[str, str], ...]
    params: WorkloadParams

    def file_name(self) -> str:
        parts = [self.strategy, *(f"{key}={value}" for key, value in self.options),
                 f"p{self.params.prompt_len}", f"b{self.params.batch_size}", f"o{self.params.output_len}"]
        if self.params.rate is not None:
            parts.append(f"r{self.params.rate:g}")
        if self.params.num_prompts != self.params.batch_size:
            parts.append(f"n{self.params.num_prompts}")
        for name, letter in NAMED_WHEN_SET:
            value = getattr(self.params, name)
            if value != getattr(DEFAULTS, name):
                parts.append(f"{letter}{value:g}" if isinstance(value, float) else f"{letter}{value}")
        return "-".join(parts) + ".arrow"


def parse_grid(values: list[str]) -> dict[str, list[str]]:
    """`["heavy_ratio=0.1,0.2"]` -> `{"heavy_ratio": ["0.1", "0.2"]}`."""
    grid: dict[str, list[str]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise UsageError(f"--opt-grid {item!r}: expected KEY=V1,V2,...")
        grid[key.strip()] = [value.strip() for value in raw.split(",") if value.strip()]
    return grid


def plan(strategies: list[str], base: WorkloadParams, axes: dict[str, list[Any]],
         option_grid: dict[str, list[str]], workload: str = "synthetic") -> list[SweepPoint]:
    """Every point of the grid. An option axis applies only to the strategies that declare it.
    Without a `num_prompts` axis a point runs one batch, or, for a probe workload,
    `PROBES_PER_POINT` prompts (at least one batch)."""
    loaded = load_plugins()
    unused = set(option_grid)
    points = []
    for strategy in strategies:
        declared = {option.name for option in loaded.strategy(strategy).options}
        keys = [key for key in option_grid if key in declared]
        unused -= set(keys)
        for values in itertools.product(*(option_grid[key] for key in keys)):
            for workload_values in itertools.product(*axes.values()):
                changes = dict(zip(axes, workload_values))
                if "num_prompts" not in changes:
                    batch = changes.get("batch_size", base.batch_size)
                    changes["num_prompts"] = max(batch, PROBES_PER_POINT) if workload in PROBE_WORKLOADS else batch
                points.append(SweepPoint(strategy, tuple(zip(keys, values)), replace(base, **changes)))
    if unused:
        raise UsageError(f"--opt-grid {', '.join(sorted(unused))}: no swept strategy takes this option")
    return points


def planned_runs(points: list[SweepPoint], folder: Path, repeats: int = 1) -> list[tuple[SweepPoint, Path]]:
    """Every run of the sweep with its trace path, in the order they run."""
    runs = []
    for point in points:
        name = point.file_name()
        for repeat in range(repeats):
            runs.append((point, folder / (name if repeats == 1 else name.replace(".arrow", f"-{repeat}.arrow"))))
    return runs


@dataclass
class SweepOutcome:
    traces: list[Path]                                              # complete traces, in run order
    unfinished: list[tuple[Path, str]] = field(default_factory=list)  # (trace path, why) of the others


def unfinished_reason(path: Path) -> str | None:
    """None when `path` holds a complete trace of a run that finished, else why it does not
    (such a point is run again: a killed, interrupted or failed run, or no trace yet)."""
    if not path.exists():
        return "its run did not finish (a partial trace)" if partial_path(path).exists() else "not traced yet"
    try:
        trace = read_trace(path)
    except TraceError as exc:
        return f"unreadable trace ({exc})"
    if trace.damage:
        return "its trace is truncated" if trace.truncated else "its trace is damaged"
    return "its run failed" if trace.run_failed else None


def run_sweep(points: list[SweepPoint], folder: Path, workload: str, base_settings: TraceSettings,
              repeats: int = 1) -> SweepOutcome:
    """Run every point without a complete trace (a point whose run fails is reported and the
    sweep goes on); returns the complete traces and the points left unfinished.
    `base_settings.display` (a LiveDisplay), when set, gets a line per run and a sweep bar."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = planned_runs(points, folder, repeats)
    display = base_settings.display
    report = display.sweep_point_done if display is not None else print
    if display is not None:
        display.start_sweep(len(runs))
    outcome = SweepOutcome([])
    for point, path in runs:
        why = unfinished_reason(path)
        if why is None:
            report(f"sweep: {path.name} exists, skipped")
            outcome.traces.append(path)
            continue
        if path.exists():
            report(f"sweep: {path.name}: {why}; running it again")
        settings = replace(base_settings, strategy=point.strategy, options=dict(point.options),
                           workload=WorkloadSpec(workload, point.params), trace_path=path, overwrite=True)
        run = run_trace(settings)
        if run.error is not None:
            kept = partial_path(path)
            why = f"{type(run.error).__name__}: {run.error} (its events are in {kept.name})"
            report(f"sweep: {path.name} failed: {why}")
            outcome.unfinished.append((path, why))
        else:
            write_result(read_trace(path), result_path(path))
            report(f"sweep: {path.name} ({run.profiler.events_emitted} events, result {result_path(path).name})")
            outcome.traces.append(path)
        del run
        release_memory()
    return outcome


def release_memory() -> None:
    """Free the last run's model before the next loads: runs share one process, and a model
    kept alive by a reference cycle (hooks, policies) would otherwise stay on the device."""
    gc.collect()
    torch = sys.modules.get("torch")  # the core imports no framework; use torch only if loaded
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def draw(traces: list[Path], folder: Path) -> list[Path]:
    """Analyze the sweep's traces, each against the `full` run of its workload point when the
    sweep has one, and draw the study's figures into `folder`."""
    from kvprof.analysis import analyze
    from kvprof.analysis.plots import draw_figures
    loaded = [read_trace(path) for path in traces]
    baselines = {_workload_key(t): t for t in loaded if t.run.get("strategy") == "full"}
    runs = [analyze(trace, label=path.stem, baseline=baselines.get(_workload_key(trace)))
            for path, trace in zip(traces, loaded)]
    return draw_figures(runs, folder)


def _workload_key(trace: Any) -> str:
    return repr(sorted(trace.run.get("workload", {}).get("params", {}).items()))
