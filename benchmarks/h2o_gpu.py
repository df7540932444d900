"""H2O against `full` on one GPU, on kvprof's fast engine (and the eager reference at batch 1).

    python benchmarks/h2o_gpu.py OUT_DIR            # the H200 run: random Llama-3-8B, 8K prompt
    python benchmarks/h2o_gpu.py OUT_DIR --smoke    # tiny model on the CPU: checks that it runs

First a check on the device: the fast path evicts exactly what the eager path evicts on a fixed
input (1024-token synthetic prompts, batch 2, 8 new tokens), compared per (request, step, layer);
again at the end with the model in float32 (`check_in_float32`).
Then one layer's prefill mass and one layer's decode step at Llama-3-8B's shapes, the torch path
against the Triton kernels (and, for the decode step, the victims of both compared over 16 steps).
Then per batch size (1 and 16): `full` and `h2o` (heavy 0.1 + recent 0.1), each after a warm-up
run, 32 new tokens: TTFT, ITL median and p99, device KV, and the profiler's own cost; `h2o` once
more at `--detail head` (batch 16) for the cost at the finest detail; the eager `h2o` at batch 1.
Prints a table and writes OUT_DIR/h2o.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ms_per_layer, run_strategy, synthetic  # noqa: E402
from kvprof.analysis.summary import Events, decode_steps  # noqa: E402
from kvprof.analysis.summary import summary as trace_summary  # noqa: E402
from kvprof.models import resolve_model  # noqa: E402
from kvprof.plugins import Registry, load_plugins  # noqa: E402
from kvprof.trace import read_trace  # noqa: E402
from kvprof_transformers.loading import load_model  # noqa: E402


def time_prefill_mass(device: str, batch: int, prompt_len: int, repeats: int = 3) -> dict[str, Any]:
    """One layer's prefill mass at Llama-3-8B's shapes: the torch pass against the Triton kernels
    (CUDA events, medians), and their largest difference relative to the largest mass."""
    from kvprof_h2o import fast
    from kvprof_h2o.mass_kernel import triton_mass

    if device != "cuda":
        return {}
    g = torch.Generator(device).manual_seed(0)
    query = torch.randn(batch, 32, prompt_len, 128, device=device, dtype=torch.bfloat16, generator=g)
    keys = torch.randn(batch, 8, prompt_len, 128, device=device, dtype=torch.bfloat16, generator=g)
    positions = torch.arange(prompt_len, device=device).repeat(batch, 1)
    out: dict[str, Any] = {"batch_size": batch, "prompt_len": prompt_len}
    torch_mass = fast.torch_prefill_mass(query, keys, positions, 0.088)
    triton = triton_mass(query, keys, positions, 0.088)
    out["torch_ms"] = _median_ms(lambda: fast.torch_prefill_mass(query, keys, positions, 0.088), repeats)
    out["triton_ms"] = _median_ms(lambda: triton_mass(query, keys, positions, 0.088), repeats)
    out["max_rel_diff"] = float((torch_mass - triton).abs().max() / torch_mass.max())
    out["tiles_ms"] = time_mass_tiles(query, keys, positions, repeats)
    out |= time_attention_with_lse(query, keys, positions, triton, repeats)
    return out


def _median_ms(fn: Any, repeats: int) -> float:
    """Median over `repeats` CUDA-event timings of `fn`, after one untimed call."""
    times = []
    for _ in range(repeats + 1):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return round(statistics.median(times[1:]), 2)


def time_attention_with_lse(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                            two_kernel_mass: torch.Tensor, repeats: int) -> dict[str, Any]:
    """The prefill attention as `full` runs it (SDPA with GQA) against each kernel that also returns
    the log-sum-exp (`fast.LSE_KERNELS`), and the mass kernel given that lse against both kernels."""
    from kvprof_h2o import fast
    from kvprof_h2o.mass_kernel import triton_mass
    from kvprof_transformers.static_cache import prefill_attention

    values = torch.randn_like(keys)
    reference = prefill_attention(query, keys, values, 0.088, None, 0)
    group = query.shape[1] // keys.shape[1]
    out: dict[str, Any] = {"sdpa_ms": _median_ms(lambda: prefill_attention(query, keys, values, 0.088, None, 0),
                                                 repeats)}
    for name, kernel in fast.LSE_KERNELS.items():
        try:
            output, lse = kernel(query, keys, values, 0.088)
        except Exception as exc:  # noqa: BLE001 - a kernel this build lacks: say so, go on
            out[name] = repr(exc)[:200]
            continue
        lse = lse.reshape(query.shape[:3])
        mass = triton_mass(query, keys, positions, 0.088, lse=lse)
        out[name] = {"with_lse_ms": _median_ms(lambda k=kernel: k(query, keys, values, 0.088), repeats),
                     "output_max_diff": float((output.transpose(1, 2).float() - reference.float()).abs().max()),
                     "mass_max_rel_diff": float((mass - two_kernel_mass).abs().max() / two_kernel_mass.max()),
                     "mass_conserved": fast._mass_is_conserved(mass, positions, group)}
    chosen = fast.attention_with_lse(query, keys, values, 0.088)
    if chosen is not None:
        out["mass_given_lse_ms"] = _median_ms(lambda: triton_mass(query, keys, positions, 0.088, lse=chosen[1]),
                                              repeats)
    out["attention_with_lse"] = chosen[2] if chosen else None
    out["attention_with_lse_ms"] = _median_ms(lambda: fast.attention_with_lse(query, keys, values, 0.088), repeats)
    return out


def time_mass_tiles(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                    repeats: int) -> dict[str, float | str]:
    """The Triton mass kernels at a few tile sizes and launch settings (medians, ms; the error's name
    where a tile does not fit), to choose the default."""
    from kvprof_h2o.mass_kernel import MassTiles, triton_mass

    out: dict[str, float | str] = {}
    for tiles in (MassTiles(), MassTiles(32, 64, 8, 3), MassTiles(64, 64, 8, 2),
                  MassTiles(32, 128, 8, 2), MassTiles(16, 64, 4, 3), MassTiles(16, 128, 4, 2),
                  MassTiles(16, 128, 8, 3), MassTiles(32, 128, 8, 3)):
        name = f"{tiles.block_m}x{tiles.block_n}w{tiles.warps}s{tiles.stages}"
        try:
            out[name] = _median_ms(lambda t=tiles: triton_mass(query, keys, positions, 0.088, t), repeats)
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit the shared memory: say so, go on
            out[name] = f"{type(exc).__name__}"
    return out


def decode_layer_state(device: str, batch: int, width: int, generator: torch.Generator, q_heads: int = 32,
                       kv_heads: int = 8, dim: int = 128, dtype: torch.dtype = torch.bfloat16,
                       prompt_len: int = 8192) -> dict[str, Any]:
    """One budgeted layer's decode state as after H2O's prefill of `prompt_len` tokens: width - 1
    slots hold half heavy hitters (random older positions, random scores) and half the recent
    window, in shuffled slots; the last slot is free."""
    from kvprof_h2o.fast import next_free

    kept = width - 1
    recent = kept // 2
    options: dict[str, Any] = {"device": device, "generator": generator}
    older = torch.rand(batch, kv_heads, prompt_len - recent, **options).argsort(-1)[..., :kept - recent]
    held = torch.cat([older.sort(-1).values,
                      torch.arange(prompt_len - recent, prompt_len, device=device).expand(batch, kv_heads, recent)], -1)
    positions = torch.full((batch, kv_heads, width), -1, dtype=torch.long, device=device)
    positions.scatter_(-1, torch.rand(batch, kv_heads, kept, **options).argsort(-1), held)
    scores = torch.rand(batch, kv_heads, width, **options) * (positions >= 0)
    state = {"cache_keys": torch.randn(batch, kv_heads, width, dim, **options).to(dtype),
             "cache_values": torch.randn(batch, kv_heads, width, dim, **options).to(dtype),
             "positions": positions, "scores": scores, "now": torch.full((batch, 1), prompt_len, device=device),
             "recent": torch.full((batch,), recent, device=device),
             "cap": torch.full((batch, 1, 1), width, device=device),
             "evicted": torch.full((64, batch, kv_heads), -1, dtype=torch.long, device=device),
             "step": torch.zeros(1, dtype=torch.long, device=device)}
    state["free"] = next_free(state["positions"], state["scores"], None, state["recent"], state["cap"])
    return state


def decode_layer_inputs(state: dict[str, Any], q_heads: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A step's query (B, Hq, 1, D) and new key and value (B, Hkv, 1, D), on the state's device."""
    batch, kv_heads, _, dim = state["cache_keys"].shape
    options = {"device": state["cache_keys"].device, "generator": generator}
    query = torch.randn(batch, q_heads, 1, dim, **options) * 2
    keys, values = (torch.randn(batch, kv_heads, 1, dim, **options) for _ in range(2))
    return tuple(t.to(state["cache_keys"].dtype) for t in (query, keys, values))


