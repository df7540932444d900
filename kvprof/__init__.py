"""kvprof: a plugin-based profiler for LLM KV-cache management strategies."""

from kvprof.errors import UsageError
from kvprof.events import Event, Kind, Medium, Phase
from kvprof.hookspecs import hookimpl
from kvprof.strategy import Option, RunContext, Strategy

__version__ = "0.1.0"

__all__ = ["Event", "Kind", "Medium", "Option", "Phase", "RunContext", "Strategy", "UsageError", "hookimpl"]
