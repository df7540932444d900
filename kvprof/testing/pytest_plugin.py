"""kvprof's pytest plugin for plugin authors, registered through the `pytest11` entry point.

Installing kvprof makes the `kvprof_conformance` fixture available in every pytest run:

    def test_my_strategy_conforms(kvprof_conformance):
        report = kvprof_conformance.check_strategy("my-strategy", options={"budget": 32})
        assert report.counts["evict"] > 0   # the run did exercise the evictions

The fixture writes the trace under the test's tmp_path and fails the test with the report
(every problem, with its event's seq) when the strategy does not conform. This module imports
nothing heavy: pytest loads it in every session of an environment where kvprof is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kvprof.strategy import Strategy
    from kvprof.testing.conformance import ConformanceReport


class ConformanceFixture:
    """`kvprof.testing.conformance` for a test: the same calls, failing the test on problems."""

    def __init__(self, trace_dir: Path) -> None:
        self.trace_dir = trace_dir

    def check_strategy(self, strategy: str | type[Strategy], options: dict[str, Any] | None = None,
                       **kwargs: Any) -> ConformanceReport:
        """Run and check a strategy; see `kvprof.testing.conformance.check_strategy`."""
        from kvprof.testing import conformance

        kwargs.setdefault("trace_dir", self.trace_dir)
        return self._passed(conformance.check_strategy(strategy, options, **kwargs))

    def check_trace(self, trace: str | os.PathLike) -> ConformanceReport:
        """Check a trace recorded elsewhere (another engine); see `conformance.check_trace`."""
        from kvprof.testing import conformance

        return self._passed(conformance.check_trace(trace))

    @staticmethod
    def _passed(report: ConformanceReport) -> ConformanceReport:
        if not report.ok:
            pytest.fail(report.format(), pytrace=False)
        return report


@pytest.fixture
def kvprof_conformance(tmp_path: Path) -> ConformanceFixture:
    """Checks a strategy or a trace against kvprof's event contract; fails the test if it breaks it."""
    return ConformanceFixture(tmp_path)