def decode_layer_step(path: str, state: dict[str, Any], inputs: tuple[torch.Tensor, ...],
                      splits: int | None = None) -> torch.Tensor:
    """One layer's decode step by `path` ("torch" or "kernel") on `state`, in place."""
    from kvprof_h2o.decode_kernel import fused_decode
    from kvprof_h2o.fast import torch_decode

    args = (*inputs, state["cache_keys"], state["cache_values"], state["positions"], state["scores"], state["free"],
            state["now"], state["recent"], state["cap"], state["evicted"], state["step"], 0.088)
    return torch_decode(*args) if path == "torch" else fused_decode(*args, splits=splits)


def compare_decode_paths(device: str, batch: int, width: int, steps: int = 16, q_heads: int = 32,
                         **shape: Any) -> dict[str, Any]:
    """The torch step and the kernels from the same state over `steps` steps: how many victims
    (step, row, KV head) differ, whether the free slots and positions end equal, and the largest
    differences of output and scores."""
    generator = torch.Generator(device).manual_seed(batch)
    reference = decode_layer_state(device, batch, width, generator, q_heads=q_heads, **shape)
    fused = {name: tensor.clone() for name, tensor in reference.items()}
    output_diff = 0.0
    for _ in range(steps):
        inputs = decode_layer_inputs(reference, q_heads, generator)
        expected, got = (decode_layer_step(path, state, inputs) for path, state in (("torch", reference),
                                                                                   ("kernel", fused)))
        output_diff = max(output_diff, float((expected.float() - got.float()).abs().max()))
        for state in (reference, fused):
            state["now"] += 1
            state["step"] += 1
    victims = reference["evicted"][:steps]
    return {"steps": steps, "victims": int((victims >= 0).sum()),
            "differing_victims": int((victims != fused["evicted"][:steps]).sum()),
            "free_equal": bool(torch.equal(reference["free"], fused["free"])),
            "positions_equal": bool(torch.equal(reference["positions"], fused["positions"])),
            "max_output_diff": output_diff,
            "max_score_diff": float((reference["scores"] - fused["scores"]).abs().max())}


