"""The Arrow trace: round trip, crash safety, bad files, the published schema."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset
import pyarrow.feather as feather
import pytest

from kvprof import Event, Kind
from kvprof.trace import SCHEMA_VERSION, ArrowTraceWriter, TraceError, TraceWriteError, partial_path, read_trace
from kvprof.trace.schema import META_RUN, META_VERSION, published
from kvprof.trace.validate import validate_trace
from kvprof.trace.writer import PendingParts

ROOT = Path(__file__).resolve().parents[1]


def write_events(path: Path, events: list[Event], close: bool = True, batch_rows: int = 2) -> ArrowTraceWriter:
    writer = ArrowTraceWriter(path, {"strategy": "test"}, batch_rows=batch_rows)
    for seq, event in enumerate(events):
        event.seq, event.run_id = seq, "r1"
        writer.add(event)
    if close:
        writer.close()
    else:
        writer.wait()  # the flushed batches are on disk, as a killed run leaves them
    return writer


def some_events() -> list[Event]:
    return [
        Event(Kind.RUN_START, 0, 0),
        Event(Kind.PREFILL, 10, 50, request_id="req-0", tokens=128),
        Event(Kind.EVICT, 55, 56, layer=3, positions=[[1, 2], [7]], tokens=3, bytes=96, reason="h2o",
              src_medium="device", ext={"simulated": 0.0}),
        Event(Kind.DECODE_STEP, 50, 60, step=0, batch_size=1, tokens=1, kv_device_bytes=4096),
        Event(Kind.RUN_END, 70, 70, ext={"profiler_events": 4.0}),
    ]


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    trace = read_trace(path)
    assert not trace.truncated and trace.warnings == []
    assert trace.run == {"strategy": "test"}
    evict = trace.of_kind("evict").to_pylist()[0]
    assert evict["positions"] == [[1, 2], [7]]
    assert evict["reason"] == "h2o" and evict["src_medium"] == "device"
    assert dict(evict["ext"]) == {"simulated": 0.0}
    assert trace.table["seq"].to_pylist() == [0, 1, 2, 3, 4]
    assert validate_trace(path) == ([], [])


def test_a_complete_trace_opens_in_pyarrow_pandas_polars_and_duckdb(tmp_path):
    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    kinds = ["run_start", "prefill", "evict", "decode_step", "run_end"]
    with pa.ipc.open_file(path) as reader:
        assert reader.num_record_batches == 3
        assert reader.read_all()["kind"].to_pylist() == kinds
    assert feather.read_table(path)["tokens"].to_pylist() == [None, 128, 3, 1, None]
    assert pyarrow.dataset.dataset(path, format="arrow").to_table().num_rows == 5
    assert list(pd.read_feather(path)["kind"]) == kinds


def test_a_complete_trace_opens_in_polars_lazily(tmp_path):
    polars = pytest.importorskip("polars")
    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    frame = polars.scan_ipc(path).filter(polars.col("kind") == "prefill").select("request_id", "tokens").collect()
    assert frame.rows() == [("req-0", 128)]


def test_a_complete_trace_opens_in_duckdb_over_arrow(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    events = pyarrow.dataset.dataset(path, format="arrow")  # noqa: F841 (DuckDB finds it by name)
    rows = duckdb.sql("SELECT kind, sum(tokens) FROM events WHERE tokens IS NOT NULL GROUP BY kind "
                      "ORDER BY kind").fetchall()
    assert rows == [("decode_step", 1), ("evict", 3), ("prefill", 128)]


def test_a_killed_runs_trace_has_no_footer_and_reads_as_a_stream(tmp_path):
    """No footer: Arrow file readers refuse it, kvprof and any stream reader (from byte 8) read it."""
    path = tmp_path / "t.arrow"
    writer = write_events(path, some_events(), close=False, batch_rows=2)  # 2 batches flushed, 1 pending
    assert not path.exists() and writer.partial == tmp_path / "t.partial.arrow"
    with pytest.raises(pa.ArrowInvalid):
        pa.ipc.open_file(writer.partial)
    trace = read_trace(writer.partial)
    assert trace.truncated and trace.footer == "missing" and len(trace) == 4
    assert "truncated" in trace.warnings[0]
    stream = pa.ipc.open_stream(pa.py_buffer(writer.partial.read_bytes()[8:]))
    assert sum(batch.num_rows for batch in stream_batches(stream)) == 4


def test_a_killed_runs_trace_is_refused_by_file_readers_and_its_export_reads_everywhere(tmp_path):
    """Arrow file readers refuse a trace without a footer with an error (never partial rows);
    kvprof reads it, and its Parquet export opens in pandas, polars (lazily) and DuckDB."""
    from kvprof.analysis.export import write_parquet

    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    partial = write_events(tmp_path / "t.arrow", some_events(), close=False, batch_rows=2).partial
    refusals = {"pandas": lambda: pd.read_feather(partial),
                "polars": lambda: polars.scan_ipc(partial).collect(),
                "pyarrow.dataset": lambda: pyarrow.dataset.dataset(partial, format="arrow").to_table()}
    for reader, read in refusals.items():
        with pytest.raises(Exception, match="(?i)arrow file|footer|schema") as refused:
            read()
        assert refused.type.__name__ in ("ArrowInvalid", "ComputeError"), reader
    exported = write_parquet(read_trace(partial), tmp_path / "t.parquet")
    kinds = ["run_start", "prefill", "evict", "decode_step"]  # the two flushed batches
    assert list(pd.read_parquet(exported)["kind"]) == kinds
    assert polars.scan_parquet(exported).select("kind").collect()["kind"].to_list() == kinds
    rows = duckdb.sql(f"SELECT kind FROM read_parquet('{exported}') ORDER BY seq").fetchall()
    assert [kind for (kind,) in rows] == kinds


def stream_batches(reader: pa.ipc.RecordBatchStreamReader) -> list[pa.RecordBatch]:
    batches = []
    while True:
        try:
            batches.append(reader.read_next_batch())
        except (StopIteration, pa.ArrowInvalid):
            return batches


def test_a_cut_trace_reads_its_complete_batches_and_says_so(tmp_path):
    writer = write_events(tmp_path / "t.arrow", some_events(), close=False, batch_rows=2)
    data = writer.partial.read_bytes()
    writer.partial.write_bytes(data[:-7])  # the second batch is now cut mid-message
    trace = read_trace(writer.partial)
    assert trace.truncated
    assert len(trace) == 2
    assert "truncated" in trace.warnings[0]
    problems, _ = validate_trace(writer.partial)
    assert any("truncated" in problem for problem in problems)


def test_a_changed_number_is_corruption_not_truncation(tmp_path):
    """A prefill's 987654 tokens become 987655 on disk: the batch checksum catches it."""
    path = tmp_path / "t.arrow"
    events = some_events()
    events[1].tokens = 987654
    write_events(path, events)
    data = bytearray(path.read_bytes())
    at = data.index((987654).to_bytes(8, "little"))
    data[at] += 1
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="corrupt: record batch 0 does not match its checksum"):
        read_trace(path)
    problems, _ = validate_trace(path)
    assert problems and "checksum" in problems[0]


