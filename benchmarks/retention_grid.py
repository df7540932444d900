"""Figure 8 on the embedded SmolLM2-135M: retention accuracy against the KV budget, both question modes.

    python benchmarks/retention_grid.py run      # trace every point not traced yet (resumable)
    python benchmarks/retention_grid.py report   # results JSON, table and figure from the traces
    python benchmarks/retention_grid.py time     # time one h2o point (20 probes) before a full run

Grid: passkey (depth 0.05) and facts (at the start of the context), 1024 and 2048 tokens, questions
`in_prompt` and `after`, `--probes` (default 20) different prompts per point, batch 1 by default
(`--batch-size`); `full`, and `h2o` and `infinigen` at each budget. Points run most wanted first
(`points`), so a run cut short still gives whole panels: a 2048-token prefill takes 25-40 s on the 2
shared cores. On the H200: `--device cuda --batch-size 20` (the weights travel as parts: see
benchmarks/h200_session.sh, part `retention`). The budget follows benchmarks/grids/fig8_retention_vs_budget.sh:
H2O's heavy + recent (recent fixed at 5 % of the prompt), InfiniGen's fetch cap (`budget`). The model
is loaded once; each point is one in-process `kvprof trace` run (benchmarks/common.run_strategy) whose
trace stays under --traces. Everything reported comes from the traces through kvprof's retention
analysis: accuracy with its 95 % Wilson interval, the full baseline on the same prompts, token
survival over the answer steps (h2o) and fetched coverage (infinigen, traced at detail "head").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvprof import WorkloadParams, WorkloadSpec

RESULTS = Path(__file__).parent / "results"
MACHINES = {"cpu": ("CPU, 2 cores", "cpu-retention-grid"), "cuda": ("NVIDIA H200", "h200-retention-grid")}
WORKLOADS = ("passkey", "facts")
CONTEXTS = (1024, 2048)
RECENT = 0.05  # H2O's recent window, a fraction of the prompt; heavy hitters take the rest of the budget


def strategies(budgets: list[float]) -> list[tuple[str, dict[str, str]]]:
    """(plugin, options) of every line of the figure: full, then h2o and infinigen per budget."""
    runs: list[tuple[str, dict[str, str]]] = [("full", {})]
    runs += [("h2o", {"heavy_ratio": f"{budget - RECENT:g}", "recent_ratio": f"{RECENT:g}"}) for budget in budgets]
    runs += [("infinigen", {"budget": f"{budget:g}"}) for budget in budgets]
    return runs


def workload(kind: str, context: int, question: str, probes: int, output_len: int, batch_size: int) -> WorkloadSpec:
    return WorkloadSpec(kind, WorkloadParams(prompt_len=context, output_len=output_len, num_prompts=probes,
                                             batch_size=batch_size, depth=0.05, num_facts=4, question=question))


def trace_path(folder: Path, kind: str, context: int, question: str, plugin: str, options: dict[str, str]) -> Path:
    tag = "".join(f"-{key}{value}" for key, value in options.items())
    return folder / f"{kind}-{context}-{question}-{plugin}{tag}.arrow"


def points(args: argparse.Namespace) -> list[tuple[str, int, str, str, dict[str, str]]]:
    """Every point, most wanted first (the run is resumable and may be cut short): per context
    (shortest first), the first budgets in both question modes (`after`, the figure's, first),
    then the remaining budgets."""
    first, rest = args.budgets[:args.first_budgets], args.budgets[args.first_budgets:]
    order = []
    for context in args.contexts:
        for budgets, with_full in ((first, True), (rest, False)):
            for question in ("after", "in_prompt"):
                for kind in WORKLOADS:
                    lines = strategies(budgets)[0 if with_full else 1:]
                    order += [(kind, context, question, plugin, options) for plugin, options in lines]
    return order


def run(args: argparse.Namespace, only: list[tuple] | None = None) -> None:
    from common import run_strategy
    from kvprof.models import resolve_model
    from kvprof.plugins import load_plugins
    from kvprof_transformers.loading import load_model

    spec = resolve_model("smollm2-135m")
    loaded = load_model(spec, args.device, args.dtype)
    registry = load_plugins().registry
    args.traces.mkdir(parents=True, exist_ok=True)
    todo = only or points(args)
    for number, (kind, context, question, plugin, options) in enumerate(todo, 1):
        path = trace_path(args.traces, kind, context, question, plugin, options)
        if path.exists():  # the trace is renamed to its path once its run finished
            continue
        started = time.perf_counter()
        detail = "head" if plugin == "infinigen" else "layer"  # head: InfiniGen's fetched positions
        # InfiniGen's speculation needs equal-length prompts in a batch: its probes run one at a time.
        batch_size = 1 if plugin == "infinigen" else args.batch_size
        run_strategy(registry, plugin, spec, loaded, options,
                     workload(kind, context, question, args.probes, args.output_len, batch_size), path,
                     detail=detail)
        print(f"[{number}/{len(todo)}] {path.name}: {time.perf_counter() - started:.0f} s", flush=True)


def report(args: argparse.Namespace) -> None:
    from kvprof.analysis.plots import retention_figure
    from kvprof.analysis.retention import retention
    from kvprof.trace import read_trace

    rows = []
    for kind, context, question, plugin, options in sorted(points(args), key=_report_order):
        path = trace_path(args.traces, kind, context, question, plugin, options)
        if not path.exists():
            continue
        full = trace_path(args.traces, kind, context, question, "full", {})
        trace = read_trace(path)
        result = retention(trace, read_trace(full) if full.exists() else None)
        overall, survival = result["overall"], result["survival"]
        rows.append({"workload": kind, "context": context, "question": question, "plugin": plugin,
                     "options": options, "budget": result["budget"], "trace": path.name,
                     "probes": overall["requests"], "correct": overall["correct"],
                     "accuracy": overall["accuracy"], "interval_95": overall["interval_95"],
                     "full_accuracy": overall["baseline_accuracy"],
                     "survival_answer_mean": survival.get("asked_mean"),
                     "survival_first_token": survival.get("asked_first_token"),
                     "fetched_coverage": (result.get("coverage") or {}).get("asked_mean")})
    RESULTS.mkdir(exist_ok=True)
    machine, stem = MACHINES[args.device]
    meta = {"machine": machine, "model": f"smollm2-135m (real weights, {args.dtype})", "batch_size": args.batch_size,
            "probes_per_point": args.probes,
            "output_len": args.output_len, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "h2o_recent_ratio": RECENT, "passkey_depth": 0.05}
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "points": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table(rows, meta))
    figure = retention_figure(
        [{"panel": f"{row['workload']}, {row['context']} tokens, question {row['question']}",
          "strategy": row["plugin"], "budget": row["budget"], "correct": row["correct"], "judged": row["probes"]}
         for row in rows],
        f"Retention accuracy against KV budget (SmolLM2-135M, {machine}, {args.probes} probes per point)")
    if figure is not None:
        figure.savefig(RESULTS / f"{stem}.png", dpi=110)
    print((RESULTS / f"{stem}.md").read_text())


def _report_order(point: tuple) -> tuple:
    kind, context, question, plugin, options = point
    budget = float(next(iter(options.values()), 1.0)) if plugin == "infinigen" else \
        sum(float(v) for v in options.values()) if options else 0.0
    return kind, context, question, plugin != "full", plugin, budget


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    lines = [f"# Retention accuracy against KV budget ({meta['machine']})", "",
             f"SmolLM2-135M, real weights ({meta['model']}); {meta['probes_per_point']} probes per point, "
             f"batch {meta['batch_size']}, "
             f"{meta['output_len']} output tokens at most. Accuracy with its 95 % Wilson interval; survival: share "
             "of the asked fact's tokens cached, mean over layers, KV heads and answer steps (h2o); coverage: "
             "share of them fetched, same mean (infinigen).", "",
             "| workload | context | question | strategy | budget | accuracy | 95 % interval | full | survival | "
             "coverage |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["interval_95"] or (None, None)
        lines.append(f"| {row['workload']} | {row['context']} | {row['question']} | {row['plugin']} | "
                     f"{share(row['budget'])} | {row['correct']}/{row['probes']} = {share(row['accuracy'])} | "
                     f"{share(low)}-{share(high)} | {share(row['full_accuracy'])} | "
                     f"{share(row['survival_answer_mean'])} | {share(row['fetched_coverage'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "report", "time"))
    parser.add_argument("--traces", type=Path, default=Path("traces/retention-grid"))
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--budgets", type=lambda text: [float(b) for b in text.split(",")],
                        default=[0.1, 0.5, 0.2, 1.0], help="in the order they run")
    parser.add_argument("--first-budgets", type=int, default=2,
                        help="budgets run for every mode and workload of a context before the others")
    parser.add_argument("--device", choices=sorted(MACHINES), default="cpu",
                        help="cpu (float32, this 2-core machine) or cuda (the H200 device machine)")
    parser.add_argument("--dtype", default="float32", help="float32 keeps the CPU and GPU grids comparable")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="probes run together (rows are independent: each keeps its own cache)")
    parser.add_argument("--contexts", type=lambda text: [int(c) for c in text.split(",")], default=list(CONTEXTS))
    args = parser.parse_args(argv)
    if args.action == "time":
        args.traces = args.traces / "timing"
        run(args, [("passkey", max(args.contexts), "after", "h2o", strategies([0.2])[1][1]),
                   ("passkey", max(args.contexts), "after", "infinigen", {"budget": "0.2"})])
    elif args.action == "run":
        run(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