def time_decode_layer(device: str, batch: int, width: int = 1640, layers: int = 32, repeats: int = 5,
                      sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 26)) -> dict[str, Any]:
    """One budgeted layer's decode step at Llama-3-8B's shapes (Hq 32, Hkv 8, D 128, bf16, `width`
    slots): the torch step against the kernels (at the default split and at each of `sweep`),
    each captured in a CUDA graph over `layers` separate layers' states (so the KV of one layer is
    not still in L2 for the next), timed with CUDA events: the median over `repeats` replays, per
    layer. Then the equality check of `compare_decode_paths`."""
    from kvprof_h2o.decode_kernel import default_splits

    if device != "cuda":
        return {}
    generator = torch.Generator(device).manual_seed(0)
    states = [decode_layer_state(device, batch, width, generator) for _ in range(layers)]
    inputs = [decode_layer_inputs(state, 32, generator) for state in states]
    splits = default_splits(batch * 8, width, torch.device(device))
    out: dict[str, Any] = {"batch_size": batch, "width": width, "default_splits": splits}
    plans: list[tuple[str, str, int | None]] = [("torch_ms", "torch", None), ("kernel_ms", "kernel", None)]
    plans += [(f"kernel_ms_splits_{n}", "kernel", n) for n in sweep]
    for name, path, n in plans:
        def every_layer(path: str = path, n: int | None = n) -> None:
            for state, step_inputs in zip(states, inputs):
                decode_layer_step(path, state, step_inputs, n)
        out[name] = round(ms_per_layer(every_layer, layers, repeats, "cuda"), 4)
    out["speedup"] = round(out["torch_ms"] / out["kernel_ms"], 2)
    out["check"] = compare_decode_paths(device, batch, width)
    return out


