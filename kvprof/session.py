"""Running one strategy end to end: what `kvprof trace` does, as one function that the CLI,
the conformance kit and the benchmarks share."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvprof.errors import UsageError
from kvprof.models import EMBEDDED, resolve_model
from kvprof.plugins import LoadedPlugins, load_plugins
from kvprof.preflight import check_run, check_trace_sink
from kvprof.profiler import Profiler, RunInfo, describe_environment
from kvprof.strategy import RunContext, Strategy, parse_options
from kvprof.workloads import WorkloadSpec


@dataclass
class TraceSettings:
    """Everything `kvprof trace` takes; `options` are the raw `--opt` strings."""

    strategy: str                     # what `--plugin` selects
    model: str = EMBEDDED
    weights: str = "auto"
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec("synthetic"))
    options: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str = "auto"
    detail: str = "layer"
    seed: int = 0
    trace_path: Path | None = None
    overwrite: bool = False          # replace an existing trace at trace_path (once the run finishes)
    sinks_enabled: bool = True
    label: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    display: Any = None               # a plugin object watching the run (kvprof.display.LiveDisplay)
    flush_s: float = 1.0
    warmup_runs: int | None = None    # None: 1 on CUDA (clocks, lazy kernel loading), 0 on CPU


@dataclass
class RunOutcome:
    run: RunInfo
    profiler: Profiler
    plugin: str                          # the plugin that registered the strategy
    error: BaseException | None = None   # what the strategy raised; its trace is still complete


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run_trace(settings: TraceSettings, plugins: LoadedPlugins | None = None,
              strategy_cls: type[Strategy] | None = None) -> RunOutcome:
    """Validate the settings, run the strategy and close its trace.

    A user's mistake found before the model loads (kvprof.preflight) raises UsageError. Anything the strategy raises
    (a UsageError too, e.g. an engine that cannot start) is returned in `error` after the trace
    got its run_end, so the events so far stay readable; KeyboardInterrupt is re-raised then.
    """
    plugins = plugins or load_plugins()
    pm, registry = plugins.manager, plugins.registry
    if strategy_cls is None:
        strategy_cls = plugins.strategy(settings.strategy)
    plugin = registry.strategy_plugins.get(strategy_cls.name, strategy_cls.__module__)
    strategy, options = checked_options(strategy_cls, settings.options)
    settings.workload.validate()
    model = resolve_model(settings.model, settings.weights, registry.models)
    device = settings.device or default_device()
    check_trace_sink(pm, settings.trace_path if settings.sinks_enabled else None)
    check_run(settings.workload, model, device, settings.dtype,
              settings.trace_path if settings.sinks_enabled else None, settings.overwrite)
    params = settings.workload.params
    run = RunInfo(
        strategy=strategy_cls.name, model=model.to_dict(),
        workload={"name": settings.workload.name, "params": vars(params)}, options=options, device=device,
        detail=settings.detail, seed=settings.seed,
        trace_path=str(settings.trace_path) if settings.trace_path else None,
        sinks_enabled=settings.sinks_enabled, flush_s=settings.flush_s,
        plugin_version=plugins.version_of(plugin),
        label=settings.label, metadata=dict(settings.metadata), environment=describe_environment(device),
    )
    budget = getattr(strategy, "kv_budget", lambda options: None)(options)
    if budget is not None:
        run.extra["kv_budget"] = budget.to_dict()
    seed_everything(settings.seed)
    profiler = Profiler(pm, run)
    context = RunContext(model=model, workload=settings.workload, options=options, profiler=profiler,
                         device=device, dtype=settings.dtype, detail=settings.detail, seed=settings.seed,
                         warmup_runs=_warmup_runs(settings.warmup_runs, device))
    outcome = RunOutcome(run, profiler, plugin)
    watching = settings.display is not None and settings.sinks_enabled
    if watching:
        pm.register(settings.display, name="kvprof:display")
    try:
        profiler.status(f"loading {model.name} ({model.weights} weights) on {device}")
        strategy.run(context)
    except BaseException as exc:  # a plugin crash: recorded, and the trace stays readable
        outcome.error = exc
    finally:
        try:
            profiler.end(outcome.error)
        finally:
            if watching:
                pm.unregister(settings.display)
    if isinstance(outcome.error, KeyboardInterrupt):
        raise outcome.error
    return outcome


def checked_options(strategy_cls: type[Strategy], raw: dict[str, Any]) -> tuple[Strategy, dict[str, Any]]:
    """A new strategy and its typed options: `raw` (`--opt` values) over the defaults, each checked
    and then checked together (Strategy.check_options); a bad one raises UsageError."""
    options = parse_options(strategy_cls.options, {key: str(value) for key, value in raw.items()})
    strategy = strategy_cls()
    # Strategy's methods; a registered class that does not subclass Strategy may lack them.
    getattr(strategy, "check_options", lambda options: None)(options)
    return strategy, options


def _warmup_runs(requested: int | None, device: str) -> int:
    if requested is not None:
        if requested < 0:
            raise UsageError(f"--warmup-runs {requested}: must not be negative")
        return requested
    return 1 if device.startswith("cuda") else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