def test_changed_run_metadata_is_corruption(tmp_path):
    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    data = path.read_bytes()
    assert data.count(b'"strategy": "test"') == 2  # the stream's schema and the footer's
    path.write_bytes(data.replace(b'"strategy": "test"', b'"strategy": "tesT"', 1))
    with pytest.raises(TraceError, match="metadata does not match its checksum"):
        read_trace(path)


def test_old_stream_traces_still_read_and_validate():
    """Schema 1.0 (Arrow IPC stream, dictionary columns, no checksums): the committed examples."""
    examples = sorted((ROOT / "traces" / "examples").glob("*.arrow"))
    assert examples
    for path in examples:
        trace = read_trace(path)
        assert trace.schema_version == "1.0" and trace.file_format == "arrow-stream" and not trace.truncated
        assert len(trace.of_kind("prefill")) > 0
        problems, warnings = validate_trace(path)
        assert problems == [] and warnings == [f"{path}: schema 1.0 keeps no checksums: bytes changed on disk "
                                               "cannot be detected, only values out of range"]


def test_the_parquet_export_reads_back_as_the_trace(tmp_path):
    from kvprof.analysis.export import write_parquet

    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    trace = read_trace(path)
    exported = read_trace(write_parquet(trace, tmp_path / "t.parquet"))
    assert exported.file_format == "parquet" and exported.schema_version == "1.1"
    assert exported.table.to_pylist() == trace.table.to_pylist() and exported.run == trace.run
    assert validate_trace(tmp_path / "t.parquet") == ([], [])


