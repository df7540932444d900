"""The study's sweeps on the H200, in parts that each fit one device call (600 s): runs the grids of
benchmarks/grids/ (the single source of the axes; this adds only overrides through their extra
arguments), then packs each sweep folder's index.json and result files (not the traces) into one
archive under $OUT.

    python benchmarks/h200_sweeps.py --list                       # the parts and their estimated time
    python benchmarks/h200_sweeps.py 8b-a --work /tmp/kvprof-sweeps --out "$OUT"     # on the H200
    python benchmarks/h200_sweeps.py 8b-a --smoke --work /tmp/s --out /tmp/s-out     # tiny model, CPU

A part runs its grids one after another, each a `kvprof sweep` process (one model load for all its
runs). A grid that would run past the part's deadline (`--deadline`, 510 s: the call's 600 s less
install, start-up and packing) is interrupted: its index.json says which runs finished, and calling
the part again while the machine is warm resumes it (finished traces are kept in --work). The
estimate comes from the H200 figures of earlier sessions (the constants below); a part prints it first.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

GRIDS = Path(__file__).parent / "grids"
NO_VLLM = ["--skip-plugin", "vllm"]  # vLLM is not installed on the H200 machine (see vllm_study.py)
L13B = ["--model", "llama-2-13b"]    # Llama-2-13B's context is 4K: prompt + output must fit


@dataclass(frozen=True)
class Sweep:
    grid: str              # script in benchmarks/grids/
    folder: str            # fig<N>-<model>: study_report.py takes the figure from the name
    overrides: tuple[str, ...] = ()
    smoke: tuple[str, ...] = ()  # the axes for the CPU smoke run (tiny model, a few points)


FIG1, FIG2, FIG4 = "fig1_ttft_vs_prompt.sh", "fig2_infinigen_breakdown.sh", "fig4_throughput_vs_batch.sh"
FIG5, FIG6 = "fig5_e2e_vs_batch.sh", "fig6_decode_vs_output.sh"
SMOKE_PROMPTS = ("--prompt-len", "32,64")
SMOKE_BATCHES = ("--prompt-len", "32", "--batch-size", "1,2")


def skip(*strategies: str) -> tuple[str, ...]:
    return tuple(arg for name in strategies for arg in ("--skip-plugin", name))


OFFLOAD_ONLY = skip("full", "h2o", "infinigen")
SMALL_13B = (*L13B, "--batch-size", "1,4,16,64", "--repeats", "2")  # 13B's KV is 6.25x 8B's (no GQA)

# Each part fits one call (estimates by --list); folders named fig<N>-<model>[-<what>] for study_report.py.
PARTS: dict[str, list[Sweep]] = {
    "8b-a": [Sweep(FIG1, "fig1-8b", (*NO_VLLM,), SMOKE_PROMPTS),
             Sweep(FIG4, "fig4-8b", (*NO_VLLM, "--skip-plugin", "offload"), SMOKE_BATCHES)],
    "8b-b": [Sweep(FIG4, "fig4-8b-offload", (*NO_VLLM, *OFFLOAD_ONLY), SMOKE_BATCHES),
             Sweep(FIG6, "fig6-8b", ("--output-len", "128,256,512"), ("--prompt-len", "32", "--output-len", "4,8"))],
    "8b-c": [Sweep(FIG5, "fig5-8b", (*NO_VLLM,), SMOKE_BATCHES)],
    "8b-d": [Sweep(FIG2, "fig2-8b", (), ("--prompt-len", "32,64", "--batch-size", "1,2")),
             Sweep(FIG6, "fig6-8b-1024", ("--output-len", "1024"), ("--prompt-len", "32", "--output-len", "16"))],
    "13b-a": [Sweep(FIG1, "fig1-13b", (*NO_VLLM, *L13B, "--prompt-len", "1024,2048,4064"), SMOKE_PROMPTS),
              Sweep(FIG4, "fig4-13b", (*NO_VLLM, *SMALL_13B, *skip("offload", "infinigen")), SMOKE_BATCHES)],
    "13b-b": [Sweep(FIG4, "fig4-13b-offload", (*NO_VLLM, *SMALL_13B, "--batch-size", "1,4,16", *skip("full", "h2o")),
                    SMOKE_BATCHES),
              Sweep(FIG5, "fig5-13b", (*NO_VLLM, *SMALL_13B, "--batch-size", "1,4,16"), SMOKE_BATCHES)],
}


# --- estimate -------------------------------------------------------------------------------------
# H200 figures of earlier sessions (benchmarks/results/h200-study.json, RESULTS.md), Llama-3-8B,
# random weights, bf16, kvprof's fast engine: ms per decode step as base + slope per 1K tokens of
# context in the batch (batch x (prompt + output)), prefill at ~25K tokens/s (H2O 1.7x at 32K).
PROCESS_S = 25.0       # python, torch and transformers imports, the model build (11 s), plugins
RUN_OVERHEAD_S = 0.8   # per run: workload, environment, trace written, result and index read back
PREFILL_TOKENS_PER_S = 25_000.0
ITL_MS = {"full": (7.0, 0.04), "h2o": (7.0, 0.02), "offload": (7.7, 2.5), "infinigen": (8.0, 0.75)}
MODEL_SCALE = {"llama-3.1-8b": (1.0, 1.0), "llama-2-13b": (1.6, 6.25)}  # (weights/compute, KV bytes per token)


def run_seconds(strategy: str, prompt: int, batch: int, output: int, model: str) -> float:
    compute, kv = MODEL_SCALE[model]
    base, slope = ITL_MS[strategy]
    context_k = batch * (prompt + output) / 1024
    itl_ms = max(base * compute, slope * kv * context_k) if strategy == "offload" else \
        base * compute + slope * kv * context_k
    prefill = batch * prompt / PREFILL_TOKENS_PER_S * compute
    if strategy == "h2o" and prompt >= 16384:
        prefill *= 1.7
    return prefill + output * itl_ms / 1e3


def planned(sweep: Sweep, extra: list[str]) -> list[dict]:
    """The runs a grid plans with these overrides (its `--dry-run`), as dicts."""
    done = subprocess.run(["sh", str(GRIDS / sweep.grid), "/nonexistent-dry-run", *extra, "--dry-run"],
                          capture_output=True, text=True, check=True, env=kvprof_env())
    runs = []
    for line in done.stdout.splitlines():
        words = line.split()
        if line.startswith(("to run", "exists")):
            fields = dict(word.split("=", 1) for word in words if "=" in word and "/" not in word)
            runs.append({"strategy": words[2] if words[0] == "to" else words[1],
                         **{k: int(v) for k, v in fields.items() if k in ("prompt", "batch", "output")}})
    return runs


def estimate(sweep: Sweep, extra: list[str], model: str, repeats: int) -> float:
    """Seconds for a grid: each point's first repeat also runs its warm-up, later repeats do not."""
    runs = planned(sweep, extra)
    points: dict[tuple, int] = {}
    for run in runs:
        key = (run["strategy"], run["prompt"], run["batch"], run["output"])
        points[key] = points.get(key, 0) + 1
    total = PROCESS_S
    for (strategy, prompt, batch, output), count in points.items():
        one = run_seconds(strategy, prompt, batch, output, model)
        total += (count + 1) * one + count * RUN_OVERHEAD_S
    return total


