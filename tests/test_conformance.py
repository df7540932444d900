"""The conformance kit: each rule catches what it should, with a message that says what is wrong.

Two sorts of strategy are checked. Broken strategies on the real transformers runner (a tiny
model, random weights) show the kit catching the mistakes a plugin author makes: events emitted
late, bytes reported as freed that are still resident. A scripted engine (`ScriptedEngine`,
which emits events by hand through a real Profiler and trace writer) breaks one rule at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvprof import Medium, Profiler, RunInfo
from kvprof.plugins import load_plugins
from kvprof.testing import checks, conformance
from kvprof.trace import read_trace

pytest_plugins = ["pytester"]


# --- broken strategies on the transformers runner ---------------------------------------------


def window_strategy(policy_cls: type) -> type:
    """A strategy running `policy_cls`, a WindowPolicy (defined lazily: it imports torch)."""
    from kvprof_transformers.plugin import TransformersStrategy

    class Strategy(TransformersStrategy):
        name = policy_cls.name

        def make_policy(self, loaded: Any, options: dict) -> Any:
            return policy_cls()

    return Strategy


def window_policies() -> dict[str, type]:
    from kvprof_transformers.runner import CachePolicy

    class WindowPolicy(CachePolicy):
        """Keeps each row's latest `window` tokens (the tests' prompts have no padding)."""

        name = "window"
        window = 48

        def new_cache(self, batch: Any) -> Any:
            self.gone = 0  # positions below this are evicted
            return super().new_cache(batch)

        def after_prefill(self, batch: Any, cache: Any) -> None:
            self.evict(batch, cache, newest=int(batch.next_positions[0]) - 1)

        def after_step(self, batch: Any, cache: Any) -> None:
            self.evict(batch, cache, newest=int(batch.next_positions[0]))

        def evict(self, batch: Any, cache: Any, newest: int) -> None:
            keep_from = newest + 1 - self.window
            if keep_from <= self.gone:
                return
            positions = list(range(self.gone, keep_from))
            self.gone = keep_from
            start = self.runner.clock.now()
            entry_bytes = self.free(batch, cache, positions)
            step = batch.step if batch.step >= 0 else None
            self.report(batch, step, start, self.runner.clock.now(), positions, entry_bytes)

        def free(self, batch: Any, cache: Any, positions: list[int]) -> int:
            """Drops the oldest slots; returns the bytes of one token's KV in one row."""
            slots = batch.attention_mask.shape[1]
            entry_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                              for t in (layer.keys, layer.values)) // (batch.size * slots)
            for layer in cache.layers:
                layer.keys = layer.keys[:, :, len(positions):].clone()
                layer.values = layer.values[:, :, len(positions):].clone()
            batch.attention_mask = batch.attention_mask[:, len(positions):]
            return entry_bytes

        def report(self, batch: Any, step: int | None, start: int, end: int, positions: list[int],
                   entry_bytes: int) -> None:
            for request in batch.requests:
                self.runner.profiler.emit_evict(
                    start, end, request_id=request.request_id, step=step, reason="window", tokens=len(positions),
                    bytes=len(positions) * entry_bytes, positions=[positions], src_medium=Medium.DEVICE.value)

    class LateReports(WindowPolicy):
        """Reports each eviction one step late, with the times it measured then."""

        name = "late-reports"
        pending: tuple | None = None

        def report(self, *args: Any) -> None:
            if self.pending is not None:
                super().report(*self.pending)
            self.pending = args

    class MaskOnly(WindowPolicy):
        """Masks the evicted slots but keeps them in the cache, and reports their bytes as freed."""

        name = "mask-only"

        def free(self, batch: Any, cache: Any, positions: list[int]) -> int:
            entry_bytes = super().free(batch, cache, [])
            batch.attention_mask[:, positions[0]:positions[-1] + 1] = 0
            return entry_bytes

    return {"window": WindowPolicy, "late": LateReports, "mask": MaskOnly}


@pytest.fixture(scope="module")
def policies() -> dict[str, type]:
    return window_policies()


