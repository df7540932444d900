"""What InfiniGen's speculation costs the decode step, split four ways (issue 12).

    python benchmarks/infinigen_spec.py OUT_DIR              # the H200 run: 8K prompt, batch 1, ~2 min
    python benchmarks/infinigen_spec.py OUT_DIR --smoke      # a CPU check that it runs (tiny model)

Llama-3-8B with random weights, bf16, the fast engine (graph-captured step), InfiniGen's defaults.
Runs, each in every round (interleaved, so drift hits all alike), after one untraced warm-up of each:

  speculate   (a) the step as InfiniGen runs it: speculation on the high-priority side stream.
  fixed       (b) the ablation: the same step with no speculation in it. Each layer's selection is
              speculated once, when decoding starts (from the prompt's last token), and every step
              fetches it again: about the same rows and counts (`selected_tokens_mean` of both is
              printed), none of speculation's kernels, input copies or events.
  main        the step with speculation on the compute stream (where layer t starts) instead.
  torch_query (a) with the speculative query by torch's ops (RoPE's five kernels, the einsum),
              not the one RoPE kernel and the bmm: what that fusion gives the step.
  full        all KV on the device: the floor.

Figures (medians over rounds of each run's median decode step, from GPU-timer stamps resolved
after the steps; no host wait inside a step):

  step_ms                   (a) ms per token
  cost_to_step_ms           (a) - (b): what speculation adds to the step, its critical-path share
  alone_ms_per_step         (c) speculation's kernels over all speculated layers, alone on the GPU:
                            the same `speculate` call as in the step, for every layer, captured in
                            one CUDA graph on the state the run left and replayed (CUDA events)
  side_stream_span_ms       (d) the sum over layers of the side stream's span from speculation's
                            first stamp to its last (the trace's SPECULATION phase; today's figure):
                            it also holds the time its kernels wait for SMs and for the stream
  main_stream cost          main - (b)
Each with its share of (a)'s step. figures.json and the printed table; the machine from
torch.cuda.get_device_name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import ms_per_layer, run_strategy, synthetic
from infinigen_gpu import describe_device, summarize
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.trace import read_trace
from kvprof_transformers.loading import load_model

# label: (strategy, switches of StaticInfiniGenPolicy)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "speculate": ("infinigen", {}),
    "fixed": ("infinigen", {"fixed_selection": True}),
    "main": ("infinigen", {"on_main_stream": True}),
    "torch_query": ("infinigen", {"fused_query": False}),
    "full": ("full", {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model, short prompt, CPU: checks that it runs")
    parser.add_argument("--config", default="8192x1", help="PROMPTxBATCH")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-steps", type=int, default=2)
    parser.add_argument("--runs", default=",".join(VARIANTS))
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="infinigen option")
    args = parser.parse_args(argv)

    device = "cpu" if args.smoke else "cuda"
    spec = resolve_model("tiny-llama" if args.smoke else "llama-3-8b", "random")
    options = dict(pair.split("=", 1) for pair in args.opt)
    if args.smoke:
        spec = dataclasses.replace(spec, name=f"{spec.name}-4l", config={**(spec.config or {}), "num_hidden_layers": 4})
        options.setdefault("calibration_tokens", "64")
        args.config, args.output_len, args.rounds, args.skip_steps = "96x1", 6, 2, 1
    prompt_len, batch = map(int, args.config.split("x"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "infinigen-spec.json"
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(spec, device)
    figures: dict[str, Any] = {
        "device": describe_device(device), "model": spec.name, "weights": spec.weights, "dtype": str(loaded.dtype),
        "torch": torch.__version__, "load_s": round(time.perf_counter() - started, 1), "prompt_len": prompt_len,
        "batch_size": batch, "output_len": args.output_len, "rounds": args.rounds, "skip_steps": args.skip_steps,
        "infinigen_options": options, "runs": {},
    }
    print(json.dumps({k: figures[k] for k in ("device", "model", "load_s")}), flush=True)
    registry = load_plugins().registry
    workload = synthetic(prompt_len, args.output_len, batch)
    labels = [label for label in args.runs.split(",") if label]
    for label in labels:  # warm-up: compile, allocate, first captures (not recorded)
        run_variant(registry, spec, loaded, label, options, workload, None, args.skip_steps)
    for round_index in range(args.rounds):
        for label in labels:
            path = args.out_dir / f"{label}.arrow"
            summary, probe = run_variant(registry, spec, loaded, label, options, workload, path, args.skip_steps,
                                         probe_alone=label == "speculate" and round_index == 0)
            path.unlink(missing_ok=True)
            summary.update(probe)
            figures["runs"].setdefault(label, []).append(summary)
            print(f"round {round_index + 1} {label}: {json.dumps(summary)}", flush=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
    figures["split"] = split(figures["runs"])
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print_report(figures)
    print(f"figures in {out}")
    return 0


def run_variant(registry: Any, spec: Any, loaded: Any, label: str, options: dict[str, str], workload: Any,
                path: Path | None, skip_steps: int, probe_alone: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of a variant; its summary (from the trace) and what the probe measured."""
    from kvprof_infinigen.fast import SpeculationSwitches, StaticInfiniGenPolicy

    name, switches = VARIANTS[label]
    probed: dict[str, Any] = {}

    def probe(policy: Any) -> None:
        probed.update(fused_selection=policy.fused, fused_query=policy.fused_query,
                      fused_query_error=policy.fused_query_error)
        if probe_alone:
            probed.update(speculation_alone(policy))

    StaticInfiniGenPolicy.switches = SpeculationSwitches(**switches, probe=probe)
    try:
        run_strategy(registry, name, spec, loaded, options if name == "infinigen" else {}, workload, path)
    finally:
        StaticInfiniGenPolicy.switches = SpeculationSwitches()
    if path is None:
        return {}, {}
    return summarize(read_trace(path), skip_steps), probed


