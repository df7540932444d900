"""Figs 1 and 4 of the study from the H200 runs: `study_h200.py`'s JSON (full, offload, h2o,
infinigen on kvprof's fast engine) and `vllm_study.py`'s (vLLM 0.26.0 with kvprof's hooks).

    python benchmarks/plot_study.py benchmarks/results/h200-study.json benchmarks/results/h200-vllm-study.json \
        docs/results

Writes fig1-ttft-vs-prompt-h200.png (TTFT against prompt length, batch 1) and
fig4-throughput-vs-batch-h200.png (decode tokens/s and device KV against batch size, 2K prompt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

STYLE = {"vllm": "k", "full": "tab:blue", "offload": "tab:orange", "h2o": "tab:green", "infinigen": "tab:red"}


def series(points: list[dict[str, Any]], figure: str, x: str, y: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for p in points:
        if p["figure"] == figure and p.get(y) is not None:
            xs, ys = out.setdefault(p["strategy"], ([], []))
            xs.append(p[x])
            ys.append(p[y])
    return out


def vllm_series(vllm: dict[str, Any]) -> dict[str, tuple[list, list]]:
    ttft, sweep = vllm["parts"]["ttft"], vllm["parts"]["sweep"]
    batches = [p["batch_size"] for p in sweep]
    return {"ttft": ([p["prompt_len"] for p in ttft], [p["kvprof_ttft_ms_median"] for p in ttft]),
            "tput": (batches, [p["kvprof_decode_tokens_per_s"] for p in sweep]),
            "kv": (batches, [p["kv_device_peak_bytes"] / 2**30 for p in sweep])}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("vllm", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    study, vllm = json.loads(args.study.read_text()), vllm_series(json.loads(args.vllm.read_text()))
    points, machine = study["points"], f"{study['device']}, {study['model']} ({study['weights']} weights, bf16)"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (xs, ys) in {"vllm": vllm["ttft"], **series(points, "fig1", "prompt_len", "ttft_ms")}.items():
        ax.plot(xs, ys, "o-", color=STYLE.get(name), label=name)
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens (batch 1)", ylabel="TTFT (ms)",
           title=f"Fig 1: time to first token\n{machine}")
    ax.set_xticks([1024, 2048, 4096, 8192, 16384, 32768], ["1K", "2K", "4K", "8K", "16K", "32K"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out_dir / "fig1-ttft-vs-prompt-h200.png", dpi=120)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput = {"vllm": vllm["tput"], **series(points, "fig4", "batch_size", "decode_tokens_per_s")}
    memory = {"vllm": vllm["kv"]}
    for name, (xs, ys) in series(points, "fig4", "batch_size", "kv_device_peak_bytes").items():
        memory[name] = (xs, [y / 2**30 for y in ys])
    for ax, data, label in ((left, throughput, "decode tokens/s"), (right, memory, "device KV peak (GiB)")):
        for name, (xs, ys) in data.items():
            ax.plot(xs, ys, "o-", color=STYLE.get(name), label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch size (2K prompt)", ylabel=label)
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64], ["1", "2", "4", "8", "16", "32", "64"])
    left.legend()
    fig.suptitle(f"Fig 4: decode throughput and device KV against batch size\n{machine}")
    fig.tight_layout()
    fig.savefig(args.out_dir / "fig4-throughput-vs-batch-h200.png", dpi=120)


if __name__ == "__main__":
    main()