def test_a_correct_window_strategy_conforms(policies: dict[str, type], tmp_path: Path) -> None:
    report = conformance.check_strategy(window_strategy(policies["window"]), trace_dir=tmp_path)
    assert report.ok, report.format()
    assert report.counts["evict"] == 2 * 8  # both requests: after prefill and after each of 7 steps
    assert set(report.analyses.values()) == {"ok"}


def test_events_out_of_order_fail_with_what_and_where(policies: dict[str, type], tmp_path: Path) -> None:
    report = conformance.check_strategy(window_strategy(policies["late"]), trace_dir=tmp_path)
    assert not report.ok
    timing = [p for p in report.problems if p.check == "timestamps"]
    assert timing, report.format()
    first = timing[0]
    trace = read_trace(report.trace_path)
    late_event = trace.table.filter(trace.table["seq"].to_numpy() == first.seq).to_pylist()[0]
    assert late_event["kind"] == "evict"
    assert "yet is emitted after it: emit a step's events before the step's own event" in first.message
    assert f"ends at {late_event['end_ns']} ns, before" in first.message  # the actual time, against the step's end
    assert "ended at" in first.message
    assert "[timestamps] seq" in report.format()


def test_bytes_reported_freed_but_still_resident_fail(policies: dict[str, type], tmp_path: Path) -> None:
    report = conformance.check_strategy(window_strategy(policies["mask"]), trace_dir=tmp_path)
    accounting = [p for p in report.problems if p.check == "accounting"]
    assert accounting, report.format()
    message = accounting[0].message
    assert "bytes reported as freed are still resident" in message
    assert "ext['simulated']=1" in message
    assert all(p.check == "accounting" for p in report.problems), report.format()


def test_a_strategy_that_raises_is_a_problem_and_its_trace_is_still_checked(tmp_path: Path) -> None:
    from kvprof import Strategy

    class Crashes(Strategy):
        name = "crashes"

        def run(self, ctx: Any) -> None:
            ctx.profiler.start()
            raise RuntimeError("out of cache slots")

    report = conformance.check_strategy(Crashes, trace_dir=tmp_path)
    assert str(report.problems[0]) == "[run] strategy 'crashes' raised RuntimeError: out of cache slots"
    assert report.counts == {"run_start": 1, "run_end": 1}


# --- one rule at a time, on a scripted engine ---------------------------------------------------


class ScriptedEngine:
    """Emits a small run by hand: one request, KV of ENTRY bytes per token, all on the device."""

    ENTRY = 64

    def __init__(self, profiler: Profiler) -> None:
        self.profiler = profiler
        self.kv = 0
        self.steps = 0

    def now(self) -> int:
        return time.monotonic_ns()

    def prefill(self, tokens: int = 8) -> None:
        start = self.now()
        self.kv += tokens * self.ENTRY
        self.profiler.emit_prefill(start, self.now(), request_id="r0", tokens=tokens, kv_device_bytes=self.kv,
                                   ext={"prompt_tokens": float(tokens)})

    def step(self, **fields: Any) -> None:
        start = self.now()
        self.kv += self.ENTRY
        values = dict(step=self.steps, batch_size=1, tokens=1, kv_device_bytes=self.kv) | fields
        self.profiler.emit_decode_step(start, self.now(), **values)
        self.steps += 1

    def evict(self, positions: list[int], free: bool = True, **fields: Any) -> None:
        if free:
            self.kv -= len(positions) * self.ENTRY
        values = dict(request_id="r0", reason="test", tokens=len(positions), bytes=len(positions) * self.ENTRY,
                      positions=[positions], src_medium=Medium.DEVICE.value) | fields
        now = self.now()
        self.profiler.emit_evict(now, now, **values)

    def offload(self, src: Medium, dst: Medium, positions: list[int], layer: int = 0) -> None:
        now = self.now()
        self.profiler.emit_offload(now, now, request_id="r0", layer=layer, tokens=len(positions),
                                   bytes=len(positions) * self.ENTRY, positions=[positions],
                                   src_medium=src.value, dst_medium=dst.value)

    def finish(self) -> None:
        self.profiler.emit_request_end(self.now(), self.now(), request_id="r0", tokens=self.steps + 1)


