"""Property-based fuzzing of a real trace (kvprof.testing.corruption sorts the outcomes): whatever
bytes change, kvprof reads, analyzes, validates and exports without a traceback or a crash, and
never returns changed numbers for a trace that `validate` calls valid. benchmarks/trace_fuzz.py
runs thousands of such mutations; this keeps a few hundred in `make test` (a few seconds)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from kvprof.cli import main
from kvprof.testing.corruption import judge_bytes, numbers
from kvprof.trace import read_trace
from kvprof.trace.schema import META_RUN, META_VERSION

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# The trace's bytes are an argument of every example: hypothesis warns that their repr is long.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory) -> tuple[bytes, dict]:
    """H2O on tiny-llama (random weights): evictions with positions, a record batch per event."""
    path = tmp_path_factory.mktemp("fuzz") / "h2o.arrow"
    status = main(["trace", "--plugin", "h2o", "--model", "tiny-llama", "--weights", "random", "--prompt-len", "48",
                   "--output-len", "3", "--batch-size", "2", "--opt", "heavy_ratio=0.2", "--opt", "recent_ratio=0.2",
                   "--flush-s", "0", "--no-result", "--quiet", "-o", str(path)])
    assert status == 0
    return path.read_bytes(), numbers(path)


def assert_no_harm(data: bytes, expected: dict) -> None:
    verdict = judge_bytes(data, expected)
    assert verdict.outcome in ("refused", "same", "flagged"), f"{verdict.outcome}: {verdict.detail}"


@FUZZ
@given(st.data())
def test_changed_bytes_are_refused_or_harmless(real_trace, data):
    trace_bytes, expected = real_trace
    changes = data.draw(st.dictionaries(st.integers(0, len(trace_bytes) - 1), st.integers(0, 255),
                                        min_size=1, max_size=8))
    mutated = bytearray(trace_bytes)
    for position, value in changes.items():
        mutated[position] = value
    assert_no_harm(bytes(mutated), expected)


@FUZZ
@given(st.data())
def test_a_cut_file_reads_as_truncated_or_is_refused(real_trace, data):
    trace_bytes, expected = real_trace
    assert_no_harm(trace_bytes[: data.draw(st.integers(0, len(trace_bytes) - 1))], expected)


def with_metadata(table: pa.Table, metadata: dict[bytes, bytes]) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema.with_metadata(metadata)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@FUZZ
@given(version=st.one_of(st.sampled_from(["1.0", "1.1", "1", "1.0.1", "2.0", "0.9", ""]), st.text(max_size=12)),
       run=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                  lambda inner: st.lists(inner, max_size=3)
                                  | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                  max_leaves=8).map(lambda value: repr(value).encode())))
def test_any_version_and_run_metadata_is_read_or_refused_in_one_line(real_trace, tmp_path, version, run):
    trace_bytes, expected = real_trace
    source = tmp_path / "source.arrow"
    source.write_bytes(trace_bytes)
    table = read_trace(source).stored_table()
    verdict = judge_bytes(with_metadata(table, {META_VERSION: version.encode(), META_RUN: run}), expected)
    assert verdict.outcome in ("refused", "same", "flagged"), f"{verdict.outcome}: {verdict.detail}"


def test_the_fuzzed_trace_is_real(real_trace):
    """The mutations start from a trace with the event kinds a strategy emits."""
    trace_bytes, expected = real_trace
    assert expected["summary"]["requests"]["finished"] == 2
    assert expected["summary"]["evictions"]
