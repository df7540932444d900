"""kvprof's own cost on the transformers engine: decode time per token with every sink on
against kvprof's hooks off, interleaved, with medians and inter-quartile ranges.

    python benchmarks/overhead.py                       # embedded SmolLM2 on this machine
    python benchmarks/overhead.py --device cuda --model llama-3-8b --weights random --prompt-len 1024
    python benchmarks/overhead.py --engine vllm         # real vLLM: see overhead_vllm.py for its options

Decode time per token = (T(prompt + N tokens) - T(prompt + 1 token)) / (N - 1), each T the wall
time of one `kvprof trace`-equivalent run on the loaded model (the device synchronised at its
end), so prefill cancels out. "on" attaches every sink kvprof attaches for a real run (the Arrow
writer, NVML and NVTX on CUDA) at the default detail; "off" disables the profiler: no events, no
KV-byte accounting, no samples. A warm-up pair runs first and is excluded; then on and off
alternate, `--repeats` times each, so drift hits both alike. On CUDA the SM clock (NVML) is
recorded before and after, so a throttled run shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import on_loaded_model  # beside this file
from kvprof import ModelSpec, Profiler, RunContext, RunInfo, WorkloadParams, WorkloadSpec
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.strategy import parse_options
from kvprof_transformers.loading import LoadedModel, load_model


def timed_run(loaded: LoadedModel, spec: ModelSpec, strategy: str, workload: WorkloadSpec, enabled: bool,
              trace_dir: Path) -> float:
    """Seconds of one run of `strategy` on the loaded model, profiler on (all sinks) or off."""
    registry = load_plugins().registry
    strategy_cls = registry.strategy(strategy)
    options = parse_options(strategy_cls.options, {})
    device = str(loaded.device)
    run = RunInfo(strategy=strategy, model={}, workload={"name": workload.name, "params": vars(workload.params)},
                  options=options, device=device,
                  trace_path=str(trace_dir / f"{time.monotonic_ns()}.arrow") if enabled else None,
                  sinks_enabled=enabled)
    profiler = Profiler(load_plugins().manager, run, enabled=enabled)
    context = RunContext(model=spec, workload=workload, options=options, profiler=profiler, device=device)
    started = time.perf_counter()
    on_loaded_model(registry, strategy).run_loaded(context, loaded)
    _synchronize(loaded)
    elapsed = time.perf_counter() - started
    profiler.end()
    return elapsed


def measure_overhead(loaded: LoadedModel, spec: ModelSpec, strategy: str, prompt_len: int, output_len: int, batch: int,
                     repeats: int, trace_dir: Path) -> dict[str, Any]:
    """Interleaved on/off decode time per token; medians, IQRs and the SM clock."""

    def workload(tokens: int) -> WorkloadSpec:
        return WorkloadSpec("synthetic", WorkloadParams(prompt_len=prompt_len, output_len=tokens,
                                                        num_prompts=batch, batch_size=batch))

    long_run, short_run = workload(output_len), workload(1)

    def per_token(enabled: bool) -> float:
        full = timed_run(loaded, spec, strategy, long_run, enabled, trace_dir)
        prefill = timed_run(loaded, spec, strategy, short_run, enabled, trace_dir)
        return (full - prefill) / (output_len - 1)

    clocks_before = sm_clock_mhz(loaded)
    per_token(False), per_token(True)  # warm-up pair, excluded
    samples: dict[bool, list[float]] = {True: [], False: []}
    for index in range(repeats):
        for enabled in ((False, True) if index % 2 == 0 else (True, False)):
            samples[enabled].append(per_token(enabled))
    off, on = statistics.median(samples[False]), statistics.median(samples[True])
    return {
        "strategy": strategy, "device": str(loaded.device), "prompt_len": prompt_len, "output_len": output_len,
        "batch_size": batch, "repeats": repeats,
        "decode_ms_per_token_hooks_off": off * 1e3, "decode_ms_per_token_sinks_on": on * 1e3,
        "ratio_on_over_off": on / off,
        "iqr_over_median_off": iqr(samples[False]) / off, "iqr_over_median_on": iqr(samples[True]) / on,
        "samples_off_ms": [x * 1e3 for x in samples[False]], "samples_on_ms": [x * 1e3 for x in samples[True]],
        "sm_clock_mhz_before": clocks_before, "sm_clock_mhz_after": sm_clock_mhz(loaded),
    }


def iqr(values: list[float]) -> float:
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def sm_clock_mhz(loaded: LoadedModel) -> int | None:
    """The GPU's current SM clock from NVML (None off CUDA or without NVML)."""
    if loaded.device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(loaded.device.index or 0)
        return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:  # noqa: BLE001 - a missing NVML only loses this figure
        return None


def _synchronize(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        import torch

        torch.cuda.synchronize(loaded.device)


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
    parser.add_argument("--strategy", default="full")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    spec = resolve_model(args.model, args.weights)
    loaded = load_model(spec, args.device)
    with tempfile.TemporaryDirectory() as folder:
        figures = measure_overhead(loaded, spec, args.strategy, args.prompt_len, args.output_len, args.batch_size,
                                   args.repeats, Path(folder))
    print(f"decode time per token, median of {args.repeats} interleaved ({args.model}, {args.device}, "
          f"prompt {args.prompt_len}, batch {args.batch_size}):")
    off, on = figures["decode_ms_per_token_hooks_off"], figures["decode_ms_per_token_sinks_on"]
    print(f"  hooks off : {off:8.3f} ms  (IQR {figures['iqr_over_median_off']:.2%})")
    print(f"  sinks on  : {on:8.3f} ms  (IQR {figures['iqr_over_median_on']:.2%})")
    print(f"  ratio on/off: {figures['ratio_on_over_off']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
