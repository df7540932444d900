"""InfiniGen against whole-layer offload (both modes) and the all-on-device baseline, on one GPU.

    python benchmarks/infinigen_gpu.py OUT_DIR                      # the H200 run
    python benchmarks/infinigen_gpu.py OUT_DIR --configs 8192x1      # one prompt length x batch size
    python benchmarks/infinigen_gpu.py OUT_DIR --smoke               # seconds, on a CPU: checks that it runs

Llama-3-8B with random weights (timings and memory are faithful, accuracy is not), bf16, one
process, one loaded model. First, on a GPU, correctness checks of the fast engine's parts (`--checks`,
default on): the Triton row gather from mapped pinned memory against a plain gather, the GPU-timer
stamps (also inside a replayed CUDA graph), the graph-safe selection against the eager rule on
random scores, and, on a short prompt, the tokens of `infinigen` with a huge alpha and budget 1
against `full`'s and the selected positions of the fast engine against the eager one's. Then, per
configuration (prompt length x batch size of equal-length synthetic prompts), `full`, `offload`
(overlap=true), `offload` (overlap=false) and `infinigen` (defaults: alpha 5, partial ratio 0.2,
budget 0.2), all on the fast engine (graph-captured decode), in `--rounds` rounds; the first
`--skip-steps` decode steps of a run are left out of its figures (capture and first replays).
`--eager-offload` adds the old eager `offload` in both modes at the first configuration (the
engine whose overlapped mode was slower than its non-overlapped one).

Before the runs, one speculated layer's speculation at Llama-3-8B's shapes (`--speculation`,
slots x batch; see `time_speculation_layer`): the query (W_q, RoPE, partial skew), and the
scores and selection by the Triton kernels (radix select) against the bisection they replaced
and against the torch path, with their selections compared (`speculation_layer` in the JSON).

Figures per run, from its trace: decode ms per token (median, min, mean), fetch bandwidth of the
whole-layer and the speculated fetches (bytes over their GPU-timed copy spans) against the
pinned-copy peak measured first, and per step: speculation (side stream), gather (copy stream),
transfer stall (compute stream waiting), selected tokens. Ratios per configuration. Writes
OUT_DIR/figures.json after every configuration (a run cut short keeps what it finished).

Needs kvprof installed (`pip install --no-deps -e .`) and, for the random-weight alias, a
tokenizer in $KVPROF_CACHE (the embedded SmolLM2 checkpoint folder's tokenizer files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from common import ms_per_layer, run_strategy, synthetic
from kvprof.models import resolve_model
from kvprof.plugins import Registry, load_plugins
from kvprof.trace import Trace, read_trace
from kvprof_transformers.loading import LoadedModel, load_model

# (label, strategy, options)
RUNS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("full", "full", {}),
    ("offload_overlap", "offload", {"overlap": "true"}),
    ("offload_no_overlap", "offload", {"overlap": "false"}),
    ("infinigen", "infinigen", {}),
)
SKIP_STEPS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--traces", type=Path, default=None, help="where the traces go (default: OUT_DIR)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short prompt, CPU: checks that it runs")
    parser.add_argument("--configs", default="8192x1,32768x1,8192x8,32768x8", help="PROMPTxBATCH,...")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--output-len-large", type=int, default=10,
                        help="output tokens where prompt x batch > 128K (offload steps take seconds there)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runs", default=",".join(label for label, _, _ in RUNS))
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="infinigen option")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--eager-offload", action="store_true")
    parser.add_argument("--skip-steps", type=int, default=SKIP_STEPS)
    parser.add_argument("--speculation", default="8192x1,32768x1,8192x8,32768x8",
                        help="SLOTSxBATCH,... of the one-layer speculation micro-benchmark ('' for none)")
    parser.add_argument("--profile-eager-offload", action="store_true",
                        help="torch.profiler over the old eager offload (8K, batch 1), both modes: where its step goes")
    args = parser.parse_args(argv)

    device = "cpu" if args.smoke else "cuda"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    traces = args.traces or args.out_dir
    traces.mkdir(parents=True, exist_ok=True)
    spec = resolve_model("tiny-llama" if args.smoke else "llama-3-8b", "random")
    infinigen_options = dict(pair.split("=", 1) for pair in args.opt)
    if args.smoke:
        spec = dataclasses.replace(spec, name=f"{spec.name}-4l", config={**(spec.config or {}), "num_hidden_layers": 4})
        infinigen_options.setdefault("calibration_tokens", "64")
        args.configs, args.output_len, args.skip_steps = "96x1,96x2", 6, 1
        args.speculation = "256x1,256x2"
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(spec, device)
    figures: dict[str, Any] = {
        "device": describe_device(device), "model": spec.name, "weights": spec.weights, "dtype": str(loaded.dtype),
        "load_s": round(time.perf_counter() - started, 1), "infinigen_options": infinigen_options,
        "skip_steps": args.skip_steps, "torch": torch.__version__,
        "peak_h2d_GBps": peak_copy_bandwidth(device, (32, 256) if not args.smoke else (1,)),
    }
    if device == "cuda":
        from kvprof_transformers.host_store import _pinned_copy_capturable, _triton_available

        figures["whole_layer_fetch"] = "dma" if _pinned_copy_capturable(loaded.device) else "mapped-read kernel"
        figures["triton"] = _triton_available()
        from kvprof_transformers.host_store import _TRITON, _timer_works

        figures["gpu_timer_stamps"] = _timer_works(loaded.device)
        figures["triton_errors"] = {k: v for k, v in _TRITON.items() if k.endswith("_error")}
    print(json.dumps({k: figures[k] for k in ("device", "load_s", "peak_h2d_GBps")}), flush=True)
    out = args.out_dir / "figures.json"
    registry = load_plugins().registry
    if not args.no_checks and device == "cuda":
        figures["checks"] = gpu_checks(loaded, spec, registry, traces, infinigen_options)
        print("checks:", json.dumps(figures["checks"]), flush=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
    figures["speculation_layer"] = {}
    for config in filter(None, args.speculation.split(",")):
        slots, batch = map(int, config.split("x"))
        try:
            result = time_speculation_layer(device, batch, slots, layers=2 if args.smoke else 30)
        except Exception as exc:  # noqa: BLE001 - recorded; the end-to-end runs still run
            result = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        figures["speculation_layer"][config] = result
        print(f"speculation layer {config}: {json.dumps(result)}", flush=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
    wanted = args.runs.split(",")
    figures["configs"] = {}
    for index, config in enumerate(args.configs.split(",")):
        prompt_len, batch = map(int, config.split("x"))
        output_len = args.output_len_large if prompt_len * batch > 131072 else args.output_len
        entry = figures["configs"][config] = {"prompt_len": prompt_len, "batch_size": batch, "output_len": output_len,
                                              "runs": {}}
        runs = [r for r in RUNS if r[0] in wanted]
        if args.eager_offload and index == 0:
            runs += [("offload_eager_overlap", "offload", {"overlap": "true", "engine": "eager"}),
                     ("offload_eager_no_overlap", "offload", {"overlap": "false", "engine": "eager"})]
        for label, name, options in runs:
            if name == "infinigen":
                options = {**options, **infinigen_options}
            medians = []
            for round_index in range(args.rounds):
                path = traces / f"{label}-{prompt_len}x{batch}.arrow"
                before, begun = allocator_counters(device), time.perf_counter()
                try:
                    run_strategy(registry, name, spec, loaded, options, synthetic(prompt_len, output_len, batch), path)
                    summary = summarize(read_trace(path), args.skip_steps)
                except Exception as exc:  # noqa: BLE001 - record it, go on with the next run
                    summary = {"error": f"{type(exc).__name__}: {exc}"}
                    traceback.print_exc()
                    if options.get("engine", "static") == "static" and name != "full":
                        try:  # the same without graphs, to still have figures
                            run_strategy(registry, name, spec, loaded, {**options, "graphs": "false"},
                                         synthetic(prompt_len, output_len, batch), path)
                            summary["without_graphs"] = summarize(read_trace(path), args.skip_steps)
                        except Exception as again:  # noqa: BLE001
                            summary["without_graphs"] = {"error": f"{type(again).__name__}: {again}"}
                summary["wall_s"] = round(time.perf_counter() - begun, 2)
                summary["allocator"] = {k: v - before.get(k, 0) for k, v in allocator_counters(device).items()}
                if "decode_ms_per_token_median" in summary:
                    medians.append(summary["decode_ms_per_token_median"])
                    summary["decode_ms_per_token_median_by_round"] = medians
                entry["runs"][label] = summary
                print(f"{config} {label} round {round_index + 1}: {json.dumps(summary)}", flush=True)
        from kvprof_transformers.host_store import _HOST_HOLDERS, _HOST_POOL

        entry["host_store"] = ("cudaHostRegister" if _HOST_HOLDERS else "torch pinned") if _HOST_POOL else "none"
        entry["ratios"] = ratios(entry["runs"])
        entry["fractions"] = fractions(entry["runs"], max(figures["peak_h2d_GBps"].values()))
        print(f"{config} ratios {json.dumps(entry['ratios'])} fractions {json.dumps(entry['fractions'])}", flush=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
        if index == 0 and args.profile_eager_offload and device == "cuda":
            figures["eager_offload_profile"] = profile_eager_offload(registry, spec, loaded, args.out_dir)
            out.write_text(json.dumps(figures, indent=2) + "\n")
    from kvprof_infinigen.selection import _KERNELS
    from kvprof_transformers.host_store import _TRITON

    figures["triton_errors"] = {k: v for k, v in _TRITON.items() if k.endswith("_error")}
    figures["fused_selection_error"] = _KERNELS.get("failed")
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print_report(figures)
    print(f"traces and figures.json in {args.out_dir}")
    return 0


def gpu_checks(loaded: LoadedModel, spec: Any, registry: Registry, out_dir: Path,
               infinigen_options: dict[str, str]) -> dict[str, Any]:
    """The fast engine's parts on the GPU, against plain references (see the module doc)."""
    from kvprof_infinigen.selection import select_tokens, select_within_cap
    from kvprof_transformers.host_store import PinnedLayers, StepLog, gather_rows

    result: dict[str, Any] = {}
    device = loaded.device
    try:
        batch, heads, slots, dim, cap, count = 2, 8, 5000, 128, 1000, 700
        store = PinnedLayers(1, batch, heads, slots, dim, torch.bfloat16, device)
        store.keys[0].copy_(torch.randn(store.shape, dtype=torch.bfloat16))
        store.values[0].copy_(torch.randn(store.shape, dtype=torch.bfloat16))
        positions = torch.rand(batch, heads, slots, device=device).argsort(-1)[..., :cap].sort(-1).values
        keys = torch.zeros(batch, heads, cap + 1, dim, dtype=torch.bfloat16, device=device)
        values = torch.zeros_like(keys)
        gather_rows(store.device_keys[0], store.device_values[0], positions, torch.tensor([count], device=device),
                    keys, values)
        index = positions[..., :count].unsqueeze(-1).expand(-1, -1, -1, dim)
        reference = store.keys[0].to(device).gather(2, index), store.values[0].to(device).gather(2, index)
        result["gather_equal"] = bool(torch.equal(keys[:, :, :count], reference[0])
                                      and torch.equal(values[:, :, :count], reference[1]))
        result["gather_rows_past_count_untouched"] = bool((keys[:, :, count:] == 0).all())
        del store
        log = StepLog(4, 3, device)
        step = torch.zeros(1, dtype=torch.long, device=device)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            log.stamp(step, 0)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            log.stamp(step, 0)
            torch.cuda._sleep(2_000_000)
            log.stamp(step, 1)
            step += 1
        step.zero_()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        rows = [log.row(i) for i in range(3)]
        result["stamps_in_graph_us"] = [round((r[1] - r[0]) / 1e3, 1) for r in rows]
        result["stamps_ok"] = all(r[1] > r[0] > 0 for r in rows) and rows[1][0] > rows[0][1]
        mismatches = 0
        for trial in range(20):
            generator = torch.Generator(device=device).manual_seed(trial)
            held = 3000 + 50 * trial
            scores = torch.randn(2, 8, 4, 4096, device=device, generator=generator) * (1 + trial % 4)
            old_positions, old_count = select_tokens(scores[..., :held], 5.0, 819)
            masked = scores.clone()
            masked[..., held:] = float("-inf")
            new_positions, new_count = select_within_cap(masked, 5.0, 819, torch.tensor([held], device=device))
            n = int(old_count)
            if int(new_count) != n or not torch.equal(new_positions[..., :n], old_positions[..., :n]):
                mismatches += 1
        result["selection_mismatches_of_20"] = mismatches
        from kvprof_infinigen.selection import _KERNELS, fused_selection_available, select_fused

        if fused_selection_available(device):
            mismatches = 0
            for trial in range(10):
                generator = torch.Generator(device=device).manual_seed(100 + trial)
                held, cap = 3000 + 70 * trial, 819
                query = torch.randn(2, 8, 4, 25, device=device, generator=generator)
                keys = torch.randn(2, 8, 4096, 25, device=device, generator=generator)
                scores = torch.einsum("bkgc,bksc->bkgs", query, keys) * 0.3
                old_positions, old_count = select_tokens(scores[..., :held], 4.0, cap)
                positions = torch.zeros(2, 8, cap, dtype=torch.long, device=device)
                selected = torch.zeros(1, dtype=torch.long, device=device)
                select_fused(query, keys, 0.3, 4.0, cap, torch.tensor([held], device=device),
                             torch.empty(16, 4096, device=device), torch.empty(16, dtype=torch.int32, device=device),
                             positions, selected)
                n = int(old_count)
                if int(selected) != n or not torch.equal(positions[..., :n], old_positions[..., :n]):
                    mismatches += 1
            result["fused_selection_mismatches_of_10"] = mismatches
        result["fused_selection"] = fused_selection_available(device)
        result["fused_selection_error"] = _KERNELS.get("failed")
    except Exception as exc:  # noqa: BLE001
        result["parts_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    try:
        prompt, output = 512, 8
        workload = synthetic(prompt, output, 2)
        tokens = {}
        for label, name, options in (("full", "full", {}),
                                     ("infinigen_all", "infinigen", {"alpha": "1e9", "budget": "1.0"}),
                                     ("infinigen_all_eager", "infinigen",
                                      {"alpha": "1e9", "budget": "1.0", "engine": "eager"}),
                                     ("infinigen_eager", "infinigen", {"engine": "eager"}),
                                     ("infinigen_static", "infinigen", {})):
            path = out_dir / f"check-{label}.arrow"
            detail = "head" if label in ("infinigen_eager", "infinigen_static") else "layer"
            chosen = {**infinigen_options, **options} if name == "infinigen" else options
            run_strategy(registry, name, spec, loaded, chosen, workload, path, detail=detail)
            trace = read_trace(path)
            tokens[label] = [r["tokens"] for r in trace.of_kind("request_end").to_pylist()]
            if detail == "head":
                tokens[label + "_rows"] = sorted(
                    (e["step"], e["layer"], e["request_id"], e["kv_head"], tuple(e["positions"][0]))
                    for e in trace.of_kind("offload").to_pylist()
                    if e["dst_medium"] == "device" and e["positions"] is not None)
            tokens[label + "_text"] = [r["text"] for r in trace.of_kind("request_end").to_pylist()]
            path.unlink()
        result["infinigen_all_tokens_equal_full"] = tokens["infinigen_all_text"] == tokens["full_text"]
        # If they differ: where, and whether the eager engine (the reference) differs too (then it is
        # the attention's rounding over bf16 random weights, not the fast path's selection).
        result["infinigen_all_eager_tokens_equal_full"] = tokens["infinigen_all_eager_text"] == tokens["full_text"]
        result["infinigen_all_first_difference"] = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)) if x != y else None)
            for x, y in zip(tokens["infinigen_all_text"], tokens["full_text"])]
        result["infinigen_all_texts"] = {label: tokens[label + "_text"]
                                         for label in ("full", "infinigen_all", "infinigen_all_eager")}
        eager, static = tokens["infinigen_eager_rows"], tokens["infinigen_static_rows"]
        result["selected_rows_events"] = [len(eager), len(static)]
        first_step = [r for r in eager if r[0] == 0], [r for r in static if r[0] == 0]
        result["selected_rows_equal_step0"] = first_step[0] == first_step[1]
        result["selected_rows_equal_all_steps"] = eager == static
        same = sum(a == b for a, b in zip(eager, static))
        result["selected_rows_equal_fraction"] = round(same / max(len(eager), 1), 4)
        result["static_vs_eager_text_equal"] = tokens["infinigen_eager_text"] == tokens["infinigen_static_text"]
    except Exception as exc:  # noqa: BLE001
        result["tokens_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    return result


def profile_eager_offload(registry: Registry, spec: Any, loaded: LoadedModel, out_dir: Path) -> dict[str, Any]:
    """The old eager `offload`, both modes, 8K prompt, batch 1, 6 tokens, under torch.profiler: the
    host's and the device's busiest operations (self time), to see what bounds its step."""
    from torch.profiler import ProfilerActivity, profile

    result = {}
    for overlap in ("true", "false"):
        options = {"overlap": overlap, "engine": "eager"}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_strategy(registry, "offload", spec, loaded, options, synthetic(8192, 6, 1), None)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)
        cuda_table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=8,
                                               max_name_column_width=48)
        print(f"eager offload overlap={overlap}\n{table}\n{cuda_table}", flush=True)
        (out_dir / f"eager-offload-overlap-{overlap}-profile.txt").write_text(table + "\n" + cuda_table)
        events = prof.key_averages()
        result[f"overlap={overlap}"] = {
            "self_cpu_ms_top": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in
                                sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]},
            "self_device_ms_top": {e.key: round(getattr(e, "self_device_time_total", 0) / 1e3, 2) for e in
                                   sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:6]},
        }
    return result


