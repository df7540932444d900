"""The Arrow trace: round trip, crash safety, bad files, the published schema."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from kvprof.events import Event, Kind
from kvprof.trace import ArrowTraceWriter, TraceError, read_trace
from kvprof.trace.schema import META_RUN, META_VERSION, arrow_schema, published
from kvprof.trace.validate import validate_trace

ROOT = Path(__file__).resolve().parents[1]


def write_events(path: Path, events: list[Event], close: bool = True, batch_rows: int = 2) -> ArrowTraceWriter:
    writer = ArrowTraceWriter(path, {"plugin": "test"}, batch_rows=batch_rows)
    for seq, event in enumerate(events):
        event.seq, event.run_id = seq, "r1"
        writer.add(event)
    if close:
        writer.close()
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
    assert trace.run == {"plugin": "test"}
    evict = trace.of_kind("evict").to_pylist()[0]
    assert evict["positions"] == [[1, 2], [7]]
    assert evict["reason"] == "h2o" and evict["src_medium"] == "device"
    assert dict(evict["ext"]) == {"simulated": 0.0}
    assert trace.table["seq"].to_pylist() == [0, 1, 2, 3, 4]
    assert validate_trace(path) == ([], [])


def test_trace_opens_in_plain_pyarrow_and_pandas(tmp_path):
    path = tmp_path / "t.arrow"
    write_events(path, some_events())
    with pa.ipc.open_stream(path) as reader:
        frame = reader.read_pandas()
    assert list(frame["kind"].astype(str)) == ["run_start", "prefill", "evict", "decode_step", "run_end"]


def test_a_cut_trace_reads_its_complete_batches_and_says_so(tmp_path):
    path = tmp_path / "t.arrow"
    write_events(path, some_events(), close=False, batch_rows=2)  # 2 batches flushed, 1 event pending
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the second batch is now cut mid-message
    trace = read_trace(path)
    assert trace.truncated
    assert len(trace) == 2
    assert "truncated" in trace.warnings[0]


@pytest.mark.parametrize("content, message", [
    (None, "no such trace file"),
    (b"", "empty file"),
    (b"this is not arrow at all", "not an Arrow IPC stream"),
])
def test_bad_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.arrow"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_an_arrow_stream_that_is_not_kvprof_is_refused(tmp_path):
    path = tmp_path / "other.arrow"
    table = pa.table({"x": [1, 2]})
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(TraceError, match="not a kvprof trace"):
        read_trace(path)


def test_a_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "new.arrow"
    schema = arrow_schema({}).with_metadata({META_VERSION: b"1.99", META_RUN: b"{}"})
    with pa.ipc.new_stream(path, schema):
        pass
    with pytest.raises(TraceError, match="newer"):
        read_trace(path)


def test_published_schema_is_current():
    published_file = ROOT / "schemas" / "kvprof-trace-1.0.json"
    assert json.loads(published_file.read_text()) == published(), (
        "regenerate with: python -m kvprof.trace.schema > schemas/kvprof-trace-1.0.json"
    )


def test_sigkill_mid_decode_leaves_a_readable_trace(tmp_path):
    """A run killed with SIGKILL keeps its complete batches; the reader says it was cut."""
    path = tmp_path / "killed.arrow"
    command = [
        sys.executable, "-m", "kvprof.cli", "trace", "--plugin", "full", "--model", "tiny-llama",
        "--weights", "random", "--workload", "synthetic", "--prompt-len", "64", "--output-len", "100000",
        "--flush-s", "0.05", "-o", str(path),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if path.exists() and _decode_steps(path) >= 20:
                break
        else:
            pytest.fail("the run wrote no decode steps in 120 s")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    trace = read_trace(path)
    assert trace.truncated and "truncated" in trace.warnings[0]
    assert len(trace.of_kind("decode_step")) >= 20
    assert len(trace.of_kind("run_end")) == 0
    assert validate_trace(path)[0] == []


def _decode_steps(path: Path) -> int:
    try:
        return len(read_trace(path).of_kind("decode_step"))
    except TraceError:
        return 0
