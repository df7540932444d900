"""`kvprof sweep`: a grid of runs (strategies by prompt length, batch size, output length, KV
budget, request rate, and for the probe workloads prompts per point, passkey depth, fact count and
question mode), one trace per point, and the study's figures drawn from them.

A point's trace is `<folder>/<strategy>[-key=value...]-p<prompt>-b<batch>-o<output>[-r<rate>]` plus
`-n<prompts>` when they are not one batch, `-d<depth>`, `-f<facts>`, `-q<question>` when not the
defaults, then `.arrow`, with its result file (`.json`, see kvprof.analysis.results) beside it. A
run writes its trace under the partial name until it finishes (kvprof.trace.writer), so a point is
done exactly when its trace is complete: a resumed sweep skips those and runs every other point
again (killed, interrupted, failed, or an old trace that is truncated). Points that fail are
reported and left out of the figures; the sweep goes on with the next. That includes a point that
fails its preflight (kvprof.preflight) on what depends on the model: prompt + output over its
context, a probe prompt its tokenizer cannot fit. What no point can pass, or a point cannot
whatever the model (the model itself, device, dtype, the strategies' options; the workload
parameters, checked by `kvprof sweep`), is an argument error found before any run (check_grid).

`<folder>/index.json` lists every planned run (strategy, options, workload parameters, repeat,
trace and result file, status: done, failed with its error, or not run) with the key figures of
its result file; it is rewritten after every run, so a killed sweep still leaves it. A failure
that is the device (or pinned host memory) running out is marked `out_of_memory`: such a point
is part of the figure (it does not fit), not a hole in it.

Runs share one process, so the transformers strategies load the model once for all of them
(kvprof_transformers.model_cache). Repeats of a point run back to back: a repeat right after a
finished run of the same point skips the warm-up run (that run warmed the same shapes; the CUDA
allocator keeps its blocks between them as it does after a warm-up), and says so in its trace's
metadata (`warmup`).

Probe workloads (passkey, facts) measure accuracy, so a point runs `PROBES_PER_POINT` prompts
unless `num_prompts` is given; other workloads run one batch per point.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvprof.analysis.common import nested_number
from kvprof.analysis.results import result_path, write_result
from kvprof.errors import UsageError
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.preflight import check_device, check_dtype, check_trace_sink
from kvprof.session import TraceSettings, checked_options, default_device, run_trace
from kvprof.trace import Trace, TraceError, partial_path, read_trace
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


def check_grid(points: list[SweepPoint], folder: Path, settings: TraceSettings) -> None:
    """Raise UsageError, before any run, for what fails every point or a point whatever the model:
    the model and weights, dtype, device, the trace writer, each strategy's options. A point's
    checks that depend on the model are its own (run_trace's preflight, recorded by run_sweep)."""
    plugins = load_plugins()
    resolve_model(settings.model, settings.weights, plugins.registry.models)
    check_dtype(settings.dtype)
    check_device(settings.device or default_device())
    check_trace_sink(plugins.manager, folder)
    for strategy, options in dict.fromkeys((point.strategy, point.options) for point in points):
        checked_options(plugins.strategy(strategy), dict(options))


def run_sweep(points: list[SweepPoint], folder: Path, workload: str, base_settings: TraceSettings,
              repeats: int = 1) -> SweepOutcome:
    """Run every point without a complete trace (a point whose run fails, or that fails its
    preflight, is reported and the sweep goes on); returns the complete traces and the points
    left unfinished. Keeps `<folder>/index.json` (SweepIndex) up to date after every run.
    Raises UsageError before any run for an argument error (check_grid).
    `base_settings.display` (a LiveDisplay), when set, gets a line per run and a sweep bar."""
    check_grid(points, folder, base_settings)
    folder.mkdir(parents=True, exist_ok=True)
    runs = planned_runs(points, folder, repeats)
    index = SweepIndex(folder, runs, workload, base_settings, repeats)
    index.write()
    display = base_settings.display
    report = display.sweep_point_done if display is not None else print
    if display is not None:
        display.start_sweep(len(runs))
    outcome = SweepOutcome([])
    warm_point: SweepPoint | None = None  # the point whose run finished last in this process
    for number, (point, path) in enumerate(runs):
        why = unfinished_reason(path)
        if why is None:
            report(f"sweep: {path.name} exists, skipped")
            outcome.traces.append(path)
            index.done(number, path, existed=True)
            continue
        if path.exists():
            report(f"sweep: {path.name}: {why}; running it again")
        settings = replace(base_settings, strategy=point.strategy, options=dict(point.options),
                           workload=WorkloadSpec(workload, point.params), trace_path=path, overwrite=True,
                           metadata=dict(base_settings.metadata))
        if point == warm_point and base_settings.warmup_runs is None and warms_up(base_settings):
            settings.warmup_runs = 0
            settings.metadata["warmup"] = "none: the previous repeat of this point ran just before"
        index.running(number)
        started = time.perf_counter()
        try:
            run = run_trace(settings)
        except UsageError as exc:  # its preflight: nothing ran, nothing to free
            error = f"{type(exc).__name__}: {exc}"
            report(f"sweep: {path.name} failed its preflight: {error}")
            outcome.unfinished.append((path, error))
            index.failed(number, error, time.perf_counter() - started)
            warm_point = None
            continue
        wall_s = time.perf_counter() - started
        if run.error is not None:
            kept = partial_path(path)
            error = f"{type(run.error).__name__}: {run.error}"
            report(f"sweep: {path.name} failed: {error} (its events are in {kept.name})")
            outcome.unfinished.append((path, f"{error} (its events are in {kept.name})"))
            index.failed(number, error, wall_s)
            warm_point = None
        else:
            trace = read_trace(path)
            write_result(trace, result_path(path))
            report(f"sweep: {path.name} ({run.profiler.events_emitted} events, result {result_path(path).name})")
            outcome.traces.append(path)
            index.done(number, path, wall_s=wall_s, trace=trace)
            del trace
            warm_point = point
        del run
        following = runs[number + 1][0] if number + 1 < len(runs) else None
        release_memory(keep_allocator_cache=warm_point is not None and following == warm_point)
    return outcome


def warms_up(settings: TraceSettings) -> bool:
    """Whether a run gets a warm-up run by default (on CUDA; see session._warmup_runs)."""
    return (settings.device or default_device()).startswith("cuda")


# The figures of a result file the index keeps per run: name -> path in the result's summary.
INDEX_FIGURES = {
    "ttft_ms": ("latency_ms", "ttft", "median"),
    "itl_ms_median": ("latency_ms", "itl", "median"),
    "itl_ms_p99": ("latency_ms", "itl", "p99"),
    "tpot_ms_median": ("latency_ms", "tpot", "median"),
    "e2e_ms_median": ("latency_ms", "e2e", "median"),
    "decode_ms_median": ("latency_ms", "decode", "median"),
    "decode_tokens_per_s": ("throughput_tokens_per_s", "decode"),
    "total_tokens_per_s": ("throughput_tokens_per_s", "total"),
    "kv_device_peak_bytes": ("kv_bytes", "device", "peak"),
    "kv_host_peak_bytes": ("kv_bytes", "host", "peak"),
    "kv_aux_device_peak_bytes": ("kv_bytes", "aux_device", "peak"),
    "memory_allocated_peak_bytes": ("memory_peak_bytes", "allocated"),
    "memory_reserved_peak_bytes": ("memory_peak_bytes", "reserved"),
    "profiler_cost_share": ("run", "profiler_cost_share"),
}
# What a failure that is memory running out says (torch's OutOfMemoryError, the strategies' own
# checks before they allocate: "needs X GiB but the cuda has Y GiB free", pinned host memory).
OUT_OF_MEMORY_MARKS = ("out of memory", "outofmemory", "gib free", "pinned memory")


def is_out_of_memory(error: str) -> bool:
    text = error.lower()
    return any(mark in text for mark in OUT_OF_MEMORY_MARKS)


def figures_of(result: dict[str, Any]) -> dict[str, Any]:
    """INDEX_FIGURES of a result document (None where the run has no such figure)."""
    return {name: nested_number(result, "summary", *keys) for name, keys in INDEX_FIGURES.items()}


def decode_split_ms(trace: Trace) -> dict[str, float]:
    """The median decode step's split into phases, ms (kvprof.analysis.breakdown: speculation,
    kv_transfer (a stall on a copy), eviction, ..., and decode_compute, the rest of the step), and
    `<phase>_overlapped`: the time per step of phases on another stream, beside the split."""
    from kvprof.analysis.breakdown import time_breakdown
    from kvprof.analysis.common import Events

    try:
        per_step = time_breakdown(Events.of(trace))["per_step"]
    except Exception:  # noqa: BLE001 - a run without decode steps has no split; the index goes on
        return {}
    split = {name: float(statistics.median(values)) for name, values in per_step["phases_ms"].items() if values}
    split.update({f"{name}_overlapped": float(statistics.median(values))
                  for name, values in per_step["overlapped_ms"].items() if values})
    if per_step["duration_ms"]:
        split["step"] = float(statistics.median(per_step["duration_ms"]))
    return split


def gather_ms_per_step(trace: Trace) -> float | None:
    """Copy-stream time per decode step of the fetches a speculation chose (InfiniGen's gather of
    the selected rows, overlapped with compute: not on the critical path unless it stalls)."""
    fetches = trace.of_kind("offload")
    if fetches.num_rows == 0 or "ext" not in fetches.column_names:
        return None
    steps = set()
    copy_ns = 0.0
    for step, ext in zip(fetches["step"].to_pylist(), fetches["ext"].to_pylist()):
        ext = dict(ext or ())
        if step is not None and ext.get("speculated") == 1.0:
            steps.add(step)
            copy_ns += ext.get("copy_ns", 0.0)
    decode_steps = trace.of_kind("decode_step").num_rows
    return copy_ns / 1e6 / decode_steps if steps and decode_steps else None


class SweepIndex:
    """`<folder>/index.json`: the sweep's runs, their status and key figures (module docstring)."""

    VERSION = "1"

    def __init__(self, folder: Path, runs: list[tuple[SweepPoint, Path]], workload: str,
                 settings: TraceSettings, repeats: int) -> None:
        self.path = folder / "index.json"
        repeat_of: dict[SweepPoint, int] = {}
        self.runs: list[dict[str, Any]] = []
        for point, path in runs:
            repeat = repeat_of[point] = repeat_of.get(point, -1) + 1
            self.runs.append({
                "strategy": point.strategy, "options": dict(point.options), "workload": workload,
                "params": vars(point.params), "repeat": repeat, "trace": path.name,
                "result": result_path(path).name, "status": "not run", "error": None, "out_of_memory": False,
                "wall_s": None, "existed": False, "model_reused": None, "figures": None,
            })
        self.header = {
            "kvprof_sweep_index_version": self.VERSION, "command": sys.argv, "folder": str(folder),
            "model": settings.model, "weights": settings.weights, "device": settings.device, "dtype": settings.dtype,
            "seed": settings.seed, "detail": settings.detail, "workload": workload, "repeats": repeats,
            "planned_runs": len(runs), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def running(self, number: int) -> None:
        """Marked before the run starts: a sweep killed during it leaves `running` in the index."""
        self.runs[number]["status"] = "running"
        self.write()

    def done(self, number: int, trace_path: Path, wall_s: float | None = None, existed: bool = False,
             trace: Trace | None = None) -> None:
        entry = self.runs[number]
        entry.update(status="done", error=None, out_of_memory=False)
        if wall_s is not None:
            entry["wall_s"] = round(wall_s, 3)
        entry["existed"] = existed  # traced by an earlier call of the sweep
        trace = trace or read_trace(trace_path)
        result = result_path(trace_path)
        if not result.is_file():
            write_result(trace, result)
        document = json.loads(result.read_text())
        entry["figures"] = figures_of(document)
        entry["figures"]["gather_ms_per_step"] = gather_ms_per_step(trace)
        entry["decode_split_ms"] = decode_split_ms(trace)
        entry["model_reused"] = ((document.get("run") or {}).get("extra") or {}).get("model_reused")
        self.write()

    def failed(self, number: int, error: str, wall_s: float) -> None:
        self.runs[number].update(status="failed", error=error[:2000], out_of_memory=is_out_of_memory(error),
                                 wall_s=round(wall_s, 3))
        self.write()

    def write(self) -> None:
        counts: dict[str, int] = {}
        for entry in self.runs:
            status = str(entry["status"])
            counts[status] = counts.get(status, 0) + 1
        document = {**self.header, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": counts,
                    "runs": self.runs}
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps(document, indent=1, default=str) + "\n")
        os.replace(partial, self.path)  # a reader (or a killed sweep) never sees half of it


def release_memory(keep_allocator_cache: bool = False) -> None:
    """Free what the last run held (its cache, its policy; a failed run's too) before the next
    run: runs share one process, and buffers kept alive by a reference cycle (hooks, policies)
    would otherwise stay on the device. The model the strategies share stays loaded
    (kvprof_transformers.model_cache). `keep_allocator_cache`: free the tensors but leave torch's
    CUDA allocator its blocks (between repeats of one point, which need the same)."""
    gc.collect()
    torch = sys.modules.get("torch")  # the core imports no framework; use torch only if loaded
    if not keep_allocator_cache and torch is not None and torch.cuda.is_available():
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
