"""InfiniGen against whole-layer offload and the all-on-device baseline, on one GPU.

    python benchmarks/infinigen_gpu.py OUT_DIR            # the H100 run (~2 min after loading)
    python benchmarks/infinigen_gpu.py OUT_DIR --smoke    # seconds, on a CPU: checks that it runs

The default run: Llama-3-8B with random weights (timings and memory are faithful, accuracy is
not), one synthetic prompt of 8192 tokens, 32 generated tokens, batch 1 (`--batch-size` runs that many
equal-length prompts together), bf16, in one process
with one loaded model: `full`, `offload` and `infinigen` (default options: alpha 5, partial ratio
0.2, budget 0.2), each after a warm-up run of the same prompt length, in `--rounds` rounds (the
figures are the last round's; every round's median is kept). Before them, the peak host-to-device
bandwidth of a plain pinned copy is measured at a few sizes (CUDA events, median of repeats).

Prints decode ms/token per strategy and the ratios between them, and the achieved bandwidth of
the fetches, read from each trace's offload events (bytes / CUDA-timed copy duration), against the
peak. Writes OUT_DIR/<strategy>.arrow (last round) and OUT_DIR/figures.json, which also holds the
CUDA caching allocator's counters per run (device allocations, retries).

Needs kvprof installed (`pip install --no-deps -e .`, for the plugins' entry points) and, for the
random-weight alias, a tokenizer: the embedded SmolLM2 checkpoint folder in $KVPROF_CACHE/models/
(its config.json and tokenizer files are enough; the weights are not read).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvprof.models import resolve_model
from kvprof.profiler import Profiler, Registry, RunInfo, get_plugin_manager
from kvprof.strategy import RunContext, parse_options
from kvprof.trace import Trace, read_trace
from kvprof.workloads import WorkloadParams, WorkloadSpec
from kvprof_transformers.loading import LoadedModel, load_model

STRATEGIES = ("full", "offload", "infinigen")


@dataclasses.dataclass
class Setup:
    model: str
    weights: str
    layers: int | None     # override the alias's layer count (smoke: enough layers to speculate)
    prompt_len: int
    output_len: int
    copy_sizes_mib: tuple[float, ...]
    infinigen_options: dict[str, str]


FULL = Setup("llama-3-8b", "random", None, 8192, 32, (4, 32, 256), {})
SMOKE = Setup("tiny-llama", "random", 4, 96, 6, (1, 4), {"calibration_tokens": "64"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model, short prompt: checks that it runs")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1, help="equal-length synthetic prompts run together")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="infinigen option")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    setup = SMOKE if args.smoke else FULL
    setup = dataclasses.replace(
        setup, prompt_len=args.prompt_len or setup.prompt_len, output_len=args.output_len or setup.output_len,
        infinigen_options={**setup.infinigen_options, **dict(pair.split("=", 1) for pair in args.opt)},
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    spec = resolve_model(setup.model, setup.weights)
    if setup.layers is not None:
        spec = dataclasses.replace(spec, name=f"{spec.name}-{setup.layers}l",
                                   config={**spec.config, "num_hidden_layers": setup.layers})
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(spec, device)
    print(f"model {spec.name} ({spec.weights} weights, {loaded.dtype}) on {device}: "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)

    figures: dict[str, Any] = {
        "device": describe_device(device), "model": spec.name, "weights": spec.weights,
        "dtype": str(loaded.dtype), "prompt_len": setup.prompt_len, "output_len": setup.output_len,
        "batch_size": args.batch_size, "infinigen_options": setup.infinigen_options,
        "peak_h2d_GBps": peak_copy_bandwidth(device, setup.copy_sizes_mib),
    }
    print("plain pinned host-to-device copy:", ", ".join(
        f"{size} MiB {gbps:.1f} GB/s" for size, gbps in figures["peak_h2d_GBps"].items()), flush=True)

    registry = Registry.collect(get_plugin_manager())
    figures["strategies"] = {}
    rounds: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        for name in args.strategies.split(","):
            options = setup.infinigen_options if name == "infinigen" else {}
            warmup = synthetic(setup.prompt_len, 4, args.batch_size)
            run_strategy(registry, name, spec, loaded, options, warmup, None)
            trace_path = args.out_dir / f"{name}.arrow"
            before, started = allocator_counters(device), time.perf_counter()
            workload = synthetic(setup.prompt_len, setup.output_len, args.batch_size)
            run_strategy(registry, name, spec, loaded, options, workload, trace_path)
            summary = summarize(read_trace(trace_path))
            summary["wall_s"] = round(time.perf_counter() - started, 2)
            summary["allocator"] = {k: v - before.get(k, 0) for k, v in allocator_counters(device).items()}
            rounds.setdefault(name, []).append(summary["decode_ms_per_token_median"])
            summary["decode_ms_per_token_median_by_round"] = rounds[name]
            figures["strategies"][name] = summary
            print(f"round {round_index + 1} {name}: {summary['decode_ms_per_token_median']} ms/token "
                  f"(run {summary['wall_s']} s, allocator {summary['allocator']})", flush=True)

    figures["ratios"] = ratios(figures["strategies"])
    (args.out_dir / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print_report(figures)
    print(f"traces and figures.json in {args.out_dir}")
    return 0


# --- runs ----------------------------------------------------------------------------------------


def run_strategy(registry: Registry, name: str, spec: Any, loaded: LoadedModel, raw_options: dict[str, str],
                 workload: WorkloadSpec, trace_path: Path | None) -> None:
    """One in-process `kvprof trace` run on the loaded model; without a trace path the run
    attaches no sinks (warm-up)."""
    strategy_cls = registry.strategy(name)
    options = parse_options(strategy_cls.options, raw_options)
    run = RunInfo(plugin=name, model=spec.to_dict(), workload={"name": workload.name, "params": vars(workload.params)},
                  options=options, device=str(loaded.device), trace_path=str(trace_path) if trace_path else None,
                  sinks_enabled=trace_path is not None, seed=workload.params.seed)
    profiler = Profiler(get_plugin_manager(), run)
    context = RunContext(model=spec, workload=workload, options=options, profiler=profiler,
                         device=str(loaded.device), seed=workload.params.seed)
    error = None
    try:
        strategy_cls().run_loaded(context, loaded)
    except BaseException as exc:
        error = exc
        raise
    finally:
        profiler.end(error)
        gc.collect()
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()


def synthetic(prompt_len: int, output_len: int, batch_size: int = 1) -> WorkloadSpec:
    """`batch_size` synthetic requests of one length, run as one batch."""
    return WorkloadSpec("synthetic", WorkloadParams(prompt_len=prompt_len, output_len=output_len,
                                                    batch_size=batch_size, num_prompts=batch_size))


def peak_copy_bandwidth(device: str, sizes_mib: tuple[float, ...], repeats: int = 10) -> dict[str, float]:
    """GB/s of a plain copy from pinned host memory to the device, median of `repeats`, per size
    (on a CPU device: a host memcpy, timed with the host clock)."""
    cuda = device.startswith("cuda")
    result = {}
    for size in sizes_mib:
        count = int(size * 2**20)
        host = torch.empty(count, dtype=torch.uint8, pin_memory=cuda)
        target = torch.empty(count, dtype=torch.uint8, device=device)
        target.copy_(host, non_blocking=True)  # warm-up
        seconds = []
        for _ in range(repeats):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                target.copy_(host, non_blocking=True)
                end.record()
                end.synchronize()
                seconds.append(begin.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                target.copy_(host)
                seconds.append(time.perf_counter() - started)
        result[f"{size:g}"] = round(count / statistics.median(seconds) / 1e9, 2)
        del host, target
    return result


# --- figures from traces ----------------------------------------------------------------------------


def summarize(trace: Trace) -> dict[str, Any]:
    """Decode time per token, prefill time, fetch bandwidth and the strategy's phases, per step."""
    steps = trace.of_kind("decode_step").to_pylist()
    decode_ms = [(s["end_ns"] - s["start_ns"]) / 1e6 for s in steps]
    prefill = trace.of_kind("prefill").to_pylist()[0]
    result: dict[str, Any] = {
        "decode_ms_per_token_median": round(statistics.median(decode_ms), 3),
        "decode_ms_per_token_mean": round(statistics.fmean(decode_ms), 3),
        "decode_ms_per_token_min": round(min(decode_ms), 3),
        "decode_steps": len(steps),
        "prefill_ms": round((prefill["end_ns"] - prefill["start_ns"]) / 1e6, 1),
        "kv_device_bytes": steps[-1]["kv_device_bytes"], "kv_host_bytes": steps[-1]["kv_host_bytes"],
        "aux_device_bytes": steps[-1]["aux_device_bytes"],
    }
    offloads = trace.of_kind("offload").to_pylist()
    fetches = [e for e in offloads if e["dst_medium"] == "device"]
    if fetches:
        speculated = [e for e in fetches if dict(e["ext"] or {}).get("speculated") == 1.0]
        whole = [e for e in fetches if e not in speculated]
        result["fetch"] = {"all": bandwidth(fetches), "whole_layers": bandwidth(whole)}
        if speculated:
            result["fetch"]["speculated_layers"] = bandwidth(speculated)
            exts = [dict(e["ext"]) for e in speculated]
            result["selected_tokens_mean"] = round(statistics.fmean(x["selected_tokens"] for x in exts), 1)
            result["selected_fraction_mean"] = round(
                statistics.fmean(x["selected_tokens"] / x["stored_tokens"] for x in exts), 4)
            result["host_gather_ms_per_step"] = round(sum(x["gather_ns"] for x in exts) / 1e6 / len(steps), 3)
    stores = [e for e in offloads if e["src_medium"] == "device" and e["step"] is None]
    if stores:
        result["prefill_store"] = bandwidth(stores)
    phases = trace.of_kind("phase").to_pylist()
    for phase in sorted({p["phase"] for p in phases}):
        spent = sum(p["end_ns"] - p["start_ns"] for p in phases if p["phase"] == phase and p["step"] is not None)
        result[f"{phase}_ms_per_step"] = round(spent / 1e6 / len(steps), 3)
    return result


