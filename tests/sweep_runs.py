"""A strategy that runs out of device memory, for the sweep's tests: how a sweep, its index and
the study report treat a point that fails that way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvprof import hookimpl


class OutOfMemoryStrategy:
    """Runs out of device memory, and notes what the sweep's index said while it ran."""

    name = "oom"
    options = ()
    index_seen: list = []

    def run(self, ctx: Any) -> None:
        index = json.loads((Path(ctx.profiler.run.trace_path).parent / "index.json").read_text())
        OutOfMemoryStrategy.index_seen.append([run["status"] for run in index["runs"]])
        ctx.profiler.start()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OutOfMemoryPlugin:
    @hookimpl
    def kvprof_register_strategies(self, register: Any) -> None:
        register(OutOfMemoryStrategy)


def with_out_of_memory_strategy(monkeypatch: Any) -> None:
    """Make `kvprof sweep` load the installed plugins plus `oom`."""
    from kvprof import session, sweep
    from kvprof.plugins import load_plugins

    def loaded() -> Any:
        return load_plugins(extra={"oom": OutOfMemoryPlugin()})

    monkeypatch.setattr(session, "load_plugins", loaded)
    monkeypatch.setattr(sweep, "load_plugins", loaded)
