"""H2O against the full cache at long prompts: KV bytes, peak memory and latency, from traces.

    python benchmarks/h2o_memory.py --device cuda                         # 2K and 16K-token prompts
    python benchmarks/h2o_memory.py --prompt-lens 512 --device cpu

One `full` run and one `h2o` run (default budget: heavy 10 % + recent 10 % of the prompt) per
prompt length, synthetic prompts, through `kvprof trace`; the traces stay under --out. Printed,
from each trace: KV bytes measured from the cache tensors after prefill and at the last decode
step, and from kvprof's summary the allocator's peak (GPU runs), TTFT and TPOT, and h2o's
ratio to full. A 16K prompt needs H2O's blocked attention scoring: eager attention would hold
9 x 16K x 16K float32 weights per layer of SmolLM2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvprof.analysis.summary import summary
from kvprof.cli import main as kvprof
from kvprof.trace import read_trace


def run(plugin: str, prompt_len: int, args: argparse.Namespace) -> dict:
    path = args.out / f"memory-{prompt_len}-{plugin}.arrow"
    command = ["trace", "--plugin", plugin, "--model", args.model, "--weights", args.weights,
               "--workload", "synthetic", "--prompt-len", str(prompt_len), "--output-len", str(args.output_len),
               "--batch-size", str(args.batch_size), "-o", str(path)]
    command += [f"--opt={option}" for option in (args.opt if plugin == "h2o" else [])]
    if args.device:
        command += ["--device", args.device]
    if kvprof(command) != 0:
        raise SystemExit(f"kvprof {' '.join(command)} failed")
    trace = read_trace(path)
    s = summary(trace)
    return {
        "kv_prefill": max(trace.of_kind("prefill")["kv_device_bytes"].to_pylist()),
        "kv_final": trace.of_kind("decode_step")["kv_device_bytes"].to_pylist()[-1],
        "allocated_peak": s["memory_peak_bytes"]["allocated"],
        "ttft_ms": s["latency_ms"]["ttft"]["median"], "tpot_ms": s["latency_ms"]["tpot"]["median"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--prompt-lens", default="2048,16384")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--opt", action="append", default=[], help="h2o option KEY=VALUE (repeatable)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("traces/h2o"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mib = 1 << 20
    print(f"{'prompt':>7} {'run':>5} {'KV after prefill':>17} {'KV last step':>13} {'peak alloc':>11} "
          f"{'TTFT ms':>9} {'TPOT ms':>8}")
    for prompt_len in (int(n) for n in args.prompt_lens.split(",")):
        results = {plugin: run(plugin, prompt_len, args) for plugin in ("full", "h2o")}
        for plugin, r in results.items():
            peak = f"{r['allocated_peak'] / mib:9.0f}Mi" if r["allocated_peak"] else f"{'-':>11}"
            print(f"{prompt_len:>7} {plugin:>5} {r['kv_prefill'] / mib:15.1f}Mi {r['kv_final'] / mib:11.1f}Mi {peak} "
                  f"{r['ttft_ms']:9.1f} {r['tpot_ms']:8.2f}")
        full, h2o = results["full"], results["h2o"]
        print(f"{prompt_len:>7} {'ratio':>5} {h2o['kv_prefill'] / full['kv_prefill']:17.3f} "
              f"{h2o['kv_final'] / full['kv_final']:13.3f}")


if __name__ == "__main__":
    main()
