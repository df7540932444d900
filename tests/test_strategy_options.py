"""What a strategy declares beside its options: checks across options (run before the model
loads) and its KV budget (recorded in the run metadata, read by the analyses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvprof import KVBudget, Option, Strategy, UsageError, WorkloadParams, WorkloadSpec, positive
from kvprof.analysis.retention import kv_budget
from kvprof.cli import main
from kvprof.session import TraceSettings, run_trace
from kvprof.trace import read_trace


class Windowed(Strategy):
    """Declares a window that must fit its budget, and the budget; runs nothing but the profiler."""

    name = "windowed"
    options = (Option("window", 16, "tokens attended", check=positive),
               Option("budget", 64, "tokens kept", check=positive))
    ran = False

    def check_options(self, options: dict[str, Any]) -> None:
        if options["window"] >= options["budget"]:
            raise UsageError(f"windowed: window={options['window']} must be smaller than budget={options['budget']}")

    def kv_budget(self, options: dict[str, Any]) -> KVBudget:
        return KVBudget(tokens=options["budget"])

    def run(self, ctx: Any) -> None:
        Windowed.ran = True
        ctx.profiler.start()


def settings(tmp_path: Path, model: str, **options: str) -> TraceSettings:
    return TraceSettings(strategy="windowed", model=model, weights="random", options=options,
                         workload=WorkloadSpec("synthetic", WorkloadParams(prompt_len=128, output_len=4)),
                         trace_path=tmp_path / "windowed.arrow")


def test_cross_option_checks_run_before_the_model_is_even_resolved(tmp_path: Path) -> None:
    Windowed.ran = False
    with pytest.raises(UsageError, match="windowed: window=64 must be smaller than budget=32"):
        run_trace(settings(tmp_path, "no/such-model", window="64", budget="32"), strategy_cls=Windowed)
    assert not Windowed.ran
    assert not list(tmp_path.iterdir())  # no trace started


def test_the_declared_budget_is_in_the_run_metadata(tmp_path: Path) -> None:
    outcome = run_trace(settings(tmp_path, "tiny-llama", budget="96"), strategy_cls=Windowed)
    assert outcome.error is None
    run = read_trace(tmp_path / "windowed.arrow").run
    assert run["extra"]["kv_budget"] == {"fraction": None, "tokens": 96}
    assert kv_budget(run) == 96 / 128  # what the retention table and Figure 8 show


def test_a_budget_needs_a_size() -> None:
    with pytest.raises(ValueError, match="a fraction, a token count or both"):
        KVBudget()
    assert KVBudget(fraction=0.1, tokens=32).to_dict() == {"fraction": 0.1, "tokens": 32}


def test_h2o_checks_its_budget_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["trace", "--plugin", "h2o", "--model", str(tmp_path / "no-such-checkpoint"),
                 "--opt", "heavy_ratio=0.7", "--opt", "recent_ratio=0.6", "-o", str(tmp_path / "h2o.arrow")])
    assert code == 2
    assert "h2o: heavy_ratio + recent_ratio = 1.3 is larger than the prompt" in capsys.readouterr().err
