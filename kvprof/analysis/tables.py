"""Tables of analysis results, and their renderings: rich (terminal), CSV, Markdown, HTML.

Analyses return JSON-ready dicts (that is what `--json` prints). The builders here turn them
into `Table`s whose cells keep raw values; a cell with a unit is a `Q(value, unit)`, which
the terminal and report renderings format for reading (MiB, GB/s, %, x) and CSV writes raw.
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Q:
    """A quantity: a raw value and its unit (ms, s, bytes, bytes/s, tokens/s, tokens/GB, share, ratio)."""

    value: float | int | None
    unit: str


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def format_cell(cell: Any) -> str:
    """A cell as a person reads it."""
    if isinstance(cell, Q):
        return format_quantity(cell.value, cell.unit)
    if cell is None:
        return "-"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, float):
        return format_number(cell)
    if isinstance(cell, int):
        return f"{cell:,}"
    return str(cell)


def format_number(value: float) -> str:
    """Four significant digits or so, without scientific notation."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def format_quantity(value: float | int | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:,.2f} {name}"
        return f"{value:,.0f} B"
    if unit == "bytes/s":
        return f"{value / 1e9:,.2f} GB/s"
    if unit == "share":
        return f"{100 * value:.1f}%" if abs(value) >= 0.01 or value == 0 else f"{100 * value:.2g}%"
    if unit == "ratio":
        return f"{value:.2f}x"
    if unit == "s" and 0 < abs(value) < 1:
        return format_quantity(value * 1e3, "ms")
    if unit == "ms" and abs(value) >= 1000:
        return format_quantity(value / 1e3, "s")
    if unit == "tokens":
        return f"{value:,.0f}"
    if unit in ("ms", "s"):
        return f"{value:,.3f} {unit}" if abs(value) < 10 else f"{value:,.1f} {unit}"
    if unit in ("tokens/s", "tokens/GB"):
        return f"{value:,.1f} {unit}" if abs(value) < 100 else f"{value:,.0f} {unit}"
    return f"{value:,.4g} {unit}".strip()


def raw_cell(cell: Any) -> Any:
    return cell.value if isinstance(cell, Q) else cell


# --- builders -----------------------------------------------------------------------------


def summary_tables(result: dict[str, Any]) -> list[Table]:
    keys = [key for key in next(iter(result["latency_ms"].values())) if key != "count"]
    latency = Table(
        "Latency (ms)", ["metric", "count", *keys],
        [[name.upper(), dist["count"], *(dist.get(k) for k in keys)] for name, dist in result["latency_ms"].items()],
        notes=[result["formulas"][name] for name in result["latency_ms"] if name in result["formulas"]],
    )
    rows: list[list[Any]] = []
    requests = result["requests"]
    rows.append(["requests finished", requests["finished"]])
    if requests["planned"] is not None:
        rows.append(["requests planned", requests["planned"]])
        rows.append(["requests failed (planned, not finished)", requests.get("failed")])
    if requests.get("unfinished_with_first_token"):
        rows.append(["requests never finished, with a first token (in TTFT)", requests["unfinished_with_first_token"]])
    goodput = result.get("goodput")
    if goodput:
        bounds = ", ".join(f"{name.upper()} <= {bound:g} ms" for name, bound in goodput["slo_ms"].items())
        rows.append([f"requests meeting the SLO ({bounds})", goodput["good_requests"]])
        rows.append(["share meeting the SLO", Q(goodput["share"], "share")])
        rows.append(["goodput (requests/s)", goodput["requests_per_s"]])
    rows.append(["prompt tokens", requests["prompt_tokens"]])
    rows.append(["output tokens", requests["output_tokens"]])
    rows.append(["decode throughput", Q(result["throughput_tokens_per_s"]["decode"], "tokens/s")])
    rows.append(["total throughput", Q(result["throughput_tokens_per_s"]["total"], "tokens/s")])
    decode = result["decode"]
    rows.append(["decode steps", decode["steps"]])
    rows.append(["decode steps counted (after warm-up)", decode["steps_counted"]])
    rows.append(["decode time", Q(decode["seconds"], "s")])
    for name, value in result["memory_peak_bytes"].items():
        if value is not None:
            rows.append([f"peak {name.replace('_', ' ')}", Q(value, "bytes")])
    for tier, values in result["kv_bytes"].items():
        if values["peak"] is not None:
            rows.append([f"KV {tier.replace('_', ' ')}, peak", Q(values["peak"], "bytes")])
            rows.append([f"KV {tier.replace('_', ' ')}, final", Q(values["final"], "bytes")])
    per_token = result["kv_per_token"]
    rows.append(["KV bytes per token", Q(per_token["kv_bytes_per_token"], "bytes")])
    rows.append(["memory efficiency (device KV)", Q(per_token["memory_efficiency_tokens_per_gb"], "tokens/GB")])
    rows.append(["memory efficiency (total KV)", Q(per_token["memory_efficiency_total_tokens_per_gb"], "tokens/GB")])
    evictions = result["evictions"]
    if evictions["events"]:
        rows.append(["evict events", evictions["events"]])
        rows.append(["evicted tokens", evictions["tokens"]])
        rows.append(["evicted bytes", Q(evictions["bytes"], "bytes")])
        for reason, values in evictions["by_reason"].items():
            rows.append([f"evicted tokens, reason {reason}", values["tokens"]])
    for direction, values in result["transfers"].items():
        rows.append([f"{direction} copies", values["events"]])
        rows.append([f"{direction} volume", Q(values["bytes"], "bytes")])
        rows.append([f"{direction} bandwidth", Q(values["bandwidth_bytes_per_s"], "bytes/s")])
    run = result["run"]
    rows.append(["run duration", Q(run["duration_s"], "s")])
    if run["profiler_cost_s"] is not None:
        rows.append(["profiler cost", Q(run["profiler_cost_s"], "s")])
        rows.append(["profiler cost, share of the run", Q(run["profiler_cost_share"], "share")])
    formulas = result["formulas"]
    notes = [formulas[k] for k in ("decode_throughput", "total_throughput", "kv_bytes_per_token",
                                   "memory_efficiency", "bandwidth", "warmup")]
    return [latency, Table("Summary", ["metric", "value"], rows, notes)]