# --- one layer's speculation ---------------------------------------------------------------------

# Llama-3-8B: 32 query heads in 8 KV groups, head_dim 128, hidden 4096; InfiniGen's defaults.
LLAMA3_8B = dict(hidden=4096, kv_heads=8, group=4, head_dim=128)
PARTIAL, ALPHA, BUDGET, UNHELD = 0.2, 5.0, 0.2, 32


def speculation_state(device: str, batch: int, slots: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One speculated layer's inputs at Llama-3-8B's shapes (bf16): its W_q, partial skew and
    partial key cache (the last `UNHELD` slots not held yet: NaN there, as unwritten memory may be),
    and a decode step's attention input with its RoPE cos/sin."""
    hidden, kv_heads, group, dim = (LLAMA3_8B[k] for k in ("hidden", "kv_heads", "group", "head_dim"))
    width = int(dim * PARTIAL)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=generator) * scale).to(torch.bfloat16)

    keys = normal(batch, kv_heads, slots, width)
    keys[:, :, slots - UNHELD:] = float("nan")
    angles = torch.rand(batch, 1, dim // 2, device=device, generator=generator) * 6.28
    cos, sin = (part.repeat(1, 1, 2).to(torch.bfloat16) for part in (angles.cos(), angles.sin()))
    return {"w_q": normal(kv_heads * group * dim, hidden, scale=hidden ** -0.5), "hidden": normal(batch, 1, hidden),
            "skew": normal(kv_heads, dim, width, scale=dim ** -0.5), "keys": keys, "cos": cos, "sin": sin}


def speculative_query(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fast engine's query part of the speculation (AttentionAccess.query, then the partial
    skew): ``[batch, kv_heads, group, partial]``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    kv_heads, group, dim = state["skew"].shape[0], LLAMA3_8B["group"], LLAMA3_8B["head_dim"]
    batch = state["hidden"].shape[0]
    query = torch.nn.functional.linear(state["hidden"], state["w_q"]).view(batch, 1, -1, dim).transpose(1, 2)
    query, _ = apply_rotary_pos_emb(query, query, state["cos"], state["sin"])
    grouped = query[:, :, -1].view(batch, kv_heads, group, dim)
    return torch.einsum("bkgd,kdc->bkgc", grouped, state["skew"]).contiguous()


class SpeculationOutputs:
    """The fixed buffers a speculation writes (shared by the layers, as in the fast engine)."""

    def __init__(self, device: str, batch: int, slots: int) -> None:
        kv_heads = LLAMA3_8B["kv_heads"]
        self.cap = max(1, int(BUDGET * slots))
        self.held = torch.tensor([slots - UNHELD], device=device)
        self.scratch = torch.zeros(batch * kv_heads, slots, device=device)
        self.row_counts = torch.zeros(batch * kv_heads, dtype=torch.int32, device=device)
        self.positions = torch.zeros(batch, kv_heads, self.cap, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)

    def select(self, path: str, partial_query: torch.Tensor, keys: torch.Tensor) -> None:
        """`path`: "radix" or "bisection" (the Triton kernels), or "torch" (the fast engine's path
        without them: speculative scores over every slot, -inf past `held`, select_within_cap)."""
        from kvprof_infinigen.selection import select_fused, select_within_cap

        scaling = LLAMA3_8B["head_dim"] ** -0.5
        if path == "torch":
            scores = torch.einsum("bkgc,bksc->bkgs", partial_query, keys).float().mul_(scaling)
            slot_ids = torch.arange(scores.shape[-1], device=scores.device)
            scores.masked_fill_(slot_ids >= self.held, float("-inf"))
            positions, count = select_within_cap(scores, ALPHA, self.cap, self.held)
            self.positions.copy_(positions)
            self.count.copy_(count)
            return
        select_fused(partial_query, keys, scaling, ALPHA, self.cap, self.held, self.scratch, self.row_counts,
                     self.positions, self.count, bisection=path == "bisection")

    def selected(self) -> tuple[int, torch.Tensor]:
        count = int(self.count)
        return count, self.positions[..., :count].clone()


def time_speculation_layer(device: str, batch: int, slots: int, layers: int = 30,
                           repeats: int = 20) -> dict[str, Any]:
    """One speculated layer's speculation at Llama-3-8B's shapes (bf16, alpha 5, partial 0.2,
    budget 0.2 of `slots`, the last 32 slots not held), per layer, each part captured in a CUDA
    graph over `layers` separate layers' states (their W_q and partial keys not still in L2),
    timed with CUDA events: the median over `repeats` replays (on a CPU: the host clock, no graph,
    torch parts only). Parts: "query_ms" (W_q, RoPE, partial skew), "select_ms" (the Triton kernels'
    scores and radix select), "select_bisection_ms" (the same with the bisection select before it),
    "select_torch_ms" (the torch path). Then, on every layer's inputs: the count and positions of
    the radix select against the bisection's and against select_within_cap over the kernels' own
    per-slot scores (the same floats: equal unless the select is wrong)."""
    from kvprof_infinigen.selection import fused_selection_available, select_within_cap

    generator = torch.Generator(device).manual_seed(slots + batch)
    states = [speculation_state(device, batch, slots, generator) for _ in range(layers)]
    queries = [speculative_query(state) for state in states]
    outputs = SpeculationOutputs(device, batch, slots)
    fused = fused_selection_available(torch.device(device))
    result: dict[str, Any] = {"slots": slots, "batch_size": batch, "layers": layers, "cap": outputs.cap,
                              "held": int(outputs.held), "fused": fused}

    def every_layer_query() -> None:
        for state in states:
            speculative_query(state)

    result["query_ms"] = round(ms_per_layer(every_layer_query, layers, repeats, device), 4)
    for name, path in (("select_ms", "radix"), ("select_bisection_ms", "bisection"), ("select_torch_ms", "torch")):
        if path != "torch" and not fused:
            continue

        def every_layer(path: str = path) -> None:
            for state, query in zip(states, queries):
                outputs.select(path, query, state["keys"])

        result[name] = round(ms_per_layer(every_layer, layers, repeats, device), 4)
    if fused:
        result["select_speedup_over_bisection"] = round(result["select_bisection_ms"] / result["select_ms"], 2)
        equal_bisection = equal_torch = 0
        counts = []
        for state, query in zip(states, queries):
            outputs.select("bisection", query, state["keys"])
            bisection = outputs.selected()
            outputs.select("radix", query, state["keys"])
            radix = outputs.selected()
            per_slot = outputs.scratch.view(batch, LLAMA3_8B["kv_heads"], 1, slots)
            positions, count = select_within_cap(per_slot, ALPHA, outputs.cap, outputs.held)
            equal_bisection += radix[0] == bisection[0] and torch.equal(radix[1], bisection[1])
            equal_torch += radix[0] == int(count) and torch.equal(radix[1], positions[..., :radix[0]])
            counts.append(radix[0])
        result.update(layers_equal_to_bisection=equal_bisection, layers_equal_to_torch_rule=equal_torch,
                      selected_mean=round(statistics.fmean(counts), 1))
    return result


# --- runs ----------------------------------------------------------------------------------------


def peak_copy_bandwidth(device: str, sizes_mib: tuple[float, ...], repeats: int = 10) -> dict[str, float]:
    """GB/s of a plain copy from pinned host memory to the device, median of `repeats`, per size
    (on a CPU device: a host memcpy, timed with the host clock)."""
    cuda = device.startswith("cuda")
    result = {}
    for size in sizes_mib:
        count = int(size * 2**20)
        host = torch.empty(count, dtype=torch.uint8, pin_memory=cuda)
        target = torch.empty(count, dtype=torch.uint8, device=device)
        target.copy_(host, non_blocking=True)  # warm-up
        seconds = []
        for _ in range(repeats):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                target.copy_(host, non_blocking=True)
                end.record()
                end.synchronize()
                seconds.append(begin.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                target.copy_(host)
                seconds.append(time.perf_counter() - started)
        result[f"{size:g}"] = round(count / statistics.median(seconds) / 1e9, 2)
        del host, target
    return result


# --- figures from traces ----------------------------------------------------------------------------


def summarize(trace: Trace, skip_steps: int = 0) -> dict[str, Any]:
    """Decode time per token, prefill time, fetch bandwidth and the strategy's phases per step,
    over the decode steps from `skip_steps` on."""
    steps = [s for s in trace.of_kind("decode_step").to_pylist() if s["step"] >= skip_steps]
    kept = {s["step"] for s in steps}
    decode_ms = [(s["end_ns"] - s["start_ns"]) / 1e6 for s in steps]
    prefill = trace.of_kind("prefill").to_pylist()[0]
    result: dict[str, Any] = {
        "decode_ms_per_token_median": round(statistics.median(decode_ms), 3),
        "decode_ms_per_token_mean": round(statistics.fmean(decode_ms), 3),
        "decode_ms_per_token_min": round(min(decode_ms), 3),
        "decode_steps": len(steps),
        "prefill_ms": round((prefill["end_ns"] - prefill["start_ns"]) / 1e6, 1),
        "kv_device_bytes": steps[-1]["kv_device_bytes"], "kv_host_bytes": steps[-1]["kv_host_bytes"],
        "aux_device_bytes": steps[-1]["aux_device_bytes"],
    }
    offloads = trace.of_kind("offload").to_pylist()
    fetches = [e for e in offloads if e["dst_medium"] == "device" and e["step"] in kept]
    if fetches:
        speculated = [e for e in fetches if dict(e["ext"] or {}).get("speculated") == 1.0]
        whole = [e for e in fetches if dict(e["ext"] or {}).get("speculated") != 1.0]
        result["fetch"] = {"all": bandwidth(fetches)}
        if whole:
            result["fetch"]["whole_layers"] = bandwidth(whole)
        if speculated:
            result["fetch"]["speculated_layers"] = bandwidth(speculated)
            exts = [dict(e["ext"]) for e in speculated]
            result["selected_tokens_mean"] = round(statistics.fmean(x["selected_tokens"] for x in exts), 1)
            result["selected_fraction_mean"] = round(
                statistics.fmean(x["selected_tokens"] / x["stored_tokens"] for x in exts), 4)
            result["gather_ms_per_step"] = round(sum(x["copy_ns"] for x in exts) / 1e6 / len(steps), 3)
        result["fetch_bytes_per_step"] = int(sum(dict(e["ext"]).get("copied_bytes", e["bytes"]) for e in fetches)
                                             // len(steps))
    stores = [e for e in offloads if e["src_medium"] == "device" and e["step"] is None]
    if stores:
        result["prefill_store"] = bandwidth(stores)
    phases = trace.of_kind("phase").to_pylist()
    for phase in sorted({p["phase"] for p in phases}):
        spent = sum(p["end_ns"] - p["start_ns"] for p in phases if p["phase"] == phase and p["step"] in kept)
        result[f"{phase}_ms_per_step"] = round(spent / 1e6 / len(steps), 3)
    return result


def bandwidth(copies: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes moved, their GPU-timed copy time, and GB/s overall and per copy (median)."""
    def moved(e: dict[str, Any]) -> float:  # a fixed-size copy moves more than the KV it carries
        return dict(e["ext"]).get("copied_bytes", e["bytes"])

    total_bytes = sum(moved(e) for e in copies)
    total_ns = sum(dict(e["ext"])["copy_ns"] for e in copies)
    per_copy = [moved(e) / dict(e["ext"])["copy_ns"] for e in copies if dict(e["ext"])["copy_ns"] > 0]
    return {"copies": len(copies), "MiB_per_copy": round(total_bytes / len(copies) / 2**20, 2),
            "GBps": round(total_bytes / total_ns, 2) if total_ns else 0.0,
            "GBps_median_copy": round(statistics.median(per_copy), 2) if per_copy else 0.0}


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Median decode time ratios: "offload_overlap/infinigen" > 1 means InfiniGen decodes faster."""
    decode = {name: s["decode_ms_per_token_median"] for name, s in runs.items() if "decode_ms_per_token_median" in s}
    pairs = [("offload_overlap", "infinigen"), ("offload_no_overlap", "infinigen"), ("infinigen", "full"),
             ("offload_overlap", "full"), ("offload_no_overlap", "offload_overlap"),
             ("offload_eager_overlap", "offload_eager_no_overlap"), ("offload_eager_overlap", "offload_overlap")]
    return {f"{a}/{b}": round(decode[a] / decode[b], 3) for a, b in pairs if a in decode and b in decode}


def fractions(runs: dict[str, dict[str, Any]], peak: float) -> dict[str, float]:
    """Fetch bandwidth against the pinned-copy peak; speculation and stall against the step."""
    result = {}
    for name, s in runs.items():
        for part, b in s.get("fetch", {}).items():
            if part != "all":
                result[f"{name}.{part}_of_peak"] = round(b["GBps"] / peak, 3)
        step = s.get("decode_ms_per_token_median")
        for phase in ("speculation", "kv_transfer"):
            if step and f"{phase}_ms_per_step" in s:
                result[f"{name}.{phase}_of_step"] = round(s[f"{phase}_ms_per_step"] / step, 3)
        if step and "fetch_bytes_per_step" in s:  # the step against moving its bytes at the peak
            result[f"{name}.transfer_floor_ms"] = round(s["fetch_bytes_per_step"] / peak / 1e6, 3)
    return result


def print_report(figures: dict[str, Any]) -> None:
    peak = max(figures["peak_h2d_GBps"].values())
    print(f"\n{figures['model']} ({figures['weights']} weights), {figures['device']}, pinned peak {peak} GB/s")
    if figures.get("speculation_layer"):
        print(f"one layer's speculation, ms: {'slots x batch':<14} {'query':>7} {'select':>7} {'bisection':>9} "
              f"{'torch':>7} {'equal':>6}")
        for config, s in figures["speculation_layer"].items():
            equal = (f"{s['layers_equal_to_bisection']}/{s['layers_equal_to_torch_rule']}"
                     if "layers_equal_to_bisection" in s else "")
            print(f"{'':<27} {config:<14} {s.get('query_ms', ''):>7} {s.get('select_ms', ''):>7} "
                  f"{s.get('select_bisection_ms', ''):>9} {s.get('select_torch_ms', ''):>7} {equal:>6}"
                  + (f" error: {s['error'][:100]}" if "error" in s else ""))
    print(f"{'config':<9} {'run':<26} {'ms/tok':>8} {'min':>8} {'fetch GB/s':>10} {'stall ms':>9} "
          f"{'spec ms':>8} {'gather ms':>9} {'selected':>8}")
    for config, entry in figures.get("configs", {}).items():
        for name, s in entry["runs"].items():
            if "error" in s:
                print(f"{config:<9} {name:<26} error: {s['error'][:120]}")
                continue
            fetch = s.get("fetch", {}).get("all", {}).get("GBps", "")
            print(f"{config:<9} {name:<26} {s['decode_ms_per_token_median']:>8} {s['decode_ms_per_token_min']:>8} "
                  f"{fetch:>10} {s.get('kv_transfer_ms_per_step', ''):>9} {s.get('speculation_ms_per_step', ''):>8} "
                  f"{s.get('gather_ms_per_step', ''):>9} {s.get('selected_tokens_mean', ''):>8}")
        print(f"{config:<9} ratios: " + ", ".join(f"{k} {v}" for k, v in entry["ratios"].items()))


def allocator_counters(device: str) -> dict[str, int]:
    """Cumulative CUDA caching-allocator counters: device allocations (cudaMalloc) and retries."""
    if not device.startswith("cuda"):
        return {}
    stats = torch.cuda.memory_stats(torch.device(device))
    return {key: int(stats.get(key, 0)) for key in ("num_device_alloc", "num_alloc_retries", "num_device_free")}


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