def bandwidth(copies: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes moved, their CUDA-timed copy time, and GB/s overall and per copy (median)."""
    total_bytes = sum(e["bytes"] for e in copies)
    total_ns = sum(dict(e["ext"])["copy_ns"] for e in copies)
    per_copy = [e["bytes"] / dict(e["ext"])["copy_ns"] for e in copies if dict(e["ext"])["copy_ns"] > 0]
    return {"copies": len(copies), "MiB_per_copy": round(total_bytes / len(copies) / 2**20, 2),
            "GBps": round(total_bytes / total_ns, 2) if total_ns else 0.0,
            "GBps_median_copy": round(statistics.median(per_copy), 2) if per_copy else 0.0}


def ratios(strategies: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Median decode time ratios: "offload/infinigen" > 1 means InfiniGen decodes faster than offload."""
    decode = {name: s["decode_ms_per_token_median"] for name, s in strategies.items()}
    pairs = [("offload", "infinigen"), ("full", "infinigen"), ("offload", "full")]
    return {f"{a}/{b}": round(decode[a] / decode[b], 3) for a, b in pairs if a in decode and b in decode}


def print_report(figures: dict[str, Any]) -> None:
    strategies = figures["strategies"]
    print(f"\n{figures['model']} ({figures['weights']}), prompt {figures['prompt_len']}, "
          f"{figures['output_len']} tokens, batch {figures['batch_size']}, {figures['device']}")
    print(f"{'strategy':<10} {'decode ms/tok':>13} {'prefill ms':>10} {'fetch GB/s':>10} {'stall ms/step':>13} "
          f"{'spec ms/step':>12} {'gather ms/step':>14}")
    for name, s in strategies.items():
        fetch = s.get("fetch", {}).get("all", {}).get("GBps", "")
        print(f"{name:<10} {s['decode_ms_per_token_median']:>13} {s['prefill_ms']:>10} {fetch:>10} "
              f"{s.get('kv_transfer_ms_per_step', ''):>13} {s.get('speculation_ms_per_step', ''):>12} "
              f"{s.get('host_gather_ms_per_step', ''):>14}")
    print("decode time ratios (median ms/token):", ", ".join(f"{k} {v}" for k, v in figures["ratios"].items()))
    peak = max(figures["peak_h2d_GBps"].values())
    for name, s in strategies.items():
        for part, b in s.get("fetch", {}).items():
            print(f"  {name} fetches ({part}): {b['copies']} copies of {b['MiB_per_copy']} MiB, "
                  f"{b['GBps']} GB/s = {b['GBps'] / peak:.0%} of the {peak} GB/s peak")
    if "infinigen" in strategies and "selected_fraction_mean" in strategies["infinigen"]:
        s = strategies["infinigen"]
        print(f"  infinigen selected on average {s['selected_tokens_mean']} tokens per head and layer "
              f"({s['selected_fraction_mean']:.1%} of the stored ones)")


def allocator_counters(device: str) -> dict[str, int]:
    """Cumulative CUDA caching-allocator counters: device allocations (cudaMalloc) and retries."""
    if not device.startswith("cuda"):
        return {}
    stats = torch.cuda.memory_stats(torch.device(device))
    return {key: int(stats.get(key, 0)) for key in ("num_device_alloc", "num_alloc_retries", "num_device_free")}


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