def speculation_alone(policy: Any, repeats: int = 20) -> dict[str, Any]:
    """(c): `policy.speculate` for every speculated layer, back to back on one stream with nothing
    else running, on the state the run left (its partial keys, held slots, last hidden state, cos
    and sin); per step = per layer x layers. Also with the torch query, for the fusion's share."""
    device = "cuda" if policy.cuda else "cpu"
    hidden = policy.inputs.get("hidden0", policy.inputs.get("hidden1"))
    if hidden is None:  # the main-stream or fixed run copies nothing: not probed there
        return {}
    cos, sin = policy.inputs["cos"], policy.inputs["sin"]
    layers = policy.speculated
    result = {}
    fused_query = policy.fused_query
    for key, use_fused in (("alone", fused_query), ("alone_torch_query", False)):
        if key == "alone_torch_query" and not fused_query:
            continue
        policy.fused_query = use_fused

        def every_layer() -> None:
            for target in layers:
                policy.speculate(target, hidden, cos, sin)

        per_layer = ms_per_layer(every_layer, len(layers), repeats, device)
        result[f"speculation_{key}_ms_per_layer"] = round(per_layer, 4)
        result[f"speculation_{key}_ms_per_step"] = round(per_layer * len(layers), 3)
    policy.fused_query = fused_query
    return result


def split(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds, and speculation's cost four ways, each against (a)'s step."""
    def median(label: str, key: str) -> float | None:
        values = [r[key] for r in runs.get(label, []) if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    step = median("speculate", "decode_ms_per_token_median")
    result: dict[str, Any] = {"step_ms": {label: median(label, "decode_ms_per_token_median") for label in runs}}
    result["selected_tokens_mean"] = {label: median(label, "selected_tokens_mean") for label in runs
                                      if label != "full"}
    result["gather_ms_per_step"] = {label: median(label, "gather_ms_per_step") for label in runs if label != "full"}
    result["stall_ms_per_step"] = {label: median(label, "kv_transfer_ms_per_step") for label in runs
                                   if label != "full"}
    fixed = result["step_ms"].get("fixed")
    parts = {
        "a_step_ms": step,
        "b_step_without_speculation_ms": fixed,
        "cost_to_step_ms": round(step - fixed, 3) if step and fixed else None,
        "c_alone_ms_per_step": median("speculate", "speculation_alone_ms_per_step"),
        "c_alone_torch_query_ms_per_step": median("speculate", "speculation_alone_torch_query_ms_per_step"),
        "d_side_stream_span_ms": median("speculate", "speculation_ms_per_step"),
    }
    main_step = result["step_ms"].get("main")
    if main_step and fixed:
        parts["main_stream_step_ms"] = main_step
        parts["main_stream_cost_to_step_ms"] = round(main_step - fixed, 3)
    torch_step = result["step_ms"].get("torch_query")
    if torch_step and step:
        parts["torch_query_step_ms"] = torch_step
        parts["fused_query_saves_ms"] = round(torch_step - step, 3)
    result["parts"] = parts
    result["share_of_step"] = {key: round(value / step, 3) for key, value in parts.items()
                               if step and value is not None and key != "a_step_ms"}
    return result


def print_report(figures: dict[str, Any]) -> None:
    split_ = figures["split"]
    parts, shares = split_["parts"], split_["share_of_step"]
    print(f"\n{figures['model']} ({figures['weights']}), {figures['device']}, prompt {figures['prompt_len']} x batch "
          f"{figures['batch_size']}, medians over {figures['rounds']} rounds")
    print(f"{'run':<12} {'ms/token':>9} {'selected':>9} {'gather ms':>9} {'stall ms':>9}")
    for label, step in split_["step_ms"].items():
        print(f"{label:<12} {step!s:>9} {split_['selected_tokens_mean'].get(label, '')!s:>9} "
              f"{split_['gather_ms_per_step'].get(label, '')!s:>9} {split_['stall_ms_per_step'].get(label, '')!s:>9}")
    names = {
        "b_step_without_speculation_ms": "(b) the step without speculation (fixed selection)",
        "cost_to_step_ms": "(a)-(b) speculation's cost to the step",
        "c_alone_ms_per_step": "(c) speculation's kernels alone, all layers",
        "c_alone_torch_query_ms_per_step": "(c) the same with the torch query",
        "d_side_stream_span_ms": "(d) side-stream span (the trace's phase)",
        "main_stream_step_ms": "the step, speculation on the main stream",
        "main_stream_cost_to_step_ms": "main-stream speculation's cost to the step",
        "torch_query_step_ms": "the step with the torch query",
        "fused_query_saves_ms": "the fused query saves the step",
    }
    print(f"(a) the step: {parts['a_step_ms']} ms")
    for key, text in names.items():
        if parts.get(key) is not None:
            print(f"{text:<55} {parts[key]:>8} ms  {shares.get(key, 0) * 100:5.1f} % of (a)")


if __name__ == "__main__":
    sys.exit(main())
