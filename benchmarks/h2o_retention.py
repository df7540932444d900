"""H2O's retention of a passkey (or facts) against the full cache, computed from traces.

    python benchmarks/h2o_retention.py                                   # 2048-token contexts
    python benchmarks/h2o_retention.py --context 1024 --prompts 2 --depths 0.25,0.75 --device cpu

For each depth, one `full` run and one `h2o` run per budget (heavy = recent = half the budget,
as fractions of the prompt) on the same prompts, each through `kvprof trace`, each trace kept
under --out (default traces/h2o/). The table comes from the traces alone, by kvprof's retention
analysis: accuracy, the accuracy of `full` on the same prompts, and the share of the needle's
tokens (passkey) or of the asked fact's tokens still cached, over layers and KV heads, when the
question was asked (after H2O's eviction at the end of prefill).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvprof.analysis.retention import retention
from kvprof.cli import main as kvprof
from kvprof.trace import read_trace


def trace(path: Path, plugin: str, options: dict[str, str], args: argparse.Namespace, depth: float) -> Path:
    """One `kvprof trace` run; returns its trace path."""
    command = ["trace", "--plugin", plugin, "--model", args.model, "--workload", args.workload,
               "--prompt-len", str(args.context), "--output-len", str(args.output_len),
               "--num-prompts", str(args.prompts), "--batch-size", str(args.batch_size or args.prompts),
               "--depth", str(depth), "--seed", str(args.seed), "-o", str(path)]
    command += [f"--opt={key}={value}" for key, value in options.items()]
    if args.device:
        command += ["--device", args.device]
    if kvprof(command) != 0:
        raise SystemExit(f"kvprof {' '.join(command)} failed")
    return path


def run_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Trace every (depth, strategy) and sum the retention figures per strategy."""
    budgets = [float(b) for b in args.budgets.split(",")]
    depths = [float(d) for d in args.depths.split(",")] if args.workload == "passkey" else [0.5]
    totals: dict[str, dict[str, Any]] = {}
    for depth in depths:
        stem = f"{args.workload}-{args.context}-d{depth:g}"
        full = read_trace(trace(args.out / f"{stem}-full.arrow", "full", {}, args, depth))
        runs = {"full": full}
        for budget in budgets:
            options = {"heavy_ratio": f"{budget / 2:g}", "recent_ratio": f"{budget / 2:g}"}
            runs[f"h2o {budget:.0%}"] = read_trace(trace(args.out / f"{stem}-h2o{budget:g}.arrow", "h2o", options,
                                                         args, depth))
        for name, run in runs.items():
            result = retention(run, full)
            total = totals.setdefault(name, {"requests": 0, "correct": 0, "full_correct": 0, "agree": 0,
                                             "survival_sum": 0.0, "correct_by_depth": {}})
            total["correct_by_depth"][f"{depth:g}"] = sum(bool(r["correct"]) for r in result["requests"])
            for request in result["requests"]:
                total["requests"] += 1
                total["correct"] += bool(request["correct"])
                total["full_correct"] += bool(request["baseline_correct"])
                total["agree"] += request["correct"] == request["baseline_correct"]
            total["survival_sum"] += (result["survival"]["asked_mean"] or 0.0) * len(result["requests"])
    return totals


def print_table(totals: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{args.workload}, {args.context}-token contexts, model {args.model}")
    print(f"{'run':>10} {'accuracy':>10} {'full':>10} {'ratio':>7} {'agree':>7} {'kept':>7}")
    for name, t in totals.items():
        n = t["requests"]
        ratio = t["correct"] / t["full_correct"] if t["full_correct"] else float("nan")
        print(f"{name:>10} {t['correct']:>4.0f}/{n:<5.0f} {t['full_correct']:>4.0f}/{n:<5.0f} {ratio:>7.2f} "
              f"{t['agree'] / n:>7.0%} {t['survival_sum'] / n:>7.0%}")
    print("accuracy: answers containing the key; full: full's on the same prompts; agree: same verdict as full;")
    print("kept: share of the needle's (passkey) or asked fact's tokens still cached, mean over layers and KV")
    print("heads, at the question")
    if args.workload == "passkey":
        depths = list(next(iter(totals.values()))["correct_by_depth"])
        print(f"correct per depth ({args.prompts} prompts each): {'run':>10} " + " ".join(f"{d:>5}" for d in depths))
        for name, t in totals.items():
            print(f"{'':>37}{name:>10} " + " ".join(f"{t['correct_by_depth'][d]:>5}" for d in depths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workload", default="passkey", choices=("passkey", "facts"))
    parser.add_argument("--context", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="passkey depths")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per depth (different keys)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: all prompts of a depth at once")
    parser.add_argument("--budgets", default="1.0,0.5,0.2,0.1", help="h2o budgets, fractions of the prompt")
    parser.add_argument("--output-len", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("traces/h2o"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    totals = run_all(args)
    print_table(totals, args)
    (args.out / f"retention-{args.workload}-{args.context}.json").write_text(json.dumps(totals, indent=2) + "\n")


if __name__ == "__main__":
    main()
