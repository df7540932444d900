"""The study's transformers-side points in one process (one device call): Figs 1 and 4 of arXiv
2604.05012 for `full`, `offload`, `h2o` and `infinigen` on one loaded model.

    python benchmarks/study_h200.py OUT_DIR                # the H200 run: random Llama-3.1-8B, bf16
    python benchmarks/study_h200.py OUT_DIR --smoke        # tiny model on the CPU: checks that it runs

`kvprof sweep` (benchmarks/grids/) builds the model again for every point (11 s for Llama-3-8B on
the H200), which a 600 s device call cannot afford for dozens of points; this runs the same
strategies through the same in-process path as the other GPU benchmarks (`common.run_strategy`),
one model build for all. Per strategy one warm-up run (2K prompt, batch 1, 4 tokens) first; then:

* Fig 1, TTFT against prompt length: batch 1, prompts `--prompts`, `--ttft-output-len` new tokens;
* Fig 4, decode throughput and memory against batch size: prompt 2K, batches `--batches`,
  `--output-len` new tokens;

each point once (one round: the H200 is quiet, but say so next to the figures). Each point's figures
come from its trace (`kvprof analyze`'s summary): TTFT, ITL median and p99, decode throughput, E2E,
device and host KV peaks, the profiler's share. A point that fails (memory) is recorded with its
error and the grid goes on. Writes OUT_DIR/study.json after every point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import run_strategy, synthetic  # noqa: E402
from kvprof.analysis.summary import summary as trace_summary  # noqa: E402
from kvprof.models import resolve_model  # noqa: E402
from kvprof.plugins import load_plugins  # noqa: E402
from kvprof.trace import read_trace  # noqa: E402
from kvprof_transformers.loading import load_model  # noqa: E402

STRATEGIES = ("full", "offload", "h2o", "infinigen")


def figures_of(path: Path) -> dict[str, Any]:
    stats = trace_summary(read_trace(path))
    latency, kv = stats["latency_ms"], stats["kv_bytes"]
    return {"ttft_ms": latency["ttft"]["median"], "itl_ms_median": latency["itl"]["median"],
            "itl_ms_p99": latency["itl"]["p99"], "e2e_ms_median": latency["e2e"]["median"],
            "decode_tokens_per_s": stats["throughput_tokens_per_s"].get("decode"),
            "kv_device_peak_bytes": kv["device"]["peak"], "kv_host_peak_bytes": (kv.get("host") or {}).get("peak"),
            "profiler_cost_share": stats["run"]["profiler_cost_share"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--prompts", default="2048,8192,32768")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--ttft-output-len", type=int, default=8)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    device, model = ("cpu", "tiny-llama") if args.smoke else ("cuda", "llama-3.1-8b")
    if args.smoke:
        args.prompts, args.batches = "64,128", "1,2"
    base_prompt = min(2048, min(map(int, args.prompts.split(","))))
    strategies = args.strategies.split(",")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(model, "random")
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(spec, device)
    registry = load_plugins().registry
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "model": spec.name, "weights": "random", "dtype": str(loaded.dtype),
                              "load_s": round(time.perf_counter() - started, 1), "rounds": 1, "points": []}
    for name in strategies:
        run_strategy(registry, name, spec, loaded, {}, synthetic(base_prompt, 4, 1), None)
    plan = [("fig1", name, prompt, 1, args.ttft_output_len)
            for prompt in map(int, args.prompts.split(",")) for name in strategies]
    plan += [("fig4", name, base_prompt, batch, args.output_len)
             for batch in map(int, args.batches.split(",")) for name in strategies]
    for figure, name, prompt, batch, output_len in plan:
        point: dict[str, Any] = {"figure": figure, "strategy": name, "prompt_len": prompt, "batch_size": batch,
                                 "output_len": output_len}
        path = args.out_dir / f"{figure}-{name}-p{prompt}-b{batch}.arrow"
        began = time.perf_counter()
        try:
            run_strategy(registry, name, spec, loaded, {}, synthetic(prompt, output_len, batch), path)
            point |= figures_of(path)
        except Exception as exc:  # noqa: BLE001 - a point that does not fit: recorded, the grid goes on
            point["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
            torch.cuda.empty_cache() if device == "cuda" else None
        point["wall_s"] = round(time.perf_counter() - began, 1)
        path.unlink(missing_ok=True)
        result["points"].append(point)
        print(json.dumps(point), flush=True)
        (args.out_dir / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}  {result['model']} ({result['weights']}, {result['dtype']}), one round per point")
    for p in result["points"]:
        head = f"{p['figure']} {p['strategy']:<9} p{p['prompt_len']:<6} b{p['batch_size']:<3}"
        if "error" in p:
            print(f"{head} failed: {p['error'][:100]}")
            continue
        tput = p["decode_tokens_per_s"]
        print(f"{head} TTFT {p['ttft_ms']:9.1f} ms  ITL {p['itl_ms_median']:7.2f} ms (p99 {p['itl_ms_p99']:7.2f})  "
              f"decode {tput if tput is None else round(tput):>6} tok/s  device KV "
              f"{p['kv_device_peak_bytes'] / 2**30:6.2f} GiB  profiler {p['profiler_cost_share']:.2%}")


if __name__ == "__main__":
    raise SystemExit(main())
