"""What the GPU benchmarks share: one in-process `kvprof trace` run on a loaded model."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvprof import Profiler, RunContext, RunInfo, WorkloadParams, WorkloadSpec
from kvprof.plugins import Registry, load_plugins
from kvprof.strategy import parse_options
from kvprof_transformers.loading import LoadedModel
from kvprof_transformers.plugin import TransformersStrategy


def on_loaded_model(registry: Registry, name: str) -> TransformersStrategy:
    """A strategy that can run on a model already loaded (the transformers engine's)."""
    strategy = registry.strategy(name)()
    if not isinstance(strategy, TransformersStrategy):
        raise SystemExit(f"{name}: not a transformers strategy, it cannot run on a loaded model")
    return strategy


def run_strategy(registry: Registry, name: str, spec: Any, loaded: LoadedModel, raw_options: dict[str, str],
                 workload: WorkloadSpec, trace_path: Path | None, detail: str = "layer") -> None:
    """One in-process `kvprof trace` run on the loaded model; without a trace path the run
    attaches no sinks (warm-up)."""
    strategy_cls = registry.strategy(name)
    options = parse_options(strategy_cls.options, raw_options)
    run = RunInfo(strategy=name, model=spec.to_dict(),
                  workload={"name": workload.name, "params": vars(workload.params)},
                  options=options, device=str(loaded.device), trace_path=str(trace_path) if trace_path else None,
                  sinks_enabled=trace_path is not None, seed=workload.params.seed, detail=detail)
    profiler = Profiler(load_plugins().manager, run)
    context = RunContext(model=spec, workload=workload, options=options, profiler=profiler,
                         device=str(loaded.device), seed=workload.params.seed, detail=detail)
    error = None
    try:
        on_loaded_model(registry, name).run_loaded(context, loaded)
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


def ms_per_layer(body: Any, layers: int, repeats: int, device: str) -> float:
    """Milliseconds per layer of `body` (all layers' work): on a GPU captured once in a CUDA graph
    and replayed, timed with CUDA events; on a CPU timed with the host clock. The median."""
    if device != "cuda":
        body()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            body()
            times.append((time.perf_counter() - started) * 1e3 / layers)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the graph
        body()
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / layers)
    return statistics.median(times)
