"""The fast engine on one GPU: kvprof's figures beside an independent harness, the roofline, the
profiler's overhead, and `offload` in both modes.

    python benchmarks/engine_gpu.py OUT_DIR             # the H200 run (random Llama-3-8B, 8K prompt)
    python benchmarks/engine_gpu.py OUT_DIR --smoke     # tiny model on the CPU: checks that it runs

In one process, on one loaded model (random weights: timings and memory are faithful):
1. bandwidth ceilings: a device-to-device copy (bytes read + written) and a pinned
   host-to-device copy, CUDA events, medians;
2. per batch size: `benchmarks/harness.py` (a plain loop, CUDA events only) and `kvprof trace
   --plugin full` on the same settings, `--rounds` rounds each after a warm-up; kvprof's ITL
   median and TTFT against the harness's step time and TTFT; the step time as a fraction of
   the bandwidth limit (weights + KV bytes read per step, over the measured copy bandwidth);
3. profiler overhead: `benchmarks/overhead.py`'s interleaved on/off measurement;
4. `offload` with and without overlap: decode time per token and fetch bandwidth.
Prints a table and writes OUT_DIR/engine.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import run_strategy, synthetic  # noqa: E402
from harness import run_harness  # noqa: E402
from infinigen_gpu import peak_copy_bandwidth, summarize  # noqa: E402
from kvprof.analysis.summary import summary as trace_summary  # noqa: E402
from kvprof.models import resolve_model  # noqa: E402
from kvprof.plugins import Registry, load_plugins  # noqa: E402
from kvprof.trace import read_trace  # noqa: E402
from kvprof_transformers.loading import load_model  # noqa: E402
from overhead import measure_overhead  # noqa: E402


def device_copy_bandwidth(device: str, mib: int = 2048, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    if not device.startswith("cuda"):
        return float("nan")
    source = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return 2 * source.numel() / statistics.median(times) / 1e9


def kv_bytes_per_token(loaded: Any) -> int:
    text = loaded.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * loaded.model.dtype.itemsize


def compare_with_harness(loaded: Any, spec: Any, registry: Registry, batch: int, prompt_len: int, output_len: int,
                         rounds: int, bandwidth: float, out_dir: Path) -> dict[str, Any]:
    vocab = loaded.config.get_text_config().vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt_len), device=loaded.device)
    harness = run_harness(loaded.model, prompts, output_len, rounds=rounds)
    torch.cuda.empty_cache() if loaded.device.type == "cuda" else None
    kvprof_itl, kvprof_ttft, kvprof_prefill = [], [], []
    run_strategy(registry, "full", spec, loaded, {}, synthetic(prompt_len, 4, batch), None)  # warm-up
    for _ in range(rounds):
        path = out_dir / f"full-b{batch}.arrow"
        run_strategy(registry, "full", spec, loaded, {}, synthetic(prompt_len, output_len, batch), path)
        trace = read_trace(path)
        figures = summarize(trace)
        stats = trace_summary(trace)
        kvprof_itl.append(stats["latency_ms"]["itl"]["median"])
        kvprof_ttft.append(stats["latency_ms"]["ttft"]["median"])
        kvprof_prefill.append(figures["prefill_ms"])
    weights = loaded.weights_bytes()
    kv = batch * (prompt_len + output_len // 2) * kv_bytes_per_token(loaded)
    limit_ms = (weights + kv) / bandwidth * 1e3 if bandwidth == bandwidth else float("nan")
    itl, ttft = statistics.median(kvprof_itl), statistics.median(kvprof_ttft)
    return {
        "batch_size": batch, "prompt_len": prompt_len, "output_len": output_len, "rounds": rounds,
        "harness_step_ms_median": harness.step_median_ms, "harness_ttft_ms_median": harness.ttft_median_ms,
        "kvprof_itl_ms_median": itl, "kvprof_ttft_ms_median": ttft,
        "kvprof_prefill_ms_median": statistics.median(kvprof_prefill),
        "kvprof_itl_ms_by_round": kvprof_itl, "kvprof_ttft_ms_by_round": kvprof_ttft,
        "itl_over_harness": itl / harness.step_median_ms, "ttft_over_harness": ttft / harness.ttft_median_ms,
        "bandwidth_limit_ms": limit_ms, "roofline_fraction": limit_ms / itl,
        "bytes_per_step": weights + kv,
    }


def offload_modes(loaded: Any, spec: Any, registry: Registry, prompt_len: int, output_len: int,
                  out_dir: Path) -> dict[str, Any]:
    result = {}
    for overlap in ("true", "false"):
        options = {"overlap": overlap}
        run_strategy(registry, "offload", spec, loaded, options, synthetic(prompt_len, 4, 1), None)
        path = out_dir / f"offload-overlap-{overlap}.arrow"
        run_strategy(registry, "offload", spec, loaded, options, synthetic(prompt_len, output_len, 1), path)
        result[f"overlap={overlap}"] = summarize(read_trace(path))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-repeats", type=int, default=10)
    parser.add_argument("--overhead-prompt-len", type=int, default=1024)
    # Per token = (run of N tokens - run of 1) / (N - 1): a run's fixed costs (graph capture, the trace
    # file) vary by tens of ms, so N = 64 gave an IQR of 6-7 % on the H200; 256 divides that by four.
    parser.add_argument("--overhead-output-len", type=int, default=256)
    parser.add_argument("--skip", default="", help="comma list of: harness, overhead, offload")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    device = "cpu" if args.smoke else "cuda"
    model = "tiny-llama" if args.smoke else "llama-3-8b"
    if args.smoke:
        args.prompt_len, args.output_len, args.rounds, args.overhead_repeats = 64, 6, 1, 2
        args.overhead_output_len = 6
        args.overhead_prompt_len = 64
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(model, "random")
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(spec, device)
    figures: dict[str, Any] = {"model": spec.name, "weights": "random", "dtype": str(loaded.dtype),
                               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "load_s": round(time.perf_counter() - started, 1)}
    figures["device_copy_GBps"] = device_copy_bandwidth(device)
    figures["pinned_h2d_GBps"] = peak_copy_bandwidth(device, (256,) if not args.smoke else (1,))
    print(json.dumps({k: figures[k] for k in ("device", "load_s", "device_copy_GBps", "pinned_h2d_GBps")}), flush=True)
    registry = load_plugins().registry
    if "harness" not in skip and device == "cuda":
        figures["harness_vs_kvprof"] = []
        for batch in map(int, args.batches.split(",")):
            row = compare_with_harness(loaded, spec, registry, batch, args.prompt_len, args.output_len, args.rounds,
                                       figures["device_copy_GBps"] * 1e9, args.out_dir)
            figures["harness_vs_kvprof"].append(row)
            print(json.dumps(row), flush=True)
    if "overhead" not in skip:
        figures["overhead"] = []
        for batch in map(int, args.batches.split(",")):
            row = measure_overhead(loaded, spec, "full", args.overhead_prompt_len, args.overhead_output_len, batch,
                                   args.overhead_repeats, args.out_dir)
            figures["overhead"].append(row)
            print(json.dumps(row), flush=True)
    if "offload" not in skip:
        figures["offload"] = offload_modes(loaded, spec, registry, args.prompt_len, args.output_len, args.out_dir)
        print(json.dumps(figures["offload"]), flush=True)
    (args.out_dir / "engine.json").write_text(json.dumps(figures, indent=2) + "\n")
    print_table(figures)
    return 0


def print_table(figures: dict[str, Any]) -> None:
    print(f"\n{figures['device']}  {figures['model']} ({figures['weights']} weights, {figures['dtype']})")
    for row in figures.get("harness_vs_kvprof", []):
        print(f"batch {row['batch_size']:>3}: harness step {row['harness_step_ms_median']:.2f} ms, kvprof ITL "
              f"{row['kvprof_itl_ms_median']:.2f} ms ({row['itl_over_harness']:.3f}x); TTFT harness "
              f"{row['harness_ttft_ms_median']:.1f} ms, kvprof {row['kvprof_ttft_ms_median']:.1f} ms "
              f"({row['ttft_over_harness']:.3f}x); limit {row['bandwidth_limit_ms']:.2f} ms = "
              f"{row['roofline_fraction']:.0%} of the ITL")
    for row in figures.get("overhead", []):
        print(f"overhead batch {row['batch_size']}: on/off {row['ratio_on_over_off']:.4f}, IQR/median "
              f"on {row['iqr_over_median_on']:.4f} off {row['iqr_over_median_off']:.4f}")
    for mode, row in figures.get("offload", {}).items():
        fetch = row.get("fetch", {}).get("all", {})
        peak = max(figures["pinned_h2d_GBps"].values())
        print(f"offload {mode}: {row['decode_ms_per_token_median']} ms/token, stall "
              f"{row.get('kv_transfer_ms_per_step', 0)} ms/step, fetch {fetch.get('GBps')} GB/s "
              f"({fetch.get('GBps', 0) / peak:.0%} of {peak} GB/s pinned)")


if __name__ == "__main__":
    sys.exit(main())
