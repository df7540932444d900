"""The `kvprof analyze`, `kvprof compare` and `kvprof export` commands.

    kvprof analyze TRACE... [--only NAME] [--warmup-steps N] [--baseline FULL_TRACE]
                            [--json | --csv DIR] [--plots DIR] [--report DIR [--report-format md]]
    kvprof compare TRACE TRACE... [--baseline N|TRACE] [--allow-different-workloads] [same outputs]
    kvprof export TRACE --format perfetto|parquet [-o OUT]

A bad trace (missing, empty, corrupt, not kvprof, newer schema) or a bad request (retention on
a trace without probes, traces of different schema versions) is one line on stderr and exit 2;
a truncated trace is analyzed, with a warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from kvprof.analysis import RunAnalysis, analyze
from kvprof.analysis.common import parse_percentiles, unique_labels
from kvprof.analysis.summary import parse_slo
from kvprof.errors import UsageError
from kvprof.trace import Trace, read_trace


def add_commands(commands: Any) -> None:
    """Add analyze, compare and export to the CLI's subparsers."""
    _add_analyze(commands)
    _add_compare(commands)
    _add_export(commands)


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                        help="leave the run's first N decode steps out of throughput, ITL and KV per token "
                             "(default 0)")
    parser.add_argument("--percentiles", type=parse_percentiles, default="90,99", metavar="Q1,Q2,...",
                        help="latency percentiles to report, besides the median")
    parser.add_argument("--slo", type=parse_slo, default=None, metavar="ttft=MS,tpot=MS,e2e=MS",
                        help="service-level bounds in ms (any of them): report goodput, the requests meeting all")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the results as JSON")
    output.add_argument("--csv", metavar="DIR", help="write each table as a CSV file into DIR")
    parser.add_argument("--plots", metavar="DIR", help="draw the figures (PNG) into DIR")
    parser.add_argument("--report", metavar="DIR", help="write a report page with tables and figures into DIR")
    parser.add_argument("--report-format", choices=("html", "md"), default="html",
                        help="html: one self-contained page (default); md: Markdown beside the PNGs")


def _add_analyze(commands: Any) -> None:
    p = commands.add_parser("analyze", help="summary, breakdown and retention of one or more traces")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="kvprof trace files (.arrow)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this analysis (repeatable): summary, breakdown, retention, or a plugin's")
    p.add_argument("--baseline", metavar="FULL_TRACE",
                   help="a `full` run on the same prompts: retention accuracy is divided by its accuracy")
    _add_outputs(p)
    p.set_defaults(handler=cmd_analyze)


def _add_compare(commands: Any) -> None:
    p = commands.add_parser("compare", help="several runs of one workload side by side, with ratios")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="kvprof trace files, one per strategy")
    p.add_argument("--baseline", default="0", metavar="N|TRACE",
                   help="the run ratios are taken against: its position (0 = first) or its path")
    p.add_argument("--allow-different-workloads", action="store_true",
                   help="compare runs even though their workloads differ")
    _add_outputs(p)
    p.set_defaults(handler=cmd_compare)


def _add_export(commands: Any) -> None:
    p = commands.add_parser("export", help="convert a trace: Perfetto (Chrome trace JSON) or Parquet")
    p.add_argument("trace", metavar="TRACE", help="a kvprof trace file")
    p.add_argument("--format", "-f", choices=("perfetto", "parquet"), default="perfetto",
                   help="perfetto: Chrome trace JSON for ui.perfetto.dev (default); parquet: for archives")
    p.add_argument("--output", "-o", metavar="OUT",
                   help="output path (default: beside the trace, .perfetto.json or .parquet)")
    p.set_defaults(handler=cmd_export)


# --- helpers ------------------------------------------------------------------------------


def registered_analyses() -> dict[str, Any]:
    """Analysis name -> function, from every installed plugin (the built-ins included)."""
    from kvprof.plugins import load_plugins

    return {name: entry.function for name, entry in load_plugins().registry.analyses.items()}


def read_traces(paths: list[str]) -> list[Trace]:
    """Read the traces, printing each one's warnings (truncated, failed run) on stderr."""
    traces = [read_trace(path) for path in paths]
    for trace in traces:
        for warning in trace.warnings:
            print(f"kvprof: warning: {warning}", file=sys.stderr)
    return traces