def _or_error(measure: Any, *args: Any) -> dict[str, Any]:
    """A micro-benchmark's figures, or the error that stopped it (the end-to-end runs still run)."""
    try:
        return measure(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        return {"error": repr(exc)}


def evictions(path: Path) -> dict[tuple, list[list[int]]]:
    events = read_trace(path).of_kind("evict").to_pylist()
    return {(e["request_id"], e["step"], e["layer"]): [sorted(h) for h in e["positions"]] for e in events}


def check_equal_evictions(loaded: Any, spec: Any, registry: Registry, prompt_len: int, out_dir: Path) -> dict[str, Any]:
    """The eager reference against the fast engine with its Triton kernels, and against the fast
    engine on its torch paths (the eager engine's arithmetic: bitwise the same choices expected).
    A kernel's float32 sums in another order can break a near-tie of random weights differently,
    and one other victim changes every later layer's input: `first_difference` says where."""
    from kvprof_h2o import fast

    found = {}
    for label, engine, kernels in (("eager", "eager", True), ("static", "static", True),
                                   ("static_torch", "static", False)):
        path = out_dir / f"check-{label}.arrow"
        fast._TRITON_MASS["usable"] = fast._TRITON_DECODE["usable"] = kernels
        try:
            run_strategy(registry, "h2o", spec, loaded, {"engine": engine}, synthetic(prompt_len, 8, 2), path)
        finally:
            fast._TRITON_MASS["usable"] = fast._TRITON_DECODE["usable"] = True
        found[label] = evictions(path)
    eager = found["eager"]
    out: dict[str, Any] = {"prompt_len": prompt_len, "batch_size": 2, "events_eager": len(eager),
                           "evicted_positions": sum(len(h) for heads in eager.values() for h in heads)}
    for label in ("static", "static_torch"):
        other = found[label]
        differing = sorted((key for key in eager if eager[key] != other.get(key)),
                           key=lambda key: (-1 if key[1] is None else key[1], key[2], key[0]))
        # Positions in one event's lists and not the other's, per differing event: a few per event
        # are near-ties broken the other way; most of them would be a bug.
        swapped = [sum(len(set(a) ^ set(b)) for a, b in zip(eager[key], other.get(key) or [])) for key in differing]
        out[label] = {"events": len(other), "same_keys": eager.keys() == other.keys(),
                      "differing_events": len(differing),
                      "first_difference": list(differing[0]) if differing else None,
                      "positions_differing_max": max(swapped, default=0),
                      "positions_differing_total": sum(swapped)}
    return out


def check_in_float32(loaded: Any, spec: Any, registry: Registry, prompt_len: int, out_dir: Path) -> dict[str, Any]:
    """`check_equal_evictions` with the model in float32 and SDPA on its math kernel (last: the
    model stays float32). In bfloat16 the fast engine's fused prompt attention and the eager
    engine's own round differently, so from layer 1 on the two paths see slightly different
    inputs; in float32 both compute the same attention to ~1e-6, and the paths must agree."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kvprof_h2o import fast
    from kvprof_h2o.mass_kernel import triton_mass

    loaded.model.float()
    loaded.dtype = torch.float32
    out: dict[str, Any] = {}
    if loaded.device.type == "cuda":  # the mass kernels alone in float32, against the torch pass
        g = torch.Generator("cuda").manual_seed(0)
        query = torch.randn(2, 32, prompt_len, 128, device="cuda", generator=g)
        keys = torch.randn(2, 8, prompt_len, 128, device="cuda", generator=g)
        positions = torch.arange(prompt_len, device="cuda").repeat(2, 1)
        expected = fast.torch_prefill_mass(query, keys, positions, 0.088)
        got = triton_mass(query, keys, positions, 0.088)
        out["mass_kernel_max_rel_diff"] = float((expected - got).abs().max() / expected.max())
    with sdpa_kernel(SDPBackend.MATH):
        return out | check_equal_evictions(loaded, spec, registry, prompt_len, out_dir)


def measure(loaded: Any, spec: Any, registry: Registry, name: str, options: dict[str, str], batch: int,
            prompt_len: int, output_len: int, out_dir: Path, detail: str = "layer") -> dict[str, Any]:
    # warm-up at the same detail: a first use of the event path's kernels stalls the device once
    run_strategy(registry, name, spec, loaded, options, synthetic(prompt_len, 4, batch), None, detail=detail)
    path = out_dir / f"{name}-{options.get('engine', 'static')}-b{batch}-{detail}.arrow"
    run_strategy(registry, name, spec, loaded, options, synthetic(prompt_len, output_len, batch), path,
                 detail=detail)
    trace = read_trace(path)
    stats = trace_summary(trace)
    latency = stats["latency_ms"]
    ends = decode_steps(Events.of(trace)).end_ns
    return {"strategy": name, "options": options, "batch_size": batch, "detail": detail,
            "step_gaps_ms": [round(gap / 1e6, 2) for gap in np.diff(ends).tolist()],  # where a p99 comes from
            "ttft_ms_median": latency["ttft"]["median"], "itl_ms_median": latency["itl"]["median"],
            "itl_ms_p99": latency["itl"]["p99"], "kv_device_bytes_peak": stats["kv_bytes"]["device"]["peak"],
            "profiler_cost_s": stats["run"]["profiler_cost_s"],
            "profiler_cost_share": stats["run"]["profiler_cost_share"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args(argv)
    device, model = ("cpu", "tiny-llama") if args.smoke else ("cuda", "llama-3-8b")
    prompt_len, output_len, check_len = (96, 6, 64) if args.smoke else (8192, 32, 1024)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(model, "random")
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(spec, device)
    registry = load_plugins().registry
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "model": spec.name, "weights": "random", "dtype": str(loaded.dtype),
                               "prompt_len": prompt_len, "output_len": output_len,
                               "load_s": round(time.perf_counter() - started, 1)}
    figures["check"] = check_equal_evictions(loaded, spec, registry, check_len, args.out_dir)
    print(json.dumps(figures["check"]), flush=True)
    figures["prefill_mass"] = [time_prefill_mass(device, batch, prompt_len) for batch in (1, 16)]
    print(json.dumps(figures["prefill_mass"]), flush=True)
    figures["decode_layer"] = [_or_error(time_decode_layer, device, batch) for batch in (1, 16)]
    print(json.dumps(figures["decode_layer"]), flush=True)
    rows = figures["runs"] = []
    for batch in map(int, args.batches.split(",")):
        plan: list[tuple[str, dict[str, str], str]] = [("full", {}, "layer"), ("h2o", {}, "layer"), ("h2o", {}, "step")]
        plan += [("h2o", {"engine": "eager"}, "layer")] if batch == 1 else [("h2o", {}, "head")]
        for name, options, detail in plan:
            row = measure(loaded, spec, registry, name, options, batch, prompt_len, output_len, args.out_dir, detail)
            rows.append(row)
            print(json.dumps(row), flush=True)
    figures["check_float32"] = check_in_float32(loaded, spec, registry, check_len, args.out_dir)
    print(json.dumps(figures["check_float32"]), flush=True)
    (args.out_dir / "h2o.json").write_text(json.dumps(figures, indent=2) + "\n")
    print_table(figures)
    return 0


def print_table(figures: dict[str, Any]) -> None:
    print(f"\n{figures['device']}  {figures['model']} ({figures['weights']}), prompt {figures['prompt_len']}, "
          f"{figures['output_len']} new tokens; check: {figures['check']}")
    print(f"check in float32: {figures.get('check_float32')}")
    for d in figures.get("decode_layer", []):
        if "kernel_ms" in d:
            print(f"decode layer b{d['batch_size']}: torch {d['torch_ms']:.4f} ms, kernels {d['kernel_ms']:.4f} ms "
                  f"({d['default_splits']} splits; {d['speedup']}x); check {d['check']}")
        elif d:
            print(f"decode layer: {d}")
    full = {r["batch_size"]: r for r in figures["runs"] if r["strategy"] == "full"}
    for r in figures["runs"]:
        base = full[r["batch_size"]]
        print(f"b{r['batch_size']:<3} {r['strategy']:<5} {r['options'].get('engine', 'static'):<6} {r['detail']:<5} "
              f"TTFT {r['ttft_ms_median']:9.1f} ms ({r['ttft_ms_median'] / base['ttft_ms_median']:.2f}x)  "
              f"ITL {r['itl_ms_median']:7.2f} ms ({r['itl_ms_median'] / base['itl_ms_median']:.2f}x) "
              f"p99 {r['itl_ms_p99']:7.2f}  KV {r['kv_device_bytes_peak'] / 2**20:9.1f} MiB "
              f"({r['kv_device_bytes_peak'] / base['kv_device_bytes_peak']:.3f})  "
              f"profiler {r['profiler_cost_share']:.2%}")


if __name__ == "__main__":
    sys.exit(main())
