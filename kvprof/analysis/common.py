"""What the analyses share: fast per-kind column access, distributions, run labels.

Traces can hold tens of millions of events, so nothing here loops over events in Python:
the `kind` column is read once as dictionary codes and every selection is a numpy mask plus
an Arrow filter over the columns an analysis asks for (never the whole table).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvprof.errors import NotApplicable as NotApplicable  # its home before kvprof.errors
from kvprof.errors import UsageError
from kvprof.trace import Trace

NS_PER_S = 1e9
NS_PER_MS = 1e6


class Events:
    """A trace's events, selectable by kind without decoding the `kind` column per call.

    Selections that may be most of a trace (evictions) are read batch by batch (`batches`),
    so memory stays at one record batch however long the trace.
    """

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.table = trace.table
        self._names, self._codes = dictionary_codes(self.table["kind"])
        self._kv: KVSeries | None = None

    @classmethod
    def of(cls, trace: Trace) -> Events:
        """The Events of `trace`, built once and kept on the trace for the next analysis."""
        cached = trace.__dict__.get("_kvprof_events")
        if cached is None or cached.table is not trace.table:
            cached = trace.__dict__["_kvprof_events"] = cls(trace)
        return cached

    def __len__(self) -> int:
        return self.table.num_rows

    def mask(self, kind: str) -> np.ndarray:
        """Boolean mask of the events of `kind` (a kvprof.events.Kind value)."""
        if kind not in self._names:
            return np.zeros(len(self._codes), bool)
        return self._codes == self._names.index(kind)

    def count(self, kind: str) -> int:
        return int(self.mask(kind).sum())

    def of_kind(self, kind: str, columns: Iterable[str]) -> pa.Table:
        """The events of `kind`, with only `columns`, in trace (emission) order."""
        return self.table.select(list(columns)).filter(pa.array(self.mask(kind)))

    def batches(self, kind: str | None, columns: Iterable[str]) -> Iterator[pa.RecordBatch]:
        """The events of `kind` (all if None) with `columns`, record batch by record batch
        (empty ones left out), plus a `row` column: each event's index in the trace."""
        wanted = None if kind is None else self.mask(kind)
        end = 0
        for batch in self.table.select(list(columns)).to_batches():
            start, end = end, end + batch.num_rows
            rows = np.arange(start, end)
            if wanted is not None:
                chosen = wanted[start:end]
                batch, rows = batch.filter(pa.array(chosen)), rows[chosen]
            if batch.num_rows:
                yield batch.append_column("row", pa.array(rows))

    @property
    def kv(self) -> KVSeries:
        """KV bytes resident per tier as reported over the run (computed once)."""
        if self._kv is None:
            self._kv = KVSeries.of(self)
        return self._kv


KV_COLUMNS = ("kv_device_bytes", "kv_host_bytes", "aux_device_bytes")


@dataclass
class KVSeries:
    """KV bytes resident per tier ("device", "host", "aux_device"; NaN where not reported) at each
    moment they changed, from every event that reports them (prefill, decode steps, and the
    evict or offload events of strategies that report them), in emission order."""

    end_ns: np.ndarray
    values: dict[str, np.ndarray]

    @classmethod
    def of(cls, events: Events) -> KVSeries:
        times, parts, last = [], [], np.full(3, np.nan)
        for batch in events.batches(None, ["end_ns", *KV_COLUMNS]):
            valid = pc.or_(pc.or_(pc.is_valid(batch[1]), pc.is_valid(batch[2])), pc.is_valid(batch[3]))
            reported = batch.filter(valid)
            if reported.num_rows == 0:
                continue
            values = np.stack([_as_floats(reported[i]) for i in (1, 2, 3)], axis=1)
            comparable = np.nan_to_num(values, nan=-1.0)  # NaN != NaN would count as a change
            changed = (comparable != np.concatenate([[last], comparable[:-1]])).any(axis=1)
            last = comparable[-1]
            times.append(reported[0].to_numpy()[changed])
            parts.append(values[changed])
        values = np.concatenate(parts) if parts else np.empty((0, 3))
        return cls(np.concatenate(times) if times else np.empty(0, np.int64),
                   {"device": values[:, 0], "host": values[:, 1], "aux_device": values[:, 2]})