def _stream_with(path: Path, metadata: dict[bytes, bytes], drop: str | None = None) -> Path:
    """A schema-1.0-style stream holding some_events(), with the given schema metadata."""
    write_events(path, some_events())
    table = read_trace(path).table
    if drop:
        table = table.drop_columns([drop])
    table = table.replace_schema_metadata(metadata)
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.mark.parametrize("metadata, drop, message", [
    ({META_VERSION: b"1"}, None, "'1' is not MAJOR.MINOR"),
    ({META_VERSION: b"1.0.1"}, None, "'1.0.1' is not MAJOR.MINOR"),
    ({META_VERSION: b"abc"}, None, "'abc' is not MAJOR.MINOR"),
    ({META_VERSION: b"1.0", META_RUN: b"[1, 2]"}, None, "is not a JSON object"),
    ({META_VERSION: b"1.0", META_RUN: b"{oops"}, None, "is not JSON"),
    ({META_VERSION: b"1.0", META_RUN: b"{}"}, "tokens", "missing column tokens"),
    ({META_VERSION: b"1.1", META_RUN: b"{}"}, None, "does not match its checksum"),
])
def test_bad_metadata_and_columns_are_one_clear_error(tmp_path, metadata, drop, message):
    path = _stream_with(tmp_path / "t.arrow", metadata, drop)
    with pytest.raises(TraceError, match=message):
        read_trace(path)
    assert message in validate_trace(path)[0][0]


def test_values_out_of_physical_range_are_flagged(tmp_path):
    path = tmp_path / "t.arrow"
    events = some_events()
    events[3].kv_host_bytes = 2**62
    events[1].ext = {"rss_bytes": 2.25e211}
    write_events(path, events)
    problems, _ = validate_trace(path)
    assert any("kv_host_bytes out of physical range" in problem for problem in problems), problems
    assert any("ext rss_bytes out of physical range" in problem for problem in problems), problems


def test_the_trace_keeps_its_partial_name_until_the_run_finishes(tmp_path):
    path = tmp_path / "t.arrow"
    path.write_bytes(b"the previous trace")
    writer = ArrowTraceWriter(path, {"strategy": "test"})
    event = Event(Kind.RUN_START, 0, 0, seq=0, run_id="r1")
    writer.kvprof_run_start(event)
    assert writer.partial.exists() and path.read_bytes() == b"the previous trace"
    writer.kvprof_run_end(Event(Kind.RUN_END, 1, 1, seq=1, run_id="r1"), error=None)
    assert not writer.partial.exists() and read_trace(path).table.num_rows == 2


def test_a_failed_run_keeps_its_partial_name_and_the_previous_trace(tmp_path):
    path = tmp_path / "t.arrow"
    path.write_bytes(b"the previous trace")
    writer = ArrowTraceWriter(path, {"strategy": "test"})
    writer.kvprof_run_start(Event(Kind.RUN_START, 0, 0, seq=0, run_id="r1"))
    writer.kvprof_run_end(Event(Kind.RUN_END, 1, 1, seq=1, run_id="r1", ext={"failed": 1.0}),
                          error=RuntimeError("boom"))
    assert path.read_bytes() == b"the previous trace"
    trace = read_trace(writer.partial)
    assert trace.footer == "ok" and not trace.truncated and "failed" in trace.warnings[0]


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def write(self, data: object) -> None:
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str) -> object:
        raise OSError(28, "No space left on device")


def test_a_write_that_fails_on_the_writing_thread_is_raised_on_the_runs_thread(tmp_path):
    """Raised once, by the next call of the run's thread (an event, a wait, or the run's end)."""
    for ending in ("add", "close"):
        writer = ArrowTraceWriter(tmp_path / f"{ending}.arrow", {"strategy": "test"}, batch_rows=1)
        writer._writer = pa.ipc.new_file(pa.BufferOutputStream(), writer.schema)
        writer._file = FullDisk()
        writer.add(Event(Kind.RUN_START, 0, 0, seq=0, run_id="r1"))  # flushed; its write fails over there
        writer._pending.join()
        with pytest.raises(TraceWriteError, match="No space left on device"):
            if ending == "add":
                writer.add(Event(Kind.RUN_END, 1, 1, seq=1, run_id="r1"))
            else:
                writer.close()
        writer.close()  # said once: the run's end after that is quiet


