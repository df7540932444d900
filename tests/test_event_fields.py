"""The per-kind field table of kvprof.events: what it drives (emit_* types, the conformance kit's
required fields, the hook reference) and that real traces keep to it."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pyarrow.compute as pc
import pytest
from mypy import api as mypy

from kvprof import Event, Kind
from kvprof.events import KIND_FIELDS, PhaseFields, kind_fields, required_fields
from kvprof.profiler import Profiler
from kvprof.testing import hookref
from kvprof.testing.checks import REQUIRED_FIELDS
from kvprof.trace import read_trace

EXAMPLES = sorted((Path(__file__).parents[1] / "traces" / "examples").rglob("*.arrow"))
EVERY_EVENT = {"kind", "start_ns", "end_ns", "seq", "run_id"}


def test_every_field_of_the_table_is_a_field_of_the_event() -> None:
    event_fields = {field.name for field in fields(Event)}
    for kind in KIND_FIELDS:
        names = {row.name for row in kind_fields(kind)}
        assert names and names <= event_fields - EVERY_EVENT, kind


def test_the_conformance_kit_requires_what_the_table_requires() -> None:
    assert REQUIRED_FIELDS == {kind.value: required_fields(kind) for kind in Kind if required_fields(kind)}
    assert REQUIRED_FIELDS["prefill"] == ("request_id", "tokens", "kv_device_bytes")
    assert REQUIRED_FIELDS["phase"] == ("phase",)


def test_each_emit_helper_is_typed_by_its_kinds_row() -> None:
    for kind, table in KIND_FIELDS.items():
        if kind is Kind.RUN_END:  # emitted by the profiler itself
            continue
        parameters = inspect.signature(getattr(Profiler, f"emit_{kind.value}")).parameters
        typed_by = table.__name__ if table is not PhaseFields else "PhaseDetail"  # phase comes first
        assert parameters["fields"].annotation == f"Unpack[{typed_by}]", kind


def test_the_hook_reference_shows_each_kinds_fields() -> None:
    reference = hookref.render()
    for kind in KIND_FIELDS:
        section = reference.split(f"### `kvprof_{kind.value}(", 1)[1].split("\n### ", 1)[0]
        for row in kind_fields(kind):
            assert f"| `{row.name}` |" in section, (kind, row.name)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_real_traces_carry_only_the_fields_of_their_kind(path: Path) -> None:
    trace = read_trace(path)
    kinds = trace.table["kind"].cast("string")
    checked = 0
    for kind in KIND_FIELDS:
        events = trace.table.filter(pc.equal(kinds, kind.value))
        allowed = EVERY_EVENT | {row.name for row in kind_fields(kind)}
        carried = {name for name in events.column_names if events[name].null_count < len(events)}
        assert carried <= allowed, (kind, carried - allowed)
        checked += len(events)
    assert checked > 0


def test_mypy_holds_a_strategy_to_the_table(tmp_path: Path) -> None:
    snippet = tmp_path / "strategy_code.py"
    snippet.write_text(
        "from kvprof import Profiler\n\n\n"
        "def report(profiler: Profiler) -> None:\n"
        "    profiler.emit_prefill(0, 1, request_id='r0', tokens=3, kv_device_bytes=10)\n"
        "    profiler.emit_evict(0, 1, reason='h2o', tokens=2, bytes=8, src_medium='device', layer=1)\n"
        "    profiler.emit_prefill(0, 1, request_id='r0', tokenz=3, kv_device_bytes=10)\n"
        "    profiler.emit_evict(0, 1, reason='h2o', tokens=2, bytes=8)\n"
    )
    out, _, status = mypy.run(["--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
                               "--cache-dir=/dev/null", str(snippet)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 2, out
    assert ':7: error: Unexpected keyword argument "tokenz" for "emit_prefill"' in errors[0]
    assert ':8: error: Missing named argument "src_medium" for "emit_evict"' in errors[1]
