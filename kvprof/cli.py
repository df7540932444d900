"""The `kvprof` command: trace | sweep | analyze | compare | export | plugins | models | validate.

A user's mistake is one line on stderr and exit status 2, never a traceback. A plugin that
crashes is reported with its name, an OS error (disk full) in one line, both exit 1; the trace
written so far stays readable, under the name it has on disk. SIGTERM stops a run as SIGINT
does (exit 143, 130 for SIGINT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kvprof import __version__
from kvprof.analysis.common import parse_percentiles
from kvprof.analysis.results import result_path
from kvprof.analysis.summary import parse_slo
from kvprof.errors import SinkError, TraceWriteError, UsageError
from kvprof.models import EMBEDDED, WEIGHTS
from kvprof.plugins import load_plugins
from kvprof.session import TraceSettings, run_trace
from kvprof.strategy import Strategy
from kvprof.trace.writer import partial_path
from kvprof.workloads import QUESTION_MODES, WORKLOADS, WorkloadParams, WorkloadSpec

DETAILS = ("step", "layer", "head")
WORKLOAD_HELP = ("synthetic: random tokens of the exact prompt length; passkey: a number hidden at --depth; "
                 "facts: --num-facts facts at the start, then a question (retention)")
QUESTION_HELP = ("passkey/facts: in_prompt ends the prompt with the question; after feeds it as a follow-up turn "
                 "through the same cache, once the strategy has managed the context")
DTYPE_HELP = "model dtype: bfloat16, float16 or float32; auto: bfloat16 on CUDA, float32 on CPU"


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, schedulers), raised where SIGINT raises KeyboardInterrupt, so both stop
    a run the same way: the strategy unwinds and the trace gets its run_end."""


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated()