def breakdown_tables(result: dict[str, Any]) -> list[Table]:
    time = result["time"]
    beside = time.get("overlapped", {"seconds": {}})
    notes = [f"run wall time {time['wall_seconds']:.3f} s; phases absent from a run are not listed"]
    if beside["seconds"]:
        notes.append("'beside': work on another stream, overlapped with the rows above (not in their 100 %); "
                     "what it cost the steps shows as their stalls")
    tables = [Table(
        "Time breakdown", ["phase", "time", "share"],
        [[time["labels"][name], Q(seconds, "s"), Q(time["share"][name], "share")]
         for name, seconds in time["seconds"].items()]
        + [[f"{beside['labels'][name]} (beside)", Q(seconds, "s"), Q(beside["share"][name], "share")]
           for name, seconds in beside["seconds"].items()],
        notes=notes,
    )]
    memory = result["memory"]
    if memory["components"]:
        tables.append(Table(
            "Memory by component", ["component", "at peak", "peak"],
            [[name, Q(memory["at_peak"][name], "bytes"), Q(memory["peak_bytes"][name], "bytes")]
             for name in memory["components"]],
            notes=[f"'at peak' is the split at t = {memory['at_peak']['t_s']:.3f} s, "
                   "when the device total was largest"],
        ))
    return tables


def retention_tables(result: dict[str, Any]) -> list[Table]:
    accuracy = Table(
        "Retention accuracy",
        ["probe", "context", "depth", "budget", "correct", "accuracy", "full acc.", "ratio"],
        [[row["kind"], row["context_tokens"], row["depth"], row["budget"], f"{row['correct']}/{row['requests']}",
          Q(row["accuracy"], "share"), Q(row["baseline_accuracy"], "share"), Q(row["ratio"], "ratio")]
         for row in result["accuracy"]],
        notes=[f"baseline: {result['baseline'] or 'none given (--baseline FULL_TRACE)'}; "
               f"budget: fraction of the prompt's KV the strategy keeps"],
    )
    survival = result["survival"]
    survival_table = Table(
        "Token survival at question time",
        ["request", "span", "asked", "tokens", "mean", "min", "worst layer"],
        [[s["request_id"], s["span"], s["asked"], s["tokens"], Q(s["mean"], "share"), Q(s["min"], "share"),
          _worst_layer(s["per_layer"])] for s in survival["spans"]],
        notes=[f"share of each fact span's tokens still cached {survival['moment']}, over "
               f"{survival['layers']} layers x {survival['kv_heads']} KV heads; worst layer: lowest mean over "
               "heads; per layer and head in --json"],
    )
    return [accuracy, survival_table]


