"""Events emitted as one columnar batch (`Profiler.emit_batch`) against the same events one by one."""

from pathlib import Path

import numpy as np
import pytest

from kvprof import Event, Kind, Profiler, RunInfo, hookimpl
from kvprof.errors import SinkError
from kvprof.events import EventBatch, Positions
from kvprof.plugins import load_plugins
from kvprof.trace import read_trace
from kvprof.trace.validate import validate_trace

POSITIONS = [[[3, 9], [4]], [[], [1, 2, 5]], [[7], []]]  # three events, two KV heads each


def evictions() -> EventBatch:
    lists = [head for event in POSITIONS for head in event]
    return EventBatch(
        Kind.EVICT, 100, 200,
        columns={"request_id": ["a", "a", "b"], "layer": np.array([0, 1, 0]),
                 "tokens": np.array([3, 3, 1]), "bytes": np.array([96, 96, 32]),
                 "ext": {"budget_tokens": np.array([8.0, 8.0, 6.0])}},
        shared={"reason": "h2o", "step": 4, "src_medium": "device", "kv_device_bytes": 4096},
        positions=Positions(values=np.array([p for head in lists for p in head], dtype=np.int32),
                            list_offsets=np.cumsum([0, *map(len, lists)]).astype(np.int32),
                            event_offsets=np.array([0, 2, 4, 6], dtype=np.int32)))


def record(path: Path, emit_batch: bool, *extra_sinks: object) -> Profiler:
    manager = load_plugins().manager
    for sink in extra_sinks:
        manager.register(sink)
    try:
        profiler = Profiler(manager, RunInfo(strategy="t", model={}, workload={}, options={}, trace_path=str(path)))
        profiler.start()
        profiler.emit_decode_step(0, 90, step=3, batch_size=2, tokens=2, kv_device_bytes=4096)
        if emit_batch:
            profiler.emit_batch(evictions())
        else:
            for event in evictions().events():
                profiler.emit(event)
        profiler.emit_decode_step(95, 210, step=4, batch_size=2, tokens=2, kv_device_bytes=4096)
        profiler.end()
    finally:
        for sink in extra_sinks:
            manager.unregister(sink)
    return profiler


def rows(path: Path) -> list[dict]:
    table = read_trace(path).table.drop_columns(["run_id", "start_ns", "end_ns"])
    return [row for row in table.to_pylist() if row["kind"] not in ("run_start", "run_end")]


def test_a_batch_writes_the_trace_its_events_write_one_by_one(tmp_path):
    record(tmp_path / "batch.arrow", emit_batch=True)
    record(tmp_path / "single.arrow", emit_batch=False)
    assert rows(tmp_path / "batch.arrow") == rows(tmp_path / "single.arrow")
    evicts = read_trace(tmp_path / "batch.arrow").of_kind("evict").to_pylist()
    assert [e["positions"] for e in evicts] == POSITIONS
    assert [e["seq"] for e in evicts] == [2, 3, 4]
    assert [dict(e["ext"]) for e in evicts][2] == {"budget_tokens": 6.0}
    assert validate_trace(tmp_path / "batch.arrow") == ([], [])


class EvictCounter:
    """A sink that knows nothing of batches: it must still see every evict event."""

    def __init__(self) -> None:
        self.seen: list[Event] = []

    @hookimpl
    def kvprof_evict(self, event: Event) -> None:
        self.seen.append(event)


def test_a_sink_without_the_batch_hook_gets_each_event(tmp_path):
    counter = EvictCounter()
    record(tmp_path / "t.arrow", True, counter)
    assert [(e.seq, e.request_id, e.layer, e.positions, e.reason, e.step) for e in counter.seen] == [
        (2, "a", 0, POSITIONS[0], "h2o", 4), (3, "a", 1, POSITIONS[1], "h2o", 4), (4, "b", 0, POSITIONS[2], "h2o", 4)]


class BrokenBatchSink:
    @hookimpl
    def kvprof_event_batch(self, batch: EventBatch) -> None:
        raise RuntimeError("disk on fire")


def test_a_failing_batch_sink_is_named(tmp_path):
    manager = load_plugins().manager
    manager.register(BrokenBatchSink(), name="broken-batch-sink")
    try:
        profiler = Profiler(manager, RunInfo(strategy="t", model={}, workload={}, options={}))
        profiler.start()
        with pytest.raises(SinkError, match="broken-batch-sink"):
            profiler.emit_batch(evictions())
    finally:
        manager.unregister(name="broken-batch-sink")


def test_columns_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        EventBatch(Kind.EVICT, 0, 1, columns={"layer": [0, 1], "tokens": [1]})
    with pytest.raises(ValueError, match="differ in length"):
        EventBatch(Kind.EVICT, 0, 1, columns={"layer": [0, 1], "ext": {"budget_tokens": [1.0]}})
