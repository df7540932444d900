"""InfiniGen's retention accuracy against `full` on the embedded SmolLM2, at two alphas and two caps.

    python benchmarks/infinigen_retention.py OUT_DIR [--prompts 4] [--context 1024]

Runs, on one loaded model and batch 1 (InfiniGen averages its token count over a batch's rows, so
batching would change the selection), passkey probes at three depths and a facts probe, each
`--prompts` times with different keys and facts: first with `full`, then with `infinigen` for
every (alpha, budget) pair. Prints, per configuration, the answer accuracy, its ratio to full's
(kvprof.analysis.retention), the share of requests whose text equals full's, and the mean share of
tokens InfiniGen fetched for its speculated layers. Writes the traces and OUT_DIR/retention.json.
A CPU run; ~10 s per request and configuration on 2 cores at 1024 tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from infinigen_gpu import run_strategy
from kvprof import WorkloadParams, WorkloadSpec
from kvprof.analysis.retention import retention
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.trace import Trace, read_trace
from kvprof_transformers.loading import load_model

PROBES = (("passkey", 0.1), ("passkey", 0.5), ("passkey", 0.9), ("facts", None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=4, help="requests per probe (different keys and facts)")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--alphas", default="2,5")
    parser.add_argument("--budgets", default="0.1,0.2")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    spec = resolve_model("smollm2-135m")
    loaded = load_model(spec, "cpu")
    registry = load_plugins().registry
    configs: list[tuple[str, dict[str, Any]]] = [("full", {})] + [("infinigen", {"alpha": a, "budget": b})
                                for a in args.alphas.split(",") for b in args.budgets.split(",")]
    results: list[dict[str, Any]] = []
    baseline: dict[str, Trace] = {}
    for name, options in configs:
        label = name + "".join(f" {key}={value}" for key, value in options.items())
        rows, texts_equal, fractions = [], [], []
        for kind, depth in PROBES:
            workload = probe_workload(kind, depth, args.prompts, args.context)
            tag = f"{kind}{'' if depth is None else f'-{depth}'}"
            path = args.out_dir / f"{label.replace(' ', '_').replace('=', '')}-{tag}.arrow"
            run_strategy(registry, name, spec, loaded, {k: str(v) for k, v in options.items()}, workload, path)
            trace = read_trace(path)
            if name == "full":
                baseline[tag] = trace
            report = retention(trace, baseline[tag])
            rows += report["requests"]
            texts_equal += same_texts(trace, baseline[tag])
            fractions += selected_fractions(trace)
        correct = [row["correct"] for row in rows]
        reference = [row["baseline_correct"] for row in rows]
        result = {"config": label, "requests": len(rows), "accuracy": sum(correct) / len(correct),
                  "full_accuracy": sum(reference) / len(reference),
                  "same_text_as_full": sum(texts_equal) / len(texts_equal),
                  "selected_fraction": statistics.fmean(fractions) if fractions else 1.0}
        results.append(result)
        print(f"{label:<28} accuracy {result['accuracy']:.2f} (full {result['full_accuracy']:.2f}), "
              f"text = full's {result['same_text_as_full']:.2f}, fetched {result['selected_fraction']:.1%} "
              "of the tokens of speculated layers", flush=True)
    (args.out_dir / "retention.json").write_text(json.dumps(
        {"model": spec.name, "context": args.context, "prompts_per_probe": args.prompts,
         "probes": [list(p) for p in PROBES], "threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")
    return 0


def probe_workload(kind: str, depth: float | None, prompts: int, context: int) -> WorkloadSpec:
    params = WorkloadParams(prompt_len=context, output_len=12, num_prompts=prompts, batch_size=1, num_facts=4)
    return WorkloadSpec(kind, dataclasses.replace(params, depth=depth) if depth is not None else params)


def same_texts(trace: Trace, baseline: Trace) -> list[bool]:
    def texts(t: Trace) -> dict[str, str]:
        return {r["request_id"]: r["text"] for r in t.of_kind("request_end").to_pylist()}

    theirs = texts(baseline)
    return [text == theirs.get(request) for request, text in texts(trace).items()]


def selected_fractions(trace: Trace) -> list[float]:
    """Per speculated fetch: tokens fetched / tokens stored."""
    fractions = []
    for event in trace.of_kind("offload").to_pylist():
        ext = dict(event["ext"] or {})
        if ext.get("speculated") == 1.0:
            fractions.append(ext["selected_tokens"] / ext["stored_tokens"])
    return fractions


if __name__ == "__main__":
    sys.exit(main())