def test_parts_waiting_to_be_written_are_bounded_by_bytes_not_count():
    """A part larger than the bound is taken when nothing waits (a prefill cut); small parts after
    it are taken while their bytes fit, and one that does not fit waits until the writer wrote."""
    pending = PendingParts(max_bytes=100)
    pending.put("cut", 1000)               # nothing waits: taken, however large
    took = threading.Event()
    late = threading.Thread(target=lambda: (pending.put("step", 10), took.set()))
    late.start()
    assert not took.wait(0.2)              # 1000 + 10 bytes unwritten: over the bound, it waits
    assert pending.get() == ("cut", 1000)
    pending.written(1000)
    assert took.wait(5)
    small = PendingParts(max_bytes=100)
    for index in range(50):                # many small parts within the bound: no wait at all
        small.put(index, 2)
    late.join()


def test_published_schema_is_current():
    published_file = ROOT / "schemas" / f"kvprof-trace-{SCHEMA_VERSION}.json"
    assert json.loads(published_file.read_text()) == published(), (
        f"regenerate with: python -m kvprof.trace.schema > schemas/kvprof-trace-{SCHEMA_VERSION}.json"
    )


def start_long_run(path: Path) -> subprocess.Popen:
    """`kvprof trace` of thousands of decode steps, returned once 20 of them are on disk."""
    command = [
        sys.executable, "-m", "kvprof.cli", "trace", "--plugin", "full", "--model", "tiny-llama",
        "--weights", "random", "--workload", "synthetic", "--prompt-len", "64", "--output-len", "8000",
        "--flush-s", "0.05", "-o", str(path),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if _decode_steps(partial_path(path)) >= 20:
            return process
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.stderr.read()}")
    process.kill()
    pytest.fail("the run wrote no decode steps in 120 s")


def test_sigkill_mid_decode_leaves_a_readable_trace(tmp_path):
    """A run killed with SIGKILL keeps its complete batches under the partial name; the reader
    says it was cut."""
    path = tmp_path / "killed.arrow"
    process = start_long_run(path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not path.exists()
    trace = read_trace(partial_path(path))
    assert trace.truncated and "truncated" in trace.warnings[0]
    assert len(trace.of_kind("decode_step")) >= 20
    assert len(trace.of_kind("run_end")) == 0
    assert_first_token_kept(trace)
    problems, _ = validate_trace(partial_path(path))
    assert len(problems) == 1 and "truncated" in problems[0]


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                 (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_close_the_trace(tmp_path, signum, status, word):
    """SIGTERM (timeout, schedulers) stops a run as SIGINT does: a complete file with run_end,
    under the partial name, which the one-line message gives."""
    path = tmp_path / "stopped.arrow"
    process = start_long_run(path)
    os.kill(process.pid, signum)
    assert process.wait(timeout=60) == status
    stderr = process.stderr.read()
    assert stderr.strip().splitlines() == [f"kvprof: {word} ({signal.Signals(signum).name}) "
                                           f"(the events so far are in {partial_path(path)})"], stderr
    with pa.ipc.open_file(partial_path(path)) as reader:  # the footer is there
        assert reader.read_all()["kind"].to_pylist()[-1] == "run_end"
    trace = read_trace(partial_path(path))
    assert not trace.truncated and "failed" in trace.warnings[0]
    assert_first_token_kept(trace)


def assert_first_token_kept(trace) -> None:
    """The request never finished, but it had its first token: TTFT counts it."""
    from kvprof.analysis import analyze

    summary = analyze(trace, only=["summary"]).results["summary"]
    assert summary["requests"]["finished"] == 0 and summary["requests"]["unfinished_with_first_token"] == 1
    assert summary["requests"]["failed"] == 1
    assert summary["latency_ms"]["ttft"]["count"] == 1 and summary["latency_ms"]["ttft"]["max"] > 0


def _decode_steps(path: Path) -> int:
    try:
        return len(read_trace(path).of_kind("decode_step"))
    except TraceError:
        return 0


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "traces" / "examples").rglob("*.arrow")),
                         ids=lambda path: path.name)
def test_traces_that_name_the_strategy_plugin_read_with_it_as_strategy(path: Path) -> None:
    """Traces written before RunInfo.strategy name it `plugin` in their run metadata."""
    try:
        schema = pa.ipc.open_file(path).schema
    except pa.ArrowInvalid:  # schema 1.0: an IPC stream
        schema = pa.ipc.open_stream(path).schema
    written = json.loads(schema.metadata[META_RUN])
    assert "plugin" in written and "strategy" not in written
    run = read_trace(path).run
    assert run["strategy"] == written["plugin"] and "plugin" not in run