def _worst_layer(per_layer: list[float]) -> int | None:
    """The layer that kept the least of a span, or None when every layer kept all of it."""
    worst = min(range(len(per_layer)), key=per_layer.__getitem__, default=None)
    return None if worst is None or per_layer[worst] >= 1.0 else worst


def comparison_tables(result: dict[str, Any]) -> list[Table]:
    """The values side by side, then each run's ratios to the baseline run."""
    labels, rows = result["labels"], result["rows"]
    better = {True: "higher is better", False: "lower is better", None: ""}
    return [
        Table("Comparison", ["metric", *labels],
              [[row["label"], *(Q(v, row["unit"]) for v in row["values"])] for row in rows],
              notes=["runs: " + "; ".join(f"{label} = {path}" for label, path in zip(labels, result["traces"]))]),
        Table(f"Ratio to {result['baseline']}", ["metric", *labels, "better"],
              [[row["label"], *(Q(r, "ratio") for r in row["ratios"]), better[row["higher_is_better"]]]
               for row in rows]),
    ]


def generic_table(name: str, result: Any) -> Table:
    """A key/value table for an analysis kvprof does not know (a plugin's)."""
    rows = [[key, value if not isinstance(value, (list, dict)) else f"({len(value)} items, see --json)"]
            for key, value in _flatten(result)]
    return Table(name, ["key", "value"], rows)


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value and all(not isinstance(v, list) for v in value.values()):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix or "value", value


def tables_for(name: str, result: dict[str, Any]) -> list[Table]:
    builders = {"summary": summary_tables, "breakdown": breakdown_tables, "retention": retention_tables}
    return builders[name](result) if name in builders else [generic_table(name, result)]


# --- renderings ---------------------------------------------------------------------------


def print_tables(tables: list[Table], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console()
    for table in tables:
        rich_table = RichTable(title=table.title, title_justify="left")
        for index, column in enumerate(table.columns):
            rich_table.add_column(column, justify="left" if index == 0 else "right")
        for row in table.rows:
            rich_table.add_row(*(format_cell(cell) for cell in row))
        console.print(rich_table)
        for note in table.notes:
            console.print(f"  {note}", style="dim", highlight=False, markup=False)


def to_csv(table: Table, run: str | None = None) -> str:
    """Raw values, no unit formatting. A column whose quantities share one unit names it in
    its header; a column of mixed units (a summary's values) gets a `unit` column beside it.
    With `run` (the run's label), a first `run` column says which run every row is from."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    units = [{row[i].unit for row in table.rows if isinstance(row[i], Q)} for i in range(len(table.columns))]
    mixed = [i for i, found in enumerate(units) if len(found) > 1]
    header = [f"{name} ({next(iter(found))})" if len(found) == 1 and next(iter(found)) != name else name
              for name, found in zip(table.columns, units)]
    first = ["run"] if run is not None else []
    writer.writerow(first + header + ["unit"] * len(mixed[:1]))
    for row in table.rows:
        unit = [row[mixed[0]].unit if isinstance(row[mixed[0]], Q) else ""] if mixed else []
        writer.writerow([run] * len(first) + [raw_cell(cell) for cell in row] + unit)
    return buffer.getvalue()


def write_csv(tables: list[Table], folder: Path, prefix: str = "", run: str | None = None) -> list[Path]:
    """One CSV per table; `run` (a run's label) fills a first column of each row."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in tables:
        path = folder / f"{prefix}{table.slug}.csv"
        path.write_text(to_csv(table, run))
        paths.append(path)
    return paths


def to_markdown(table: Table, title: bool = True) -> str:
    """The table in Markdown; `title=False` leaves out its heading (a section says it already)."""
    lines = ([f"### {table.title}", ""] if title else []) + ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(format_cell(cell).replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    lines += [""] + [f"*{note}*  " for note in table.notes]
    return "\n".join(lines) + "\n"


def to_html(table: Table, title: bool = True) -> str:
    """The table in HTML; `title=False` leaves out its heading (a section says it already)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(cell))}</td>" for cell in row) + "</tr>"
                   for row in table.rows)
    notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in table.notes)
    return ((f"<h3>{html.escape(table.title)}</h3>" if title else "") +
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}")


__all__ = ["Q", "Table", "tables_for", "comparison_tables", "print_tables", "to_csv",
           "to_markdown", "to_html", "write_csv"]