def record(tmp_path: Path, script: Callable[[ScriptedEngine], None]) -> Path:
    """Run `script` on a ScriptedEngine with a real profiler and trace writer; the trace's path."""
    path = tmp_path / "scripted.arrow"
    run = RunInfo(strategy="scripted", model={}, workload={}, options={}, trace_path=str(path))
    profiler = Profiler(load_plugins().manager, run)
    profiler.start()
    script(ScriptedEngine(profiler))
    profiler.end()
    return path


def good_run(engine: ScriptedEngine) -> None:
    engine.prefill()
    engine.step()
    engine.evict([2, 3])
    engine.step()
    engine.finish()


def problems_of(path: Path, check: Callable) -> list[str]:
    return [str(problem) for problem in check(read_trace(path))]


def test_the_scripted_run_conforms(tmp_path: Path) -> None:
    report = conformance.check_trace(record(tmp_path, good_run))
    assert report.ok, report.format()


def test_missing_fields_are_named(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.evict([2], reason=None)
        engine.finish()

    assert problems_of(record(tmp_path, script), checks.check_required_fields) == [
        "[fields] seq 3: evict (request r0) has no reason; every evict event needs one (see hook kvprof_evict)"]


def test_timestamps_in_other_units_are_caught(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        micros = engine.now() // 1000
        engine.profiler.emit_decode_step(micros, micros + 5, step=0, batch_size=1, tokens=1, kv_device_bytes=576)
        engine.finish()

    (problem,) = problems_of(record(tmp_path, script), checks.check_units)
    assert problem.startswith("[units] seq 2: decode_step (step 0) starts at ")
    assert "before run_start" in problem and "timestamps must be time.monotonic_ns() of this run" in problem


def test_bytes_in_kib_are_caught(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.evict([2, 3], bytes=2 * ScriptedEngine.ENTRY // 1024)  # 0 "KiB"
        engine.finish()

    problems = problems_of(record(tmp_path, script), checks.check_units)
    assert problems == ["[units] seq 3: evict (request r0): 0 bytes for 2 tokens, less than one byte per entry: "
                        "`bytes` must count bytes (not KiB or MB)"]


def test_decode_steps_out_of_order(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.step(step=5)
        engine.finish()

    assert problems_of(record(tmp_path, script), checks.check_order) == [
        "[order] seq 3: decode step 5 follows step 0 (seq 2); expected step 1, or 0 for a new batch"]


def test_events_after_the_request_ended(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.finish()
        engine.evict([1])

    assert problems_of(record(tmp_path, script), checks.check_order) == [
        "[order] seq 4: evict (request r0) comes after request r0 ended (request_end at seq 3)"]


def test_tokens_must_match_positions(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.evict([2, 3], tokens=3, bytes=3 * ScriptedEngine.ENTRY)
        engine.finish()

    problems = problems_of(record(tmp_path, script), checks.check_accounting)
    assert problems[0] == ("[accounting] seq 3: evict (request r0): tokens=3, but its positions list 2 entries; "
                           "tokens counts the entries named in positions (all heads' lists together)")


def test_bytes_per_entry_must_not_change(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.evict([2])
        engine.step()
        engine.evict([3], bytes=ScriptedEngine.ENTRY // 2)  # keys only, say
        engine.finish()

    problems = problems_of(record(tmp_path, script), checks.check_accounting)
    assert ("[accounting] seq 5: evict (request r0): 32 bytes for 1 tokens = 32.0 bytes per entry, but evict "
            "(request r0) at seq 3 moved 64.0 bytes per entry; every KV entry of a layer has the same size") in problems


def test_memory_freed_without_an_event(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.kv -= 3 * ScriptedEngine.ENTRY  # dropped silently
        engine.step()
        engine.finish()

    assert problems_of(record(tmp_path, script), checks.check_accounting) == [
        "[accounting] seq 3: device KV fell from 576 to 448 bytes since seq 2 (-128), but the evict and offload "
        "events in between account for 0 bytes: report all freed memory in evict events"]


def test_evicting_a_position_twice_or_one_that_does_not_exist(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.evict([2])
        engine.evict([2])
        engine.evict([40])
        engine.finish()

    assert problems_of(record(tmp_path, script), checks.check_positions) == [
        "[positions] seq 4: evict (request r0) evicts position 2 again: it was already evicted from device at seq 3",
        "[positions] seq 5: evict (request r0) evicts position 40, which request r0 does not have "
        "(expected 0 <= position < 10: its prompt and the tokens generated so far)",
    ]


def test_fetches_must_have_been_offloaded(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.offload(Medium.DEVICE, Medium.HOST, [0, 1, 2])
        engine.step()
        engine.offload(Medium.HOST, Medium.DEVICE, [1, 2, 5])
        engine.step()
        engine.finish()

    assert problems_of(record(tmp_path, script), checks.check_fetches) == [
        "[fetches] seq 4: offload (host->device, layer 0, request r0) fetches positions [5] that were never "
        "offloaded to the host"]


def test_repeated_problems_are_counted_not_listed(tmp_path: Path) -> None:
    def script(engine: ScriptedEngine) -> None:
        engine.prefill()
        for _ in range(6):
            engine.step(kv_device_bytes=None)
        engine.finish()

    problems = problems_of(record(tmp_path, script), checks.check_required_fields)
    assert len(problems) == checks.MAX_REPEATS + 1
    assert problems[-1] == "[fields] ... 3 more like: decode_step without kv_device_bytes"


def test_schema_problems_come_from_kvprof_validate(tmp_path: Path) -> None:
    path = tmp_path / "empty.arrow"
    path.write_bytes(b"")
    report = conformance.check_trace(path)
    assert [str(p) for p in report.problems] == [f"[schema] {path}: empty file (the run wrote nothing)"]


# --- the pytest fixture -------------------------------------------------------------------------


def test_the_fixture_fails_a_test_with_the_report(tmp_path: Path, pytester: pytest.Pytester) -> None:
    def broken(engine: ScriptedEngine) -> None:
        engine.prefill()
        engine.step()
        engine.evict([2], reason=None)
        engine.finish()

    good, bad = record(tmp_path / "good", good_run), record(tmp_path / "bad", broken)
    pytester.makepyfile(f"""
        def test_good(kvprof_conformance):
            kvprof_conformance.check_trace({str(good)!r})

        def test_bad(kvprof_conformance):
            kvprof_conformance.check_trace({str(bad)!r})
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert f"kvprof conformance: {bad}: 1 problem(s)" in output
    assert "  [fields] seq 3: evict (request r0) has no reason; every evict event needs one (see hook kvprof_evict)" \
        in output
    assert "Traceback" not in output and "def test_bad" not in output  # the report, not a stack


def test_block_allocated_kv_may_grow_by_a_block_per_request(tmp_path):
    """An engine that allocates KV in blocks (the trace states extra["kv_block_bytes"]) may add a
    whole block for one new token; without that statement the same growth is a problem."""
    from kvprof import Event, Kind
    from kvprof.testing.conformance import check_trace
    from kvprof.trace import ArrowTraceWriter

    per_token, block = 100, 1600  # 16 tokens a block

    def write(path, run_extra):
        events = [
            Event(Kind.RUN_START, 0, 0),
            Event(Kind.PREFILL, 1, 2, request_id="r", tokens=32, kv_device_bytes=32 * per_token),
            Event(Kind.DECODE_STEP, 3, 4, step=0, batch_size=1, tokens=1, kv_device_bytes=32 * per_token + block),
            Event(Kind.REQUEST_END, 0, 5, request_id="r", tokens=2, text="x"),
            Event(Kind.RUN_END, 6, 6, ext={"profiler_events": 4.0}),
        ]
        writer = ArrowTraceWriter(path, {"strategy": "blocks", "extra": run_extra, "workload": {}})
        for seq, event in enumerate(events):
            event.seq, event.run_id = seq, "r1"
            writer.add(event)
        writer.close()
        return [p for p in check_trace(path).problems if p.check == "accounting"]

    assert write(tmp_path / "blocks.arrow", {"kv_block_bytes": block}) == []
    assert write(tmp_path / "tokens.arrow", {}) != []
