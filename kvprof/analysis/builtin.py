"""The built-in analyses, registered through the plugin hook like a third party's would be."""

from __future__ import annotations

from collections.abc import Callable

from kvprof.analysis.breakdown import breakdown
from kvprof.analysis.retention import retention
from kvprof.analysis.summary import summary
from kvprof.hookspecs import hookimpl

BUILTIN_ANALYSES: dict[str, Callable[..., dict]] = {
    "summary": summary,
    "breakdown": breakdown,
    "retention": retention,
}

DESCRIPTIONS = {
    "summary": "TTFT, TPOT, ITL, E2E, throughput, peak memory, KV per tier, evictions, transfers",
    "breakdown": "time per phase (per step and total) and memory per component over time",
    "retention": "probe answer accuracy vs the full baseline; fact tokens still cached per layer and head",
}


@hookimpl
def kvprof_register_analyses(register: Callable[..., None]) -> None:
    for name, function in BUILTIN_ANALYSES.items():
        register(name, function, description=DESCRIPTIONS[name])
