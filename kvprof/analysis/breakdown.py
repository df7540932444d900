"""Where the time and the memory went.

Time: every nanosecond of the run (run_start to run_end) is given to exactly one phase, by
priority where spans overlap:

    named PHASE spans (speculation, kv_transfer, eviction, sync_stall, then a plugin's own names)
    > prefill (the spans of prefill events) > decode compute (decode_step spans) > other

so a phase span inside a decode step is taken out of that step and what remains of the step
is decode compute; a phase span inside a prefill is taken out of the prefill. "other" is the
run's time outside prefill and decode steps (batch set-up, tokenizing, gaps between steps).
Phases a run does not have are absent from the result, not zero. Per decode step the same
split is reported (milliseconds), which is how a stall in one step shows.

A PHASE span marked `ext overlapped=1` ran on another stream beside the critical path (InfiniGen's
speculation on its side stream): it is not in the split, whose parts add up to the wall time, but
reported beside it (`overlapped`: the time its spans cover, in total and per decode step). What
it costs the step is not in its span; a wait for its result is (the kv_transfer stall).

Memory per component over time, at each moment the trace reports memory (events with KV
bytes resident, and samples), with the latest known value of each source:

    weights     run.extra.weights_bytes (constant)
    kv_device   kv_device_bytes          kv_host  kv_host_bytes
    aux_device  aux_device_bytes (strategy structures: partial keys, scores)
    workspace   allocator allocated - weights - kv_device - aux_device (GPU runs only; clipped at 0)

A component a run does not report is absent. `at_peak` is the split at the moment the total
of the device components (or, without allocator figures, of all KV) was largest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from kvprof.analysis.common import (
    NS_PER_MS,
    NS_PER_S,
    Events,
    ext_values,
    floats,
    ints,
    require_events,
    run_bounds,
    strings,
)
from kvprof.events import Phase
from kvprof.trace import Trace

PHASE_LABELS: dict[str, str] = {
    "prefill": "prefill",
    "decode_compute": "decode compute",
    Phase.SPECULATION.value: "speculation",
    Phase.KV_TRANSFER.value: "KV transfer",
    Phase.EVICTION.value: "eviction bookkeeping",
    Phase.SYNC_STALL.value: "synchronization stall",
    "other": "other",
}
STANDARD_PHASES = [phase.value for phase in Phase]
MEMORY_COMPONENTS = ("weights", "kv_device", "kv_host", "aux_device", "workspace")
MAX_SERIES_POINTS = 2000  # memory series are thinned to this many points (evenly by index)


def breakdown(trace: Trace) -> dict[str, Any]:
    """Time per phase (total and per decode step) and memory per component over time."""
    require_events(trace)
    events = Events.of(trace)
    return {"time": time_breakdown(events), "memory": memory_breakdown(events)}


# --- time ---------------------------------------------------------------------------------


def _spans(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return ints(table, "start_ns"), ints(table, "end_ns")


def _coverage(bounds: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each elementary segment [bounds[i], bounds[i+1]): whether a span covers it."""
    size = len(bounds)
    delta = (np.bincount(np.searchsorted(bounds, starts), minlength=size + 1)
             - np.bincount(np.searchsorted(bounds, ends), minlength=size + 1))
    return np.cumsum(delta)[: size - 1] > 0


