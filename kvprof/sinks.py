"""The built-in sinks, attached per run through `kvprof_make_sinks` like any plugin's.

* ArrowTraceWriter (kvprof.trace.writer): the trace, whenever the run has a trace path.
* ProgressDisplay: a rich live line for long runs (steps, tokens/s, KV bytes), on request.
* NvmlSampler: device memory used and PCIe throughput from NVML, on CUDA devices.
* NvtxMarks: NVTX marks for Nsight Systems, on CUDA devices.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kvprof.events import Event
from kvprof.hookspecs import hookimpl
from kvprof.profiler import Profiler, RunInfo
from kvprof.trace.writer import ArrowTraceWriter


@hookimpl
def kvprof_make_sinks(run: RunInfo, profiler: Profiler) -> list[Any]:
    sinks: list[Any] = []
    if run.trace_path:
        sinks.append(ArrowTraceWriter(run.trace_path, run.to_dict(), flush_s=run.flush_s))
    if run.progress:
        sinks.append(ProgressDisplay())
    if run.device.startswith("cuda"):
        sampler = NvmlSampler.open(run.device, profiler)
        if sampler is not None:
            sinks.append(sampler)
        sinks.append(NvtxMarks())
    return sinks


class ProgressDisplay:
    """A one-line live status on stderr, refreshed by rich's own thread (4 Hz)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.steps = 0
        self.tokens = 0
        self.requests_done = 0
        self.kv_device_bytes = 0
        self.kv_host_bytes = 0
        self._first_ns: int | None = None
        self._last_ns = 0
        self._live = Live(get_renderable=self._render, console=Console(stderr=True), refresh_per_second=4)

    def _render(self) -> str:
        seconds = (self._last_ns - (self._first_ns or self._last_ns)) / 1e9
        rate = self.tokens / seconds if seconds > 0 else 0.0
        return (
            f"[bold]kvprof[/] step {self.steps}  {self.tokens} tokens  {rate:.1f} tok/s  "
            f"done {self.requests_done}  KV device {self.kv_device_bytes / 2**20:.1f} MiB  "
            f"host {self.kv_host_bytes / 2**20:.1f} MiB"
        )

    @hookimpl
    def kvprof_run_start(self) -> None:
        self._live.start()

    @hookimpl
    def kvprof_decode_step(self, event: Event) -> None:
        if self._first_ns is None:
            self._first_ns = event.start_ns
        self._last_ns = event.end_ns
        self.steps += 1
        self.tokens += event.tokens or 0
        if event.kv_device_bytes is not None:
            self.kv_device_bytes = event.kv_device_bytes
        if event.kv_host_bytes is not None:
            self.kv_host_bytes = event.kv_host_bytes

    @hookimpl
    def kvprof_request_end(self) -> None:
        self.requests_done += 1

    @hookimpl
    def kvprof_run_end(self) -> None:
        self._live.stop()


class NvmlSampler:
    """Samples NVML every `interval_s` on its own thread and emits sample events.

    PCIe throughput comes from `nvmlDeviceGetPcieThroughput`, a byte counter NVML reads over
    20 ms and reports in KB/s: coarse, but independent of kvprof's own transfer timing.
    """

    def __init__(self, nvml: Any, handle: Any, profiler: Profiler, interval_s: float) -> None:
        self.nvml, self.handle, self.profiler = nvml, handle, profiler
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvprof-nvml", daemon=True)

    @classmethod
    def open(cls, device: str, profiler: Profiler, interval_s: float = 0.1) -> NvmlSampler | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(device.split(":")[1]) if ":" in device else 0
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index), profiler, interval_s)
        except Exception:  # no NVML here: the run goes on without device telemetry
            return None

    def _loop(self) -> None:
        nvml = self.nvml
        while not self._stop.wait(self.interval_s):
            used = nvml.nvmlDeviceGetMemoryInfo(self.handle).used
            rx = nvml.nvmlDeviceGetPcieThroughput(self.handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
            tx = nvml.nvmlDeviceGetPcieThroughput(self.handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
            self.profiler.emit_sample(
                time.monotonic_ns(), nvml_used_bytes=int(used),
                ext={"pcie_rx_bytes_per_s": rx * 1024.0, "pcie_tx_bytes_per_s": tx * 1024.0},
            )

    @hookimpl
    def kvprof_run_start(self) -> None:
        self._thread.start()

    @hookimpl
    def kvprof_run_end(self) -> None:
        self._stop.set()
        # run_end is delivered under the profiler's lock; the thread may be waiting for it
        # inside emit_sample, so do not join here: it exits at its next wake-up.


class NvtxMarks:
    """Puts an NVTX mark per step and transfer, so Nsight Systems timelines show kvprof's view."""

    def __init__(self) -> None:
        import torch

        self._mark = torch.cuda.nvtx.mark

    @hookimpl
    def kvprof_prefill(self, event: Event) -> None:
        self._mark(f"kvprof prefill {event.request_id} {event.duration_ns / 1e6:.2f} ms")

    @hookimpl
    def kvprof_decode_step(self, event: Event) -> None:
        self._mark(f"kvprof decode_step {event.step} {event.duration_ns / 1e6:.2f} ms")

    @hookimpl
    def kvprof_offload(self, event: Event) -> None:
        self._mark(f"kvprof offload L{event.layer} {event.src_medium}->{event.dst_medium} {event.bytes} B")
