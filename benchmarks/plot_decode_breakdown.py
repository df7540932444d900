"""Decode time per token of each run in an `infinigen_gpu.py` log, with the parts it measured
(KV transfer stall, speculation, gather) beside the total: one panel per PROMPTxBATCH config.

    python benchmarks/plot_decode_breakdown.py benchmarks/results/h200-infinigen-fast.log OUT.png

The log's lines `<config> <run> round N: {json}` are the source; nothing else is read.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LINE = re.compile(r"^(?P<config>\d+x\d+) (?P<run>\w+) round (?P<round>\d+): (?P<json>\{.*\})$")
PARTS = [("kv_transfer_ms_per_step", "transfer stall"), ("speculation_ms_per_step", "speculation"),
         ("gather_ms_per_step", "gather")]


def read_runs(log: Path) -> dict[str, dict[str, dict]]:
    """config -> run -> the last round's figures."""
    runs: dict[str, dict[str, dict]] = {}
    for line in log.read_text().splitlines():
        match = LINE.match(line.strip())
        if match:
            runs.setdefault(match["config"], {})[match["run"]] = json.loads(match["json"])
    return runs


def plot(runs: dict[str, dict[str, dict]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted(runs, key=lambda config: tuple(int(n) for n in config.split("x")))  # prompt, then batch
    columns = min(len(configs), 2)
    rows = -(-len(configs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(configs):]:
        ax.set_visible(False)
    for ax, config in zip(axes.flat, configs):
        by_run = runs[config]
        names = list(by_run)
        x = range(len(names))
        ax.bar(x, [by_run[n]["decode_ms_per_token_median"] for n in names], width=0.35, label="decode step",
               color="0.6")
        for i, (key, label) in enumerate(PARTS):
            ax.bar([p + 0.35 + 0.15 * i for p in x], [by_run[n].get(key, 0) for n in names], width=0.15,
                   label=label)
        ax.set_xticks([p + 0.3 for p in x], names, rotation=30, ha="right", fontsize=8)
        prompt, batch = config.split("x")
        ax.set_title(f"{prompt}-token prompt, batch {batch}")
        ax.set_ylabel("ms per token (median)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    log, out = Path(sys.argv[1]), Path(sys.argv[2])
    runs = read_runs(log)
    if not runs:
        print(f"no run lines in {log}", file=sys.stderr)
        return 1
    header = log.read_text().splitlines()[0].lstrip("# ").split(":")[0]
    plot(runs, f"Decode step and its parts ({header})", out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
