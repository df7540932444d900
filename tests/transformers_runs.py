"""Helpers for tests that run cache policies on the transformers runner directly."""

from __future__ import annotations

from pathlib import Path

from kvprof import Profiler, Request, RunInfo, WorkloadParams, WorkloadSpec
from kvprof.plugins import load_plugins
from kvprof.trace import Trace, read_trace
from kvprof_transformers.loading import LoadedModel
from kvprof_transformers.runner import CachePolicy, Runner


def run_policy(loaded: LoadedModel, policy: CachePolicy, requests: list[Request], path: Path,
               detail: str = "layer") -> tuple[list[list[int]], Trace]:
    """Run `requests` as one batch under `policy`; the generated ids and the trace."""
    run = RunInfo(strategy=policy.name, model={}, workload={}, options={}, trace_path=str(path), detail=detail)
    profiler = Profiler(load_plugins().manager, run)
    profiler.start()
    try:
        outputs = Runner(loaded, policy, profiler, detail=detail).run(requests, batch_size=len(requests))
    finally:
        profiler.end()
    return outputs, read_trace(path)


def build_requests(loaded: LoadedModel, workload: str, **params: int | float) -> list[Request]:
    """A workload's requests for the loaded model's tokenizer."""
    spec = WorkloadSpec(workload, WorkloadParams(**params))
    vocab = loaded.config.get_text_config().vocab_size
    return spec.build(loaded.encode, loaded.chat_wrapping(), vocab_size=vocab).requests


def offload_events(trace: Trace) -> list[dict]:
    return trace.of_kind("offload").to_pylist()