def interrupt_status(stop: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the command, and its exit status (128 + the signal's number)."""
    if isinstance(stop, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted (SIGINT)", 128 + signal.SIGINT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"kvprof: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        message, status = interrupt_status(stop)
        print(f"kvprof: {message}", file=sys.stderr)
        return status
    except OSError as exc:  # disk full, file vanished: the OS's reason, in one line
        if os.environ.get("KVPROF_DEBUG"):
            raise
        print(f"kvprof: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default, unless there is none to show or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvprof", description="Profile LLM KV-cache management strategies.",
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"kvprof {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_trace(commands)
    _add_plugins(commands)
    _add_models(commands)
    _add_validate(commands)
    _add_sweep(commands)
    _add_new_plugin(commands)
    from kvprof.analysis.commands import add_commands  # analyze, compare, export

    add_commands(commands)
    for subparser in commands.choices.values():
        subparser.formatter_class = DefaultsFormatter
    return parser


# --- trace --------------------------------------------------------------------------------


def _add_trace(commands: Any) -> None:
    p = commands.add_parser("trace", help="run a strategy and write an Arrow trace")
    p.add_argument("--plugin", "-p", required=True, help="strategy to run (see `kvprof plugins`)")
    p.add_argument("--model", "-m", default=EMBEDDED, help="alias, local folder or Hugging Face id")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="random: build the architecture with random weights (timing and memory only)")
    p.add_argument("--workload", "-w", default="synthetic", choices=WORKLOADS, help=WORKLOAD_HELP)
    defaults = WorkloadParams()
    p.add_argument("--prompt-len", type=int, default=defaults.prompt_len, help="prompt (context) length in tokens")
    p.add_argument("--output-len", type=int, default=defaults.output_len, help="tokens to generate per request")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="requests run together")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests; more than the batch size run as successive batches (default: the batch size)")
    p.add_argument("--depth", type=float, default=defaults.depth, help="passkey depth in [0, 1]")
    p.add_argument("--num-facts", type=int, default=defaults.num_facts, help="facts workload: facts in the context")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests/s (serving engines)")
    p.add_argument("--question", choices=QUESTION_MODES, default=defaults.question, help=QUESTION_HELP)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="strategy option (repeatable)")
    p.add_argument("--output", "-o", default=None, help="trace path (default traces/<time>-<plugin>-<model>.arrow)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing trace at --output (only once the new run finishes)")
    p.add_argument("--detail", choices=DETAILS, default="layer", help="granularity of evict/offload events")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and of random weights")
    _add_display(p)
    _add_result_options(p)
    p.add_argument("--warmup-runs", type=int, default=None,
                   help="untraced runs of the first batch before the traced run (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--flush-s", type=float, default=1.0,
                   help="write a record batch at least this often (a killed run loses at most this much)")
    p.add_argument("--no-sinks", action="store_true", help="attach no sinks (overhead baselines); writes no trace")
    p.set_defaults(handler=cmd_trace)


def _add_display(p: argparse.ArgumentParser) -> None:
    display = p.add_mutually_exclusive_group()
    display.add_argument("--quiet", "-q", action="store_true",
                        help="no live display (it is on by default when stderr is a terminal)")
    display.add_argument("--progress", action="store_true", help="live display even when stderr is not a terminal")


def _add_result_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", help="the run's name in results, tables and figures (default: strategy and options)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="a note kept in the trace and the result file, e.g. --metadata gpu_clock=locked (repeatable)")
    p.add_argument("--percentiles", type=parse_percentiles, default="90,99", metavar="Q1,Q2,...",
                   help="latency percentiles in the result file, besides the median")
    p.add_argument("--slo", type=parse_slo, default=None, metavar="ttft=MS,tpot=MS,e2e=MS",
                   help="service-level bounds in ms (any of them): the result file counts the requests meeting all "
                        "(goodput)")
    result = p.add_mutually_exclusive_group()
    result.add_argument("--result", metavar="PATH",
                        help="result file (JSON: summary, per-request records, environment) (default: the trace's "
                             "path with .json)")
    result.add_argument("--no-result", action="store_true", help="write no result file")


def live_display_wanted(args: argparse.Namespace) -> bool:
    """On a terminal unless --quiet; elsewhere (pipes, CI logs) only with --progress."""
    return args.progress or (not args.quiet and sys.stderr.isatty())


@contextlib.contextmanager
def live_display(args: argparse.Namespace) -> Iterator[Any]:
    """The live display for the command, or None when it is not wanted."""
    if not live_display_wanted(args):
        yield None
        return
    from kvprof.display import LiveDisplay

    with LiveDisplay() as display:
        yield display


def parse_key_values(pairs: list[str], flag: str = "--opt") -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {pair!r}: expected KEY=VALUE")
        result[key.strip()] = value.strip()
    return result


def default_trace_path(plugin: str, model: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe_model = model.replace("/", "_").replace(os.sep, "_")
    return Path("traces") / f"{stamp}-{plugin}-{safe_model}.arrow"


def kept_events(trace_path: Path | None) -> str:
    """Where a run that did not finish left its events, said truthfully."""
    if trace_path is None:
        return ""
    kept = partial_path(trace_path)
    return f" (the events so far are in {kept})" if kept.exists() else " (no trace was written)"


def cmd_trace(args: argparse.Namespace) -> int:
    params = WorkloadParams(
        prompt_len=args.prompt_len, output_len=args.output_len, batch_size=args.batch_size,
        num_prompts=args.batch_size if args.num_prompts is None else args.num_prompts, depth=args.depth,
        num_facts=args.num_facts, rate=args.rate, seed=args.seed, question=args.question,
    )
    trace_path = None if args.no_sinks else Path(args.output or default_trace_path(args.plugin, args.model))
    result_file = None if args.no_result or trace_path is None else Path(args.result or result_path(trace_path))
    settings = TraceSettings(
        strategy=args.plugin, model=args.model, weights=args.weights, workload=WorkloadSpec(args.workload, params),
        options=parse_key_values(args.opt), device=args.device, dtype=args.dtype, detail=args.detail,
        seed=args.seed, trace_path=trace_path, overwrite=args.force, sinks_enabled=not args.no_sinks,
        flush_s=args.flush_s, warmup_runs=args.warmup_runs,
        label=args.label, metadata=parse_key_values(args.metadata, "--metadata"),
    )
    try:
        with live_display(args) as display:
            settings.display = display
            outcome = run_trace(settings)
    except KeyboardInterrupt as stop:
        message, status = interrupt_status(stop)
        print(f"kvprof: {message}{kept_events(trace_path)}", file=sys.stderr)
        return status
    error = outcome.error
    cause = error.__cause__ if isinstance(error, SinkError) else error
    written = None
    if result_file is not None and trace_path is not None and not isinstance(cause, OSError):  # the OS cut: no result
        # A run that did not finish left its trace, and gets its result file, under the partial name.
        source = trace_path if error is None else partial_path(trace_path)
        target = result_file if error is None or args.result else result_path(source)
        written = write_result_file(source, target, args, error) if source.exists() else None
    if error is not None:
        where = kept_events(trace_path)
        if isinstance(cause, OSError):  # disk full and the like: the OS's reason, not a plugin's bug
            print(f"kvprof: error: {cause}{'' if isinstance(cause, TraceWriteError) else where}", file=sys.stderr)
            return 1
        if isinstance(error, UsageError):
            raise UsageError(f"{error}{where}") from None
        culprit = f"plugin {error.plugin!r}" if isinstance(error, SinkError) else \
            f"plugin {outcome.plugin!r} (strategy {args.plugin})"
        print(f"kvprof: {culprit} failed: {type(error).__name__}: {error}{where}", file=sys.stderr)
        if os.environ.get("KVPROF_DEBUG"):
            raise error
        return 1
    if trace_path:
        print(f"trace: {trace_path}  ({outcome.profiler.events_emitted} events, "
              f"profiler cost {outcome.profiler.hook_ns / 1e6:.1f} ms)")
    if written:
        print(f"result: {written}")
    return 0


def write_result_file(trace_path: Path, path: Path, args: argparse.Namespace,
                      error: BaseException | None) -> Path | None:
    """The run's JSON result file (also for a failed run: it records the failure); a trace too
    broken to read gets a warning instead."""
    from kvprof.analysis.results import write_result
    from kvprof.trace import read_trace

    try:
        write_result(read_trace(trace_path), path, percentiles=args.percentiles, slo=args.slo, error=error)
    except (UsageError, OSError) as exc:
        print(f"kvprof: warning: no result file: {exc}", file=sys.stderr)
        return None
    return path


# --- sweep --------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def _question_list(text: str) -> list[str]:
    modes = [value.strip() for value in text.split(",")]
    unknown = [mode for mode in modes if mode not in QUESTION_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: choose from {', '.join(QUESTION_MODES)}")
    return modes


def _add_sweep(commands: Any) -> None:
    p = commands.add_parser("sweep", help="run a grid of traces and draw the study's figures")
    p.add_argument("--plugin", "-p", action="append", required=True, help="strategy (repeatable)")
    p.add_argument("--skip-plugin", action="append", default=[], metavar="STRATEGY",
                   help="leave out a strategy that an earlier --plugin named (a grid's, on a machine without it)")
    p.add_argument("--model", "-m", default=EMBEDDED, help="alias, local folder or Hugging Face id")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="random: build the architecture with random weights (timing and memory only)")
    p.add_argument("--workload", "-w", default="synthetic", choices=WORKLOADS, help=WORKLOAD_HELP)
    defaults = WorkloadParams()
    p.add_argument("--prompt-len", type=_int_list, default=str(defaults.prompt_len),
                   help="prompt lengths in tokens, comma-separated")
    p.add_argument("--batch-size", type=_int_list, default=str(defaults.batch_size),
                   help="batch sizes, comma-separated (each point runs one batch)")
    p.add_argument("--output-len", type=_int_list, default=str(defaults.output_len),
                   help="output lengths in tokens, comma-separated")
    p.add_argument("--rate", type=_float_list, default=None, help="request rates (requests/s), comma-separated")
    p.add_argument("--num-prompts", type=_int_list, default=None,
                   help="prompts per point, comma-separated (default: one batch; passkey/facts: "
                        "20, at least one batch)")
    p.add_argument("--depth", type=_float_list, default=str(defaults.depth),
                   help="passkey depths in [0, 1], comma-separated")
    p.add_argument("--num-facts", type=_int_list, default=str(defaults.num_facts),
                   help="facts workload: facts in the context, comma-separated")
    p.add_argument("--question", type=_question_list, default=defaults.question,
                   help=f"probe question modes, comma-separated ({QUESTION_HELP})")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed strategy option, for the plugins that take it (repeatable)")
    p.add_argument("--opt-grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="swept strategy option, for the plugins that take it (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="runs per point (figures take their median)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and of random weights")
    p.add_argument("--output", "-o", required=True, help="folder for the traces and figures/")
    p.add_argument("--no-plots", action="store_true", help="run the points, draw no figures")
    p.add_argument("--dry-run", action="store_true", help="list the points and which are already traced; run nothing")
    _add_display(p)
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from kvprof import sweep

    axes: dict[str, list[Any]] = {"prompt_len": args.prompt_len, "batch_size": args.batch_size,
                                  "output_len": args.output_len, "depth": args.depth,
                                  "num_facts": args.num_facts, "question": args.question}
    if args.rate:
        axes["rate"] = args.rate
    if args.num_prompts:
        axes["num_prompts"] = args.num_prompts
    base = WorkloadParams(seed=args.seed)
    # A fixed option is a grid axis of one value: it too applies only to plugins that take it.
    option_grid = {key: [value] for key, value in parse_key_values(args.opt).items()}
    option_grid.update(sweep.parse_grid(args.opt_grid))
    strategies = [name for name in args.plugin if name not in args.skip_plugin]
    if not strategies:
        raise UsageError("--skip-plugin left no strategy to sweep")
    points = sweep.plan(strategies, base, axes, option_grid, args.workload)
    for point in points:
        WorkloadSpec(args.workload, point.params).validate()
    settings = TraceSettings(strategy=strategies[0], model=args.model, weights=args.weights, device=args.device,
                             dtype=args.dtype, seed=args.seed)
    folder = Path(args.output)
    if args.dry_run:
        print_plan(points, folder, args.repeats)
        return 0
    with live_display(args) as display:
        settings.display = display
        outcome = sweep.run_sweep(points, folder, args.workload, settings, args.repeats)
    for path, why in outcome.unfinished:
        print(f"kvprof: warning: sweep point {path.name} did not finish: {why}", file=sys.stderr)
    if not args.no_plots and outcome.traces:
        figures = sweep.draw(outcome.traces, folder / "figures")
        left_out = f" ({len(outcome.unfinished)} unfinished points left out)" if outcome.unfinished else ""
        print(f"sweep: {len(outcome.traces)} traces, {len(figures)} figures in {folder / 'figures'}{left_out}")
    return 1 if outcome.unfinished else 0


def print_plan(points: list[Any], folder: Path, repeats: int) -> None:
    """`kvprof sweep --dry-run`: every run the sweep would make, and which are traced already."""
    from kvprof import sweep

    runs = sweep.planned_runs(points, folder, repeats)
    todo = 0
    for point, path in runs:
        done = sweep.unfinished_reason(path) is None
        todo += not done
        options = " ".join(f"{key}={value}" for key, value in point.options)
        params = point.params
        rate = f" rate={params.rate:g}" if params.rate is not None else ""
        print(f"{'exists ' if done else 'to run '} {point.strategy} {options + ' ' if options else ''}"
              f"prompt={params.prompt_len} batch={params.batch_size} output={params.output_len}{rate} "
              f"prompts={params.num_prompts}  {path}")
    print(f"sweep --dry-run: {len(runs)} runs ({len(points)} points x {repeats} repeats), "
          f"{todo} to run, {len(runs) - todo} traced already in {folder}")


# --- plugins ------------------------------------------------------------------------------


def _add_plugins(commands: Any) -> None:
    p = commands.add_parser("plugins", help="list installed plugins, their strategies and the strategies' options")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=cmd_plugins)


def describe_plugins() -> list[dict[str, Any]]:
    plugins = load_plugins()
    pm, registry = plugins.manager, plugins.registry
    rows: list[dict[str, Any]] = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        distribution, version = plugins.versions.get(name, (name, "?"))
        strategies = sorted(s for s, p in registry.strategy_plugins.items() if p == name)
        rows.append({
            "name": name, "distribution": distribution, "version": version,
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
            "strategies": strategies,
            "strategy_details": [describe_strategy(registry.strategies[s]) for s in strategies],
        })
    for failure in plugins.failures:
        rows.append({"name": failure.name, "distribution": failure.distribution, "error": failure.error})
    return rows


def describe_strategy(strategy: type[Strategy]) -> dict[str, Any]:
    """A strategy's name, description and options (name, type, default, help)."""
    return {"name": strategy.name, "description": strategy.description,
            "options": [{"name": option.name, "type": (option.kind or type(option.default)).__name__,
                         "default": option.default, "help": option.help} for option in strategy.options]}


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = describe_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvprof plugins")
    for column in ("plugin", "version", "strategies", "hooks (kvprof_*)"):
        table.add_column(column)
    loaded = [row for row in rows if "error" not in row]
    for row in loaded:
        table.add_row(row["name"], f"{row['distribution']} {row['version']}", ", ".join(row["strategies"]),
                      ", ".join(hook.removeprefix("kvprof_") for hook in row["hooks"]))
    console = Console()
    console.print(table)
    for row in rows[len(loaded):]:  # failures come last; one line each, the error in full
        source = f" ({row['distribution']})" if row["distribution"] else ""
        console.print(f"[red]failed[/] {row['name']}{source}: {row['error']}", highlight=False)
    for row in loaded:
        for strategy in row["strategy_details"]:
            console.print(_options_table(strategy, row["name"]))
    console.print("Set an option with `kvprof trace --plugin STRATEGY --opt NAME=VALUE`.", style="dim")
    return 0


def _options_table(strategy: dict[str, Any], plugin: str) -> Any:
    from rich.table import Table

    table = Table(title=f"strategy {strategy['name']} ({plugin}): {strategy['description']}",
                  title_justify="left", expand=False)
    for column in ("option", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for option in strategy["options"]:
        table.add_row(option["name"], option["type"], repr(option["default"]), option["help"])
    if not strategy["options"]:
        table.add_row("-", "", "", "no options")
    return table


# --- models -------------------------------------------------------------------------------


def _add_models(commands: Any) -> None:
    p = commands.add_parser("models", help="list model aliases, the embedded model and models in the local cache")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from kvprof.models import describe_models

    rows = describe_models(load_plugins().registry.models)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvprof models (--model NAME)")
    for column in ("name", "source", "architecture", "layers", "heads / KV heads", "context", "local weights"):
        table.add_column(column, overflow="fold")
    for row in rows:
        heads = f"{row['attention_heads']} / {row['kv_heads']}" if row["attention_heads"] else "-"
        table.add_row(row["name"], row["source"], row["architecture"] or "-", str(row["layers"] or "-"), heads,
                      str(row["max_context"] or "-"), row["local_weights"])
    console = Console()
    console.print(table)
    console.print("Any local checkpoint folder works too (--model PATH); without local weights an alias runs "
                  "with --weights random (timings and memory faithful, accuracy not).", style="dim")
    return 0


# --- validate -----------------------------------------------------------------------------


def _add_validate(commands: Any) -> None:
    p = commands.add_parser("validate", help="check traces against the published schema")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="kvprof trace files")
    p.set_defaults(handler=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from kvprof.trace.validate import validate_trace

    worst = 0
    for path in args.traces:
        problems, warnings = validate_trace(path)
        for warning in warnings:
            print(f"warning: {warning}")
        for problem in problems:
            print(f"{path}: {problem}")
        print(f"{path}: {'INVALID' if problems else 'valid'}")
        worst = max(worst, 1 if problems else 0)
    return worst


def _add_new_plugin(commands: Any) -> None:
    p = commands.add_parser("new-plugin", help="start a strategy plugin project: the example plugin, renamed")
    p.add_argument("name", metavar="NAME", help="the strategy's name (lower case, digits, _): "
                   "kvprof trace --plugin NAME; the package becomes kvprof_NAME")
    p.add_argument("--dir", default=".", help="where to create the project folder kvprof-NAME")
    p.set_defaults(handler=cmd_new_plugin)


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from kvprof.scaffold import new_plugin

    target = new_plugin(args.name, Path(args.dir))
    steps = [(f"pip install -e {target}", f"registers the entry point: kvprof plugins lists {args.name}"),
             (f"pytest {target / 'tests'}", "the conformance kit runs it")]
    width = max(len(command) for command, _ in steps)
    print(f"created {target}")
    for command, why in steps:
        print(f"  {command:<{width}}   # {why}")
    print(f"  then change {target / ('kvprof_' + args.name) / 'policy.py'}: the policy decides what the cache holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())