def option(args: list[str], name: str, default: str) -> str:
    """The last value of `name` in a grid's arguments (later arguments override earlier ones)."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    return values[-1] if values else default


def grid_args(sweep: Sweep, smoke: bool, device: str = "cpu") -> list[str]:
    if smoke:
        return [*sweep.overrides, "--model", "tiny-llama", "--device", device, *sweep.smoke, "--output-len",
                option(list(sweep.smoke), "--output-len", "4"), "--repeats", "2", "--no-plots"]
    return [*sweep.overrides, "--no-plots"]


def model_of(sweep: Sweep, args: list[str]) -> str:
    grid_text = (GRIDS / sweep.grid).read_text()
    return option(args, "--model", "llama-3.1-8b" if "llama-3.1-8b" in grid_text else "smollm2-135m")


# --- running --------------------------------------------------------------------------------------

def kvprof_env() -> dict[str, str]:
    """PATH with a `kvprof` that runs this interpreter's kvprof (the grids call `kvprof sweep`)."""
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvprof-shim-{os.getpid()}"
    shim.mkdir(exist_ok=True)
    script = shim / "kvprof"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kvprof.cli "$@"\n')
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def run_grid(sweep: Sweep, args: list[str], folder: Path, log: Path, seconds_left: float) -> str:
    """Run one grid into `folder` with a deadline; returns how it ended."""
    with log.open("a") as out:
        out.write(f"\n=== {sweep.grid} -> {folder} {' '.join(args)}\n")
        out.flush()
        process = subprocess.Popen(["sh", str(GRIDS / sweep.grid), str(folder), *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=kvprof_env(), start_new_session=True)
        try:
            code = process.wait(timeout=max(seconds_left, 1))
            return f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)  # kvprof stops after closing the run's trace
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return "interrupted at the deadline (call the part again to resume)"


