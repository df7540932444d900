"""Registers the transformers-runner strategies: `full` (and `offload`, see offload.py).

Importing this module imports neither torch nor transformers (kvprof loads every plugin for
`kvprof plugins` and `kvprof analyze`): the runner, loading and policy modules are imported by
the methods that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvprof import Option, Profiler, RunContext, RunInfo, Strategy, hookimpl

if TYPE_CHECKING:  # the modules below import torch: `kvprof plugins` must not pay for it
    from kvprof_transformers.loading import LoadedModel
    from kvprof_transformers.runner import CachePolicy


class TransformersStrategy(Strategy):
    """A strategy that runs on the transformers runner: subclasses supply the CachePolicy.

    `run` loads the model, builds the workload with its tokenizer, records both in the run's
    metadata, starts the profiler and runs the requests in batches of the workload's batch size.
    """

    attn_implementation = "sdpa"

    def make_policy(self, loaded: LoadedModel, options: dict) -> CachePolicy:
        raise NotImplementedError

    def policy_metadata(self, policy: CachePolicy) -> dict:
        """What the trace's run metadata (`extra`) should say about the policy, beyond its name."""
        return {}

    def run(self, ctx: RunContext) -> None:
        """Load the model, or reuse the one the last run of this process loaded (model_cache.py:
        the run metadata says which), and run on it; afterwards the model is put back as loaded."""
        from kvprof_transformers.model_cache import MODELS

        loaded, how = MODELS.get(ctx.model, ctx.device, ctx.dtype, self.attn_implementation, ctx.seed)
        ctx.profiler.run.extra.update(how)
        try:
            self.run_loaded(ctx, loaded)
        finally:
            MODELS.release(loaded)

    def run_loaded(self, ctx: RunContext, loaded: LoadedModel) -> None:
        """`run` on a model already loaded (benchmarks run several strategies on one model)."""
        from kvprof_transformers.runner import Runner

        self.check_options(ctx.options)  # `kvprof trace` checked them before loading; benchmarks come here
        policy = self.make_policy(loaded, ctx.options)
        vocab = loaded.config.get_text_config().vocab_size
        workload = ctx.workload.build(loaded.encode, loaded.chat_wrapping(), vocab_size=vocab)
        run = ctx.profiler.run
        run.workload = workload.describe()
        run.deviations = self.describe_deviations()
        run.extra.update(
            weights_bytes=loaded.weights_bytes(), dtype=str(loaded.dtype).removeprefix("torch."),
            attn_implementation=self.attn_implementation, policy=policy.name,
            architecture=loaded.config.to_dict().get("architectures"),
            num_layers=loaded.config.get_text_config().num_hidden_layers,
            warmup_runs=ctx.warmup_runs, **self.policy_metadata(policy),
        )
        budget = self.kv_budget(ctx.options)
        if budget is not None and "kv_budget" not in run.extra:
            run.extra["kv_budget"] = budget.to_dict()
        batch_size = ctx.workload.params.batch_size
        for number in range(1, ctx.warmup_runs + 1):
            ctx.profiler.status(f"warm-up run {number}/{ctx.warmup_runs} (not traced)")
            warm_policy = self.make_policy(loaded, ctx.options)
            Runner(loaded, warm_policy, warmup_profiler(run), detail=ctx.detail).run(
                workload.requests[:batch_size], batch_size)
        # The trace starts once the policy has allocated its buffers and captured its graphs.
        runner = Runner(loaded, policy, ctx.profiler, detail=ctx.detail)
        runner.run(workload.requests, batch_size, on_ready=ctx.profiler.start)


def warmup_profiler(run: RunInfo) -> Profiler:
    """An enabled profiler on a manager without plugins: a warm-up run takes every path of the
    measured run, the policy's event code included, and its events go nowhere. On CUDA a
    kernel's first launch loads its module, which can stall the device; left to the measured
    run, the first use of H2O's event-path kernels cost one decode step 10 ms on the H200."""
    from kvprof.plugins import load_plugins

    return Profiler(load_plugins(entry_points=False).manager, run)


GRAPHS = Option("graphs", True, "capture the decode step in a CUDA graph (CUDA only; false: eager steps)")


class FullStrategy(TransformersStrategy):
    name = "full"
    description = "all KV on the device in a preallocated cache: the accuracy and speed baseline"
    options = (
        GRAPHS,
        Option("engine", "static", "static: kvprof's preallocated cache and graph-captured decode; "
               "eager: transformers' DynamicCache, one synchronised step at a time (the reference)",
               check=lambda v: None if v in ("static", "eager") else "must be static or eager"),
    )

    def make_policy(self, loaded: LoadedModel, options: dict) -> CachePolicy:
        from kvprof_transformers.runner import FullCachePolicy, StaticPolicy

        if options.get("engine", "static") == "eager":
            return FullCachePolicy()
        return StaticPolicy(graphs=options.get("graphs", True))

    def policy_metadata(self, policy: CachePolicy) -> dict:
        return {"engine": "static" if hasattr(policy, "graphs") else "eager",
                "cuda_graphs": bool(getattr(policy, "graphs", False))}


class OffloadStrategy(TransformersStrategy):
    name = "offload"
    description = ("whole-layer KV offload to host memory, each layer prefetched during the previous one "
                   "(the FlexGen-style baseline of InfiniGen)")
    options = (
        Option("overlap", True, "prefetch layer i+1 while layer i computes; false: fetch each layer when "
               "it is needed (FlexGen without overlap, the baseline of the InfiniGen paper)"),
        GRAPHS,
        Option("engine", "static", "static: pinned host store, graph-captured decode step with its copies; "
               "eager: transformers' cache and hooks, one synchronised step at a time (the reference)",
               check=lambda v: None if v in ("static", "eager") else "must be static or eager"),
    )

    def make_policy(self, loaded: LoadedModel, options: dict) -> CachePolicy:
        from kvprof_transformers.offload import HostOffloadPolicy, StaticOffloadPolicy

        if options.get("engine", "static") == "eager":
            return HostOffloadPolicy(overlap=options.get("overlap", True))
        return StaticOffloadPolicy(overlap=options.get("overlap", True), graphs=options.get("graphs", True))

    def policy_metadata(self, policy: CachePolicy) -> dict:
        return {"overlap": bool(getattr(policy, "overlap", True)),
                "engine": "static" if hasattr(policy, "graphs") else "eager",
                "cuda_graphs": bool(getattr(policy, "graphs", False))}


@hookimpl
def kvprof_register_strategies(register: Callable[[type], None]) -> None:
    register(FullStrategy)
    register(OffloadStrategy)
