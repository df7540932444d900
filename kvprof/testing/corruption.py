"""What kvprof makes of a damaged trace: flip bytes of a real trace, then read, analyze, validate
and export it as the commands do, and sort the outcome.

    refused    a one-line error (TraceError / UsageError): the damage was detected
    same       every number as from the intact trace (the damage hit bytes no number depends
               on, e.g. alignment padding or the footer, which `validate` then reports)
    flagged    numbers changed and `validate` says the trace is invalid
    changed    numbers changed and `validate` says "valid": a silently changed number
    traceback  an exception other than a one-line error escaped

A crash (segfault, bus error) kills the process: the caller runs this in a subprocess to count
those. The fuzz test (tests/test_trace_fuzz.py) and benchmarks/trace_fuzz.py share this module.
"""

from __future__ import annotations

import random
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvprof.errors import UsageError

OUTCOMES = ("refused", "same", "flagged", "changed", "traceback")


@dataclass
class Verdict:
    outcome: str     # one of OUTCOMES
    detail: str = ""


def numbers(path: Path) -> dict[str, Any]:
    """The built-in analyses' results for the trace at `path`, as the JSON `analyze` prints."""
    from kvprof.analysis import analyze
    from kvprof.analysis.commands import jsonable
    from kvprof.trace import read_trace

    return jsonable(analyze(read_trace(path)).results)


def flip_bytes(data: bytes, rng: random.Random, max_bytes: int = 8) -> bytes:
    """`data` with 1 to `max_bytes` bytes set to other random values."""
    mutated = bytearray(data)
    for position in rng.sample(range(len(data)), rng.randint(1, max_bytes)):
        mutated[position] = (mutated[position] + rng.randint(1, 255)) % 256
    return bytes(mutated)


def judge(path: Path, expected: dict[str, Any]) -> Verdict:
    """Read, analyze, validate and export the trace at `path`; `expected` is numbers() of the
    intact trace."""
    from kvprof.trace.validate import validate_trace

    try:
        results = numbers(path)
        problems, _ = validate_trace(path)
        _export(path)
    except UsageError as exc:
        return Verdict("refused", str(exc))
    except Exception:  # what the commands would show as a traceback
        return Verdict("traceback", traceback.format_exc())
    if results == expected:
        return Verdict("same")
    return Verdict("flagged" if problems else "changed", "; ".join(problems) or _first_difference(expected, results))


def judge_bytes(data: bytes, expected: dict[str, Any]) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="kvprof-fuzz-") as folder:
        path = Path(folder) / "mutated.arrow"
        path.write_bytes(data)
        return judge(path, expected)


def _export(path: Path) -> None:
    from kvprof.analysis.export import write_parquet, write_perfetto
    from kvprof.trace import read_trace

    trace = read_trace(path)
    write_perfetto(trace, path.with_suffix(".perfetto.json"))
    write_parquet(trace, path.with_suffix(".parquet"))


def _first_difference(expected: Any, actual: Any, where: str = "") -> str:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual), key=str):
            if expected.get(key) != actual.get(key):
                return _first_difference(expected.get(key), actual.get(key), f"{where}.{key}")
    return f"{where or 'results'}: {str(expected)[:80]} -> {str(actual)[:80]}"