def pack(folders: list[Path], archive: Path) -> None:
    """index.json and the result files of each folder (the traces stay in --work)."""
    with tarfile.open(archive, "w:gz") as tar:
        for folder in folders:
            for path in sorted(folder.glob("*.json")):
                tar.add(path, arcname=f"{folder.name}/{path.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=sorted(PARTS))
    parser.add_argument("--list", action="store_true", help="the parts, their grids and estimated times")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvprof-sweeps"), help="the sweep folders")
    parser.add_argument("--out", type=Path, help="where the archive and the log go (default: $OUT)")
    parser.add_argument("--deadline", type=float, default=510.0,
                        help="seconds for the grids of the part (a call has 600 s: install, start-up, packing)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, two points per axis, 2 repeats")
    parser.add_argument("--device", default="cpu", help="the smoke run's device (cpu, or cuda for a quick check)")
    args = parser.parse_args(argv)
    if args.list:
        for name, sweeps in PARTS.items():
            print(f"{name}: ~{sum(grid_estimate(s) for s in sweeps):.0f} s   "
                  f"{', '.join(s.folder for s in sweeps)}")
        return 0
    if args.part is None:
        parser.error("name a part, or --list")
    out = args.out or Path(os.environ.get("OUT", ""))
    if not str(out):
        parser.error("--out or $OUT: where the results go")
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = out / f"sweeps-{args.part}.log"
    sweeps = PARTS[args.part]
    started = time.monotonic()
    total = sum(grid_estimate(s) for s in sweeps)
    print(f"{args.part}: estimated {total:.0f} s on the H200{' (this smoke run: seconds)' if args.smoke else ''}, "
          f"deadline {args.deadline:.0f} s", flush=True)
    folders = []
    for sweep in sweeps:
        grid = grid_args(sweep, args.smoke, args.device)
        folder = args.work / sweep.folder
        folders.append(folder)
        left = args.deadline - (time.monotonic() - started)
        ended = run_grid(sweep, grid, folder, log, left) if left > 30 else "not started: no time left"
        print(f"{sweep.folder}: {ended} after {time.monotonic() - started:.0f} s "
              f"(H200 estimate {grid_estimate(sweep):.0f} s)", flush=True)
    pack([f for f in folders if f.is_dir()], out / f"sweeps-{args.part}.tar.gz")
    print(f"{args.part}: packed {out / f'sweeps-{args.part}.tar.gz'} after {time.monotonic() - started:.0f} s")
    return 0


def grid_estimate(sweep: Sweep) -> float:
    """Seconds of a grid's H200 run (by the constants above; a smoke run has no estimate)."""
    grid = grid_args(sweep, smoke=False)
    repeats = int(option(grid, "--repeats", "3"))
    return estimate(sweep, grid, model_of(sweep, grid), repeats)


if __name__ == "__main__":
    raise SystemExit(main())
