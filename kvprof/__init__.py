"""kvprof: a plugin-based profiler for LLM KV-cache management strategies.

What a plugin needs is importable from here: `from kvprof import Strategy, Option, hookimpl`.
Inside kvprof, modules import from the module that owns a name (kvprof.errors, kvprof.strategy,
...), so that this package's own import never runs into a cycle.
"""

from kvprof.clock import Clock
from kvprof.errors import UsageError
from kvprof.events import Event, Kind, Medium, Phase
from kvprof.hookspecs import hookimpl
from kvprof.models import ModelSpec
from kvprof.profiler import Profiler, RunInfo
from kvprof.strategy import KVBudget, Option, RunContext, Strategy, in_range, non_negative, positive
from kvprof.workloads import Request, WorkloadParams, WorkloadSpec

__version__ = "0.1.0"

__all__ = [
    "Clock", "Event", "KVBudget", "Kind", "Medium", "ModelSpec", "Option", "Phase", "Profiler", "Request", "RunContext",
    "RunInfo", "Strategy", "UsageError", "WorkloadParams", "WorkloadSpec", "hookimpl", "in_range", "non_negative",
    "positive",
]