def time_breakdown(events: Events) -> dict[str, Any]:
    run_start, run_end = run_bounds(events)
    phases = events.of_kind("phase", ["start_ns", "end_ns", "phase", "ext"])
    phase_names = strings(phases, "phase")
    phase_starts, phase_ends = _spans(phases)
    beside = ext_values(phases, "overlapped") == 1.0
    step_starts, step_ends = _spans(events.of_kind("decode_step", ["start_ns", "end_ns"]))
    overlapped = _overlapped(phase_names[beside], phase_starts[beside], phase_ends[beside], run_start, run_end,
                             step_starts, step_ends)
    phase_names, phase_starts, phase_ends = phase_names[~beside], phase_starts[~beside], phase_ends[~beside]
    present = set(phase_names.tolist())
    named = [p for p in STANDARD_PHASES if p in present] + sorted(p for p in present - set(STANDARD_PHASES) if p)
    categories = [(name, phase_starts[phase_names == name], phase_ends[phase_names == name]) for name in named]
    categories.append(("prefill", *_spans(events.of_kind("prefill", ["start_ns", "end_ns"]))))
    categories.append(("decode_compute", step_starts, step_ends))

    # Elementary segments between every span boundary, each owned by its top-priority phase.
    all_starts = np.concatenate([c[1] for c in categories])
    all_ends = np.concatenate([c[2] for c in categories])
    bounds = np.unique(np.clip(np.concatenate([all_starts, all_ends, [run_start, run_end]]), run_start, run_end))
    owner = np.full(len(bounds) - 1, len(categories))  # default: "other"
    for index in reversed(range(len(categories))):  # lower priority first, overwritten by higher
        _, starts, ends = categories[index]
        if len(starts):
            owner[_coverage(bounds, np.clip(starts, run_start, run_end), np.clip(ends, run_start, run_end))] = index
    lengths = np.diff(bounds)
    names = [c[0] for c in categories] + ["other"]
    totals = np.bincount(owner, weights=lengths, minlength=len(names))
    has = {name for name, starts, _ in categories if len(starts)}
    wall = run_end - run_start
    seconds = {name: float(totals[i] / NS_PER_S) for i, name in enumerate(names)
               if name in has or (name == "other" and totals[i] > 0)}
    per_step = _per_step(bounds, lengths, owner, names, step_starts, step_ends, run_start)
    per_step["overlapped_ms"] = overlapped.pop("per_step_ms")
    return {
        "labels": {name: PHASE_LABELS.get(name, name) for name in seconds},
        "seconds": seconds,
        "share": {name: (value * NS_PER_S / wall if wall > 0 else None) for name, value in seconds.items()},
        "wall_seconds": float(wall / NS_PER_S),
        "per_step": per_step,
        "overlapped": {**overlapped, "share": {name: (value * NS_PER_S / wall if wall > 0 else None)
                                               for name, value in overlapped["seconds"].items()}},
    }


def _overlapped(names: np.ndarray, starts: np.ndarray, ends: np.ndarray, run_start: int, run_end: int,
                step_starts: np.ndarray, step_ends: np.ndarray) -> dict[str, Any]:
    """Per name of the spans beside the critical path: the time they cover (their union, seconds)
    and, per decode step in time order, the part of it inside the step (ms)."""
    result: dict[str, Any] = {"labels": {}, "seconds": {}, "per_step_ms": {}}
    for name in dict.fromkeys(names.tolist()):
        chosen_starts = np.clip(starts[names == name], run_start, run_end)
        chosen_ends = np.clip(ends[names == name], run_start, run_end)
        steps = np.clip(np.concatenate([step_starts, step_ends]), run_start, run_end)  # a span may cross steps
        bounds = np.unique(np.concatenate([chosen_starts, chosen_ends, steps, [run_start, run_end]]))
        covered = _coverage(bounds, chosen_starts, chosen_ends).astype(np.int64)
        lengths = np.diff(bounds)
        result["labels"][name] = PHASE_LABELS.get(name, name)
        result["seconds"][name] = float(lengths[covered == 1].sum() / NS_PER_S)
        in_steps = _per_step(bounds, lengths, 1 - covered, [name, "other"], step_starts, step_ends, run_start)
        result["per_step_ms"][name] = in_steps["phases_ms"].get(name, [0.0] * len(step_starts))
    return result


