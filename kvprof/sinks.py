"""The built-in sinks, attached per run through `kvprof_make_sinks` like any plugin's.

* ArrowTraceWriter (kvprof.trace.writer): the trace, whenever the run has a trace path.
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
    if run.device.startswith("cuda"):
        sampler = NvmlSampler.open(run.device, profiler)
        if sampler is not None:
            sinks.append(sampler)
        sinks.append(NvtxMarks())
    return sinks


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
