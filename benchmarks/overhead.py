"""kvprof's own cost on the transformers runner: decode time per token with every sink on
versus kvprof's hooks off, as a ratio of medians over repeated, interleaved runs.

    python benchmarks/overhead.py                       # embedded SmolLM2 on this machine
    python benchmarks/overhead.py --device cuda --model llama-3-8b --weights random --prompt-len 2048
    python benchmarks/overhead.py --engine vllm         # real vLLM: see overhead_vllm.py for its options

Decode time per token = (T(prompt + N tokens) - T(prompt + 1 token)) / (N - 1), each T the wall
time of one batch through the runner, so prefill cancels out. "on" attaches every sink kvprof
would attach for a real run (the Arrow writer, the live progress display, NVML and NVTX on CUDA)
and emits at the finest default detail; "off" disables the profiler: no events, no KV-byte
measurement, no samples. Runs alternate on/off so drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvprof.profiler import Profiler, RunInfo, get_plugin_manager
from kvprof.models import resolve_model
from kvprof.workloads import WorkloadParams, WorkloadSpec
from kvprof_transformers.loading import load_model
from kvprof_transformers.runner import CachePolicy, Runner


def time_batch(loaded, requests, enabled: bool, trace_dir: Path, device: str) -> float:
    run = RunInfo(plugin="full", model={}, workload={}, options={}, device=device,
                  trace_path=str(trace_dir / f"{time.monotonic_ns()}.arrow") if enabled else None,
                  sinks_enabled=enabled, progress=enabled)
    profiler = Profiler(get_plugin_manager(), run, enabled=enabled)
    profiler.start()
    runner = Runner(loaded, CachePolicy(), profiler)
    runner.policy.bind(runner)
    start = time.perf_counter()
    runner.run_batch(requests)
    elapsed = time.perf_counter() - start
    profiler.end()
    return elapsed


def main() -> None:
    if "--engine" in sys.argv:
        choice = argparse.ArgumentParser(add_help=False)
        choice.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
        engine, rest = choice.parse_known_args()
        if engine.engine == "vllm":
            import overhead_vllm  # beside this file; vLLM is imported only for this engine

            sys.argv = [sys.argv[0], *rest]
            overhead_vllm.main()
            return
        sys.argv = [sys.argv[0], *rest]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    loaded = load_model(resolve_model(args.model, args.weights), args.device)
    vocab = loaded.config.get_text_config().vocab_size

    def requests(output_len: int):
        params = WorkloadParams(prompt_len=args.prompt_len, output_len=output_len,
                                num_prompts=args.batch_size, batch_size=args.batch_size)
        return WorkloadSpec("synthetic", params).build(loaded.encode, vocab_size=vocab).requests

    long_batch, short_batch = requests(args.output_len), requests(1)
    per_token: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        trace_dir = Path(folder)
        time_batch(loaded, long_batch, False, trace_dir, args.device)  # warm-up, excluded
        for _ in range(args.repeats):
            for enabled in (False, True):
                full = time_batch(loaded, long_batch, enabled, trace_dir, args.device)
                prefill = time_batch(loaded, short_batch, enabled, trace_dir, args.device)
                per_token[enabled].append((full - prefill) / (args.output_len - 1))

    off, on = statistics.median(per_token[False]), statistics.median(per_token[True])
    figures = {
        "model": args.model, "device": args.device, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "batch_size": args.batch_size, "repeats": args.repeats,
        "decode_ms_per_token_hooks_off": off * 1e3, "decode_ms_per_token_sinks_on": on * 1e3,
        "ratio_on_over_off": on / off,
        "spread_off_ms": [min(per_token[False]) * 1e3, max(per_token[False]) * 1e3],
        "spread_on_ms": [min(per_token[True]) * 1e3, max(per_token[True]) * 1e3],
    }
    print(f"decode time per token, median of {args.repeats} ({args.model}, {args.device}, "
          f"prompt {args.prompt_len}, batch {args.batch_size}):")
    print(f"  hooks off : {off * 1e3:8.2f} ms  (range {figures['spread_off_ms'][0]:.2f}-{figures['spread_off_ms'][1]:.2f})")
    print(f"  sinks on  : {on * 1e3:8.2f} ms  (range {figures['spread_on_ms'][0]:.2f}-{figures['spread_on_ms'][1]:.2f})")
    print(f"  ratio on/off: {on / off:.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