def _per_step(bounds: np.ndarray, lengths: np.ndarray, owner: np.ndarray, names: list[str],
              step_starts: np.ndarray, step_ends: np.ndarray, run_start: int) -> dict[str, Any]:
    """The phase split of each decode step, in time order: start (s from the run start),
    duration and each phase's time within it (ms)."""
    order = np.argsort(step_starts, kind="stable")
    starts, ends = step_starts[order], step_ends[order]
    if len(starts) == 0:
        return {"start_s": [], "duration_ms": [], "phases_ms": {}}
    step_of = np.searchsorted(starts, bounds[:-1], side="right") - 1
    inside = (step_of >= 0) & (bounds[:-1] < ends[np.maximum(step_of, 0)])
    phases_ms: dict[str, list[float]] = {}
    for index, name in enumerate(names[:-1]):
        if name == "prefill":
            continue
        chosen = inside & (owner == index)
        if name != "decode_compute" and not chosen.any():
            continue
        per_step = np.bincount(step_of[chosen], weights=lengths[chosen], minlength=len(starts))
        phases_ms[name] = (per_step / NS_PER_MS).tolist()
    return {
        "start_s": ((starts - run_start) / NS_PER_S).tolist(),
        "duration_ms": ((ends - starts) / NS_PER_MS).tolist(),
        "phases_ms": phases_ms,
    }


# --- memory -------------------------------------------------------------------------------


def _as_of(times: np.ndarray, source_times: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The latest non-NaN source value at or before each time (NaN before the first)."""
    known = ~np.isnan(values)
    source_times, values = source_times[known], values[known]
    index = np.searchsorted(source_times, times, side="right") - 1
    result = np.where(index >= 0, values[np.maximum(index, 0)] if len(values) else np.nan, np.nan)
    return result.astype(np.float64)


def memory_breakdown(events: Events, max_points: int = MAX_SERIES_POINTS) -> dict[str, Any]:
    kv = events.kv
    samples = events.of_kind("sample", ["end_ns", "mem_allocated_bytes"])
    kv_times, sample_times = kv.end_ns, ints(samples, "end_ns")
    kv_order, sample_order = np.argsort(kv_times, kind="stable"), np.argsort(sample_times, kind="stable")
    times = np.unique(np.concatenate([kv_times, sample_times]))
    if times.size == 0:
        return {"components": [], "series": {}, "peak_bytes": {}, "at_peak": {}}
    run_start = run_bounds(events)[0]

    series: dict[str, np.ndarray] = {}
    weights = (events.trace.run or {}).get("extra", {}).get("weights_bytes")
    if weights is not None:
        series["weights"] = np.full(times.size, float(weights))
    for name, tier in (("kv_device", "device"), ("kv_host", "host"), ("aux_device", "aux_device")):
        values = kv.values[tier][kv_order]
        if not np.isnan(values).all():
            series[name] = _as_of(times, kv_times[kv_order], values)
    allocated = floats(samples, "mem_allocated_bytes")[sample_order]
    if not np.isnan(allocated).all():
        allocated_now = _as_of(times, sample_times[sample_order], allocated)
        accounted = sum(np.nan_to_num(series[name]) for name in ("weights", "kv_device", "aux_device")
                        if name in series)
        series["workspace"] = np.clip(allocated_now - accounted, 0, None)

    peak_parts = (("weights", "kv_device", "aux_device", "workspace") if "workspace" in series
                  else ("kv_device", "kv_host", "aux_device"))  # without allocator figures: all KV
    device_parts = [name for name in peak_parts if name in series]
    total = sum(np.nan_to_num(series[name]) for name in device_parts) if device_parts else np.zeros(times.size)
    peak_at = int(np.argmax(total))
    thinned = np.unique(np.linspace(0, times.size - 1, min(times.size, max_points)).astype(np.int64))
    components = [name for name in MEMORY_COMPONENTS if name in series]
    return {
        "components": components,
        "series": {"t_s": ((times[thinned] - run_start) / NS_PER_S).tolist(),
                   **{name: np.nan_to_num(series[name][thinned]).tolist() for name in components}},
        "peak_bytes": {name: float(np.nanmax(series[name])) for name in components},
        "at_peak": {"t_s": float((times[peak_at] - run_start) / NS_PER_S),
                    **{name: float(np.nan_to_num(series[name][peak_at])) for name in components}},
    }