def jsonable(value: Any) -> Any:
    """NaN and infinities become null, so the output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def run_document(run: RunAnalysis) -> dict[str, Any]:
    return {"trace": str(run.trace.path), "label": run.label, "schema_version": run.trace.schema_version,
            "truncated": run.trace.truncated, "warnings": run.trace.warnings, "skipped": run.skipped,
            "results": run.results}


def _print_runs(runs: list[RunAnalysis]) -> None:
    from rich.console import Console

    from kvprof.analysis.tables import print_tables, tables_for

    console = Console()
    for run in runs:
        console.rule(f"[bold]{run.label}[/]  {run.trace.path}")
        for name, result in run.results.items():
            print_tables(tables_for(name, result), console)
        for name, why in run.skipped.items():
            console.print(f"[dim]{name}: not applicable ({why})[/]")


def _write_csv(runs: list[RunAnalysis], folder: str, comparison: dict[str, Any] | None = None) -> None:
    from kvprof.analysis.tables import comparison_tables, tables_for, write_csv

    paths = []
    if comparison is not None:
        paths += write_csv(comparison_tables(comparison), Path(folder))
    for index, run in enumerate(runs):
        prefix = f"{index}-" if len(runs) > 1 else ""
        tables = [table for name, result in run.results.items() for table in tables_for(name, result)]
        paths += write_csv(tables, Path(folder), prefix, run=run.label)
    print(f"wrote {len(paths)} CSV files to {folder}")


def _extras(args: argparse.Namespace, runs: list[RunAnalysis], comparison: dict[str, Any] | None = None) -> None:
    if args.plots:
        from kvprof.analysis.plots import draw_figures

        paths = draw_figures(runs, args.plots)
        print(f"wrote {len(paths)} figures to {args.plots}", file=sys.stderr if args.json else sys.stdout)
    if args.report:
        from kvprof.analysis.report import write_report

        path = write_report(runs, args.report, comparison, fmt=args.report_format)
        print(f"wrote report {path}", file=sys.stderr if args.json else sys.stdout)


# --- commands -----------------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    traces = read_traces(args.traces)
    if len(traces) > 1:
        from kvprof.analysis.compare import check_same_schema

        check_same_schema(traces)
    baseline = read_traces([args.baseline])[0] if args.baseline else None
    analyses = registered_analyses()
    runs = [analyze(trace, analyses, only=args.only, label=label, warmup_steps=args.warmup_steps,
                    baseline=baseline, percentiles=args.percentiles, slo=args.slo)
            for trace, label in zip(traces, unique_labels(traces))]
    if args.json:
        documents = [run_document(run) for run in runs]
        print(json.dumps(jsonable(documents[0] if len(documents) == 1 else documents), indent=1))
    elif args.csv:
        _write_csv(runs, args.csv)
    else:
        _print_runs(runs)
    _extras(args, runs)
    return 0


def _baseline_index(choice: str, traces: list[Trace]) -> int:
    if choice.isdigit():
        return int(choice)
    for index, trace in enumerate(traces):
        if Path(choice).resolve() == trace.path.resolve():
            return index
    raise UsageError(f"--baseline {choice}: not one of the compared traces (give its position or its path)")


def cmd_compare(args: argparse.Namespace) -> int:
    from kvprof.analysis.compare import check_same_schema, check_same_workload, compare

    if len(args.traces) < 2:
        raise UsageError("compare needs at least two traces")
    traces = read_traces(args.traces)
    check_same_schema(traces)
    if not args.allow_different_workloads:
        check_same_workload(traces)
    baseline = _baseline_index(args.baseline, traces)
    full = next((trace for trace in traces if (trace.run or {}).get("strategy") == "full"), None)
    analyses = registered_analyses()
    runs = [analyze(trace, analyses, label=label, warmup_steps=args.warmup_steps, baseline=full,
                    percentiles=args.percentiles, slo=args.slo)
            for trace, label in zip(traces, unique_labels(traces))]
    comparison = compare(runs, baseline)
    if args.json:
        document = {"comparison": comparison, "runs": [run_document(run) for run in runs]}
        print(json.dumps(jsonable(document), indent=1))
    elif args.csv:
        _write_csv(runs, args.csv, comparison)
    else:
        from rich.console import Console

        from kvprof.analysis.tables import comparison_tables, print_tables

        print_tables(comparison_tables(comparison), Console())
    _extras(args, runs, comparison)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kvprof.analysis.export import write_parquet, write_perfetto

    suffix = ".perfetto.json" if args.format == "perfetto" else ".parquet"
    output = Path(args.output) if args.output else Path(args.trace).with_suffix(suffix)
    if output.exists() and output.resolve() == Path(args.trace).resolve():
        raise UsageError(f"export: the output {output} is the trace itself; give another path with -o")
    trace = read_traces([args.trace])[0]
    path = write_perfetto(trace, output) if args.format == "perfetto" else write_parquet(trace, output)
    hint = "  (open it at https://ui.perfetto.dev)" if args.format == "perfetto" else ""
    print(f"wrote {path}{hint}")
    return 0
