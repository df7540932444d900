"""Timestamps that can be trusted to mark GPU work.

All kvprof timestamps are nanoseconds of the host monotonic clock (`time.monotonic_ns`), which
is system-wide on Linux, so every process of a run agrees on it.

On a CUDA device, host time says nothing about when queued kernels finish. Two tools:

* `Clock.now_synced()` synchronizes the device first: use it at step boundaries, where the step
  must have finished anyway (the next token depends on it).
* `Clock.mark()` records a CUDA event without stalling; `Clock.resolve()` turns it into host
  nanoseconds later (after the step ends), from the CUDA-timed distance to the anchor event
  that the last `now_synced()` recorded. Use it
  inside a step (a layer's fetch, speculation) where a synchronize would change what is measured.

On the CPU there is nothing to wait for: both are the plain host clock.
"""

from __future__ import annotations

import time
from typing import Any


class Clock:
    """Host monotonic clock, synchronized with one torch device when it is a CUDA device."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = str(device)
        self.is_cuda = self.device.startswith("cuda")
        self._torch: Any = None
        self._anchor_event: Any = None
        self._anchor_ns = 0
        if self.is_cuda:
            import torch  # only CUDA clocks need torch

            self._torch = torch

    def now(self) -> int:
        """Host time, no synchronization. Right for host-only work and CPU devices."""
        return time.monotonic_ns()

    def now_synced(self) -> int:
        """Wait for all queued device work, then read the host clock; re-anchors `mark`."""
        if not self.is_cuda:
            return time.monotonic_ns()
        self._torch.cuda.synchronize(self.device)
        now = time.monotonic_ns()
        self._anchor_event = self._torch.cuda.Event(enable_timing=True)
        self._anchor_event.record()
        self._anchor_ns = now
        return now

    def mark(self, stream: Any = None) -> Any:
        """A cheap timestamp of the point reached on `stream` (default: current stream)."""
        if not self.is_cuda:
            return time.monotonic_ns()
        if self._anchor_event is None:
            raise RuntimeError("Clock.mark() needs an earlier now_synced() as its anchor")
        event = self._torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return (self._anchor_event, self._anchor_ns, event)

    def resolve(self, mark: Any) -> int:
        """Host nanoseconds of a `mark`; cheap once the step has ended (no stall then)."""
        if not self.is_cuda:
            return int(mark)
        anchor_event, anchor_ns, event = mark
        event.synchronize()
        return anchor_ns + int(anchor_event.elapsed_time(event) * 1e6)