def dictionary_codes(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """A dictionary-encoded column as (names, codes): codes index names, -1 for nulls."""
    unified = column.unify_dictionaries()
    if unified.num_chunks == 0:
        return [], np.empty(0, np.int32)
    codes = pc.fill_null(pa.chunked_array([chunk.indices for chunk in unified.chunks]), -1)
    return unified.chunk(0).dictionary.to_pylist(), codes.to_numpy()


def take_rows(table: pa.Table, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """`columns` of the rows at sorted indices `rows`, taken batch by batch: a take across a
    table of many chunks would otherwise concatenate whole columns first."""
    selected = table.select(columns)
    batches = selected.to_batches()
    offsets = np.cumsum([0] + [batch.num_rows for batch in batches])
    cuts = np.searchsorted(rows, offsets)
    parts = [batch.take(pa.array(rows[cuts[i]:cuts[i + 1]] - offsets[i]))
             for i, batch in enumerate(batches) if cuts[i + 1] > cuts[i]]
    return pa.Table.from_batches(parts, selected.schema)


def ints(table: pa.Table, column: str, fill: int = 0) -> np.ndarray:
    """An integer column as int64 numpy, nulls replaced by `fill`."""
    values = table[column]
    if values.null_count:
        values = pc.fill_null(values, fill)
    return values.to_numpy().astype(np.int64, copy=False)


def floats(table: pa.Table, column: str) -> np.ndarray:
    """A numeric column as float64 numpy, nulls as NaN."""
    return _as_floats(table[column])


def _as_floats(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    # safe=False: an integer beyond 2**53 (a damaged schema-1.0 trace) rounds instead of raising
    return pc.fill_null(pc.cast(values, pa.float64(), safe=False), np.nan).to_numpy()


def ext_values(table: pa.Table, key: str) -> np.ndarray:
    """One key of the `ext` map column as float64, NaN where absent."""
    if table.num_rows == 0:
        return np.empty(0)
    return floats(pa.table({"v": pc.map_lookup(table["ext"], key, "first")}), "v")


def strings(table: pa.Table, column: str) -> np.ndarray:
    """A (dictionary) string column as a numpy object array, None for nulls."""
    values = table[column]
    if pa.types.is_dictionary(values.type):
        values = values.cast(pa.string())
    return np.asarray(values.to_pylist(), dtype=object)


DEFAULT_PERCENTILES = (90.0, 99.0)


def distribution(values: np.ndarray, scale: float = 1.0,
                 percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict[str, float | int | None]:
    """count, mean, std (population), median, the `percentiles` (keys p90, p99.9, ...), min and
    max of `values / scale`, NaNs dropped."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)] / scale
    keys = [percentile_key(q) for q in percentiles]
    if values.size == 0:
        return {"count": 0, "mean": None, "std": None, "median": None, **dict.fromkeys(keys),
                "min": None, "max": None}
    quantiles = np.percentile(values, [50.0, *percentiles])
    return {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "median": float(quantiles[0]), **{key: float(q) for key, q in zip(keys, quantiles[1:])},
            "min": float(values.min()), "max": float(values.max())}


def percentile_key(q: float) -> str:
    """The key of percentile `q` in a distribution: 90 -> "p90", 99.9 -> "p99.9"."""
    return f"p{q:g}"


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`--percentiles 50,90,99.9` -> (50.0, 90.0, 99.9); each in (0, 100]."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--percentiles {text!r}: expected numbers, e.g. 50,90,99") from None
    if not values or any(not 0 < q <= 100 for q in values):
        raise UsageError(f"--percentiles {text!r}: each must be in (0, 100]")
    return values


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference; None where either is missing or the reference is 0."""
    return value / reference if value is not None and reference else None


def nested_number(results: dict[str, Any], *keys: str) -> float | None:
    """The number at results[keys[0]][keys[1]]..., None where a key is missing or the value is
    not a number (analysis results read by comparisons and plots)."""
    value: Any = results
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def maybe(value: float | np.floating | None) -> float | None:
    """A float for JSON, None for NaN or missing."""
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def run_bounds(events: Events) -> tuple[int, int]:
    """Run start and end (ns): run_start and run_end, else the first and last event."""
    start = events.of_kind("run_start", ["start_ns"])
    end = events.of_kind("run_end", ["end_ns"])
    first = int(ints(start, "start_ns")[0]) if start.num_rows else int(ints(events.table, "start_ns").min())
    last = int(ints(end, "end_ns")[-1]) if end.num_rows else int(ints(events.table, "end_ns").max())
    return first, last


def require_events(trace: Trace) -> None:
    """Refuse a trace with no events at all (one clear line)."""
    if trace.table.num_rows == 0:
        raise UsageError(f"{trace.path}: the trace holds no events (the run wrote its header only)")


def _shown(value: Any) -> bool:
    return value not in (None, "", False)


def run_label(trace: Trace) -> str:
    """A run's name: its --label, else its plugin and the options it was given, e.g.
    `h2o heavy_ratio=0.1 recent_ratio=0.1`."""
    run = trace.run or {}
    if run.get("label"):
        return run["label"]
    options = run.get("options") or {}
    shown = " ".join(f"{key}={value}" for key, value in sorted(options.items()) if _shown(value))
    return f"{run.get('strategy') or trace.path.stem} {shown}".strip()


def strategy_labels(traces: list[Trace]) -> list[str]:
    """Short names for runs shown together: a run's --label, else the plugin and the options
    whose values differ among the runs of that plugin (`h2o heavy_ratio=0.05` next to
    `h2o heavy_ratio=0.1`)."""
    runs = [trace.run or {} for trace in traces]
    labels = []
    for run, trace in zip(runs, traces):
        if run.get("label"):  # --label: the user named the run
            labels.append(run["label"])
            continue
        plugin = run.get("strategy") or trace.path.stem
        peers = [other.get("options") or {} for other in runs if other.get("strategy") == run.get("strategy")]
        options = run.get("options") or {}
        varying = sorted(key for key in options if len({repr(peer.get(key)) for peer in peers}) > 1)
        labels.append(" ".join([plugin, *(f"{key}={options[key]}" for key in varying if _shown(options[key]))]))
    return labels


def unique_labels(traces: list[Trace]) -> list[str]:
    """Strategy labels, with the file name added where two runs would read the same."""
    labels = strategy_labels(traces)
    return [f"{label} [{trace.path.stem}]" if labels.count(label) > 1 else label
            for label, trace in zip(labels, traces)]


def workload_param(trace: Trace, name: str, default: Any = None) -> Any:
    """A workload parameter of the run (prompt_len, batch_size, output_len, ...)."""
    return ((trace.run or {}).get("workload") or {}).get("params", {}).get(name, default)
