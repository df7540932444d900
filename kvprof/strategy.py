"""What a strategy is, as far as the core is concerned.

A strategy is registered by a plugin (`kvprof_register_strategies`) as a class with a `name`,
a one-line `description`, the `options` it accepts, and a `run(ctx)` method that loads a model,
runs the workload and reports what happens through `ctx.profiler.emit_*`. The core never looks
inside: it validates options, builds the RunContext, and hands over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kvprof.errors import UsageError

if TYPE_CHECKING:
    from kvprof.models import ModelSpec
    from kvprof.profiler import Profiler
    from kvprof.workloads import WorkloadSpec

__all__ = ["KVBudget", "Option", "RunContext", "Strategy", "UsageError", "in_range", "non_negative", "parse_options",
           "positive"]


@dataclass(frozen=True)
class Option:
    """One `--opt key=value` a strategy accepts.

    `check` returns an error message for an invalid value, or None. The parsed value has the
    type of `default` (int, float, bool or str), or None when the default is None and
    `kind` gives the type.
    """

    name: str
    default: Any
    help: str
    kind: type | None = None
    check: Callable[[Any], str | None] | None = None

    def parse(self, raw: str) -> Any:
        kind = self.kind or type(self.default)
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("1", "true", "yes")
            else:
                value = kind(raw)
        except ValueError:
            raise UsageError(f"option {self.name}={raw!r}: expected {kind.__name__}") from None
        self.validate(value)
        return value

    def validate(self, value: Any) -> None:
        problem = self.check(value) if self.check and value is not None else None
        if problem:
            raise UsageError(f"option {self.name}={value!r}: {problem}")


def in_range(low: float, high: float, low_open: bool = False) -> Callable[[Any], str | None]:
    """A check for numbers in [low, high] (or (low, high] with low_open)."""

    def check(value: Any) -> str | None:
        below = value <= low if low_open else value < low
        if below or value > high:
            left = "(" if low_open else "["
            return f"must be in {left}{low}, {high}]"
        return None

    return check


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def parse_options(options: tuple[Option, ...], raw: dict[str, str]) -> dict[str, Any]:
    """Defaults overlaid with the user's `--opt` values; unknown keys are a UsageError."""
    known = {opt.name: opt for opt in options}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        names = ", ".join(known) or "none"
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; this strategy takes: {names}")
    return {name: (opt.parse(raw[name]) if name in raw else opt.default) for name, opt in known.items()}


@dataclass
class RunContext:
    """Everything a strategy's `run` gets."""

    model: ModelSpec
    workload: WorkloadSpec          # built by the strategy once it has a tokenizer
    options: dict[str, Any]
    profiler: Profiler
    device: str = "cpu"
    dtype: str = "auto"
    detail: str = "layer"          # "step" | "layer" | "head": how fine evict/offload events are
    seed: int = 0
    warmup_runs: int = 0           # untraced runs of the first batch before the traced run
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KVBudget:
    """The KV cache a strategy keeps per sequence: a fraction of the prompt, a count of tokens, or
    both (added: H2O's heavy ratio plus a recent window in tokens). The analyses read it from the
    run metadata (`extra["kv_budget"]`): the retention table's budget column and the
    accuracy-vs-budget figure place the run at fraction + tokens / prompt_len (at most 1)."""

    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is None and self.tokens is None:
            raise ValueError("a KVBudget needs a fraction, a token count or both")

    def to_dict(self) -> dict[str, float | int | None]:
        return {"fraction": self.fraction, "tokens": self.tokens}


class Strategy:
    """Base class for strategies. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    def run(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def check_options(self, options: dict[str, Any]) -> None:
        """Checks across options (say, window < budget), run before the model loads, on the typed
        values after each Option's own check: raise UsageError with one line for a bad combination."""

    def kv_budget(self, options: dict[str, Any]) -> KVBudget | None:
        """The KV budget these options give, or None for a strategy that keeps everything (the
        `full` reference). kvprof records it in the run metadata before the run starts."""
        return None

    def describe_deviations(self) -> list[str]:
        """Where this implementation departs from the published method; recorded in the trace."""
        return []
