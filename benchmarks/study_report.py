"""The study's figures (arXiv 2604.05012) from `kvprof sweep` folders: a PNG and a markdown table
per figure, medians with their spread over the repeats, failed points marked (out of memory: the
point does not fit), every absolute time with the machine it was measured on.

    python benchmarks/study_report.py out/fig1-8b out/fig1-13b out/fig4-8b ... -o docs/results

Each folder is one sweep over one grid of benchmarks/grids/, named after it: `fig1...` (TTFT
against prompt length), `fig2...` (InfiniGen's decode step and memory against prompt and batch),
`fig4...` (decode throughput, device and total KV against batch), `fig5...` (E2E against batch),
`fig6...` (decode time against output length). Folders of one figure with different models (the
model-size comparison: Llama-3-8B and Llama-2-13B) share its plot, one line style per model.
Only the sweeps' `index.json` and result files are read (`index.json` holds each run's key
figures and decode-step split; the traces are not needed). Writes `<figure>.png`, `<figure>.md`
and `profiler-cost.md` (kvprof's own share of each run, per strategy).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STYLE = {"vllm": "k", "full": "tab:blue", "offload": "tab:orange", "h2o": "tab:green", "infinigen": "tab:red"}
LINES = ["-", "--", ":", "-."]  # one per model
GIB = 2**30


@dataclass
class Point:
    """The runs of one point of a sweep: its repeats, done or failed."""

    figure: str
    model: str
    strategy: str
    options: dict[str, Any]
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if run["status"] == "done"]

    @property
    def label(self) -> str:
        options = ",".join(f"{key}={value}" for key, value in self.options.items())
        return f"{self.strategy}[{options}]" if options else self.strategy

    def failure(self) -> str | None:
        """'out of memory', 'failed: <error>', 'not run', or None when a run finished."""
        if self.done:
            return None
        if any(run.get("out_of_memory") for run in self.runs):
            return "out of memory"
        failed = [run for run in self.runs if run["status"] == "failed"]
        return f"failed: {failed[0]['error'][:120]}" if failed else "not run"

    def values(self, name: str) -> list[float]:
        return [float(v) for v in (figure_value(run, name) for run in self.done) if v is not None]

    def stats(self, name: str) -> tuple[float, float, float, int] | None:
        """(median, min, max, n) of a figure over the finished repeats."""
        values = self.values(name)
        if not values:
            return None
        return statistics.median(values), min(values), max(values), len(values)


def figure_value(run: dict[str, Any], name: str) -> float | None:
    """A run's figure: from the index's figures, or derived from them."""
    figures = run.get("figures") or {}
    if name == "kv_total_peak_bytes":
        device, host = figures.get("kv_device_peak_bytes"), figures.get("kv_host_peak_bytes")
        return None if device is None else device + (host or 0)
    if name.startswith("split:"):
        return (run.get("decode_split_ms") or {}).get(name.removeprefix("split:"))
    return figures.get(name)


def machine_of(environment: dict[str, Any]) -> str:
    hardware = environment.get("hardware") or {}
    gpu = hardware.get("gpu") or {}
    if gpu.get("name"):
        return f"{gpu['name']} (CUDA {gpu.get('cuda')}, driver {gpu.get('driver', '?')})"
    return f"CPU {hardware.get('cpu')}, {hardware.get('cpu_cores')} cores"


def read_folder(folder: Path) -> tuple[list[Point], set[str]]:
    """The points of one sweep folder and the machines its results name."""
    index = json.loads((folder / "index.json").read_text())
    figure = folder.name.split("-")[0]
    points: dict[str, Point] = {}
    machines: set[str] = set()
    for run in index["runs"]:
        params = {k: v for k, v in run["params"].items() if k != "seed"}
        key = json.dumps([run["strategy"], run["options"], params], sort_keys=True)
        point = points.setdefault(key, Point(figure, index["model"], run["strategy"], run["options"], params))
        point.runs.append(run)
        result = folder / run["result"]
        if run["status"] == "done" and result.is_file():
            machines.add(machine_of(json.loads(result.read_text()).get("environment") or {}))
    return list(points.values()), machines


# --- figures --------------------------------------------------------------------------------------

@dataclass
class Panel:
    metric: str          # a figure name (figure_value)
    ylabel: str
    scale: float = 1.0   # divide values by this (bytes -> GiB)


@dataclass
class Figure:
    name: str
    title: str
    axis: str            # the workload parameter on x
    xlabel: str
    panels: list[Panel]
    curve: tuple[str, ...] = ()   # further parameters that make a line of their own (Fig 2: batch)


FIGURES = {
    "fig1": Figure("fig1-ttft-vs-prompt", "Fig 1: time to first token", "prompt_len", "prompt tokens (batch 1)",
                   [Panel("ttft_ms", "TTFT (ms)")]),
    "fig4": Figure("fig4-throughput-vs-batch", "Fig 4: decode throughput and KV memory", "batch_size",
                   "batch size", [Panel("decode_tokens_per_s", "decode tokens/s"),
                                  Panel("kv_device_peak_bytes", "device KV peak (GiB)", GIB),
                                  Panel("kv_total_peak_bytes", "device + host KV peak (GiB)", GIB)]),
    "fig5": Figure("fig5-e2e-vs-batch", "Fig 5: end-to-end latency", "batch_size", "batch size",
                   [Panel("e2e_ms_median", "E2E (ms)")]),
    "fig6": Figure("fig6-decode-vs-output", "Fig 6: decode time", "output_len", "output tokens",
                   [Panel("decode_ms_median", "decode time, E2E - TTFT (ms)")]),
    "fig2": Figure("fig2-infinigen-breakdown", "Fig 2: InfiniGen's decode step and memory", "prompt_len",
                   "prompt tokens", [Panel("split:speculation", "speculation (ms/step)"),
                                     Panel("split:kv_transfer", "KV transfer stall (ms/step)"),
                                     Panel("split:decode_compute", "rest of the step (ms/step)"),
                                     Panel("gather_ms_per_step", "gather, copy stream (ms/step)"),
                                     Panel("kv_device_peak_bytes", "device KV peak (GiB)", GIB),
                                     Panel("kv_aux_device_peak_bytes", "partial keys etc. (GiB)", GIB),
                                     Panel("kv_host_peak_bytes", "host KV peak (GiB)", GIB)],
                   curve=("batch_size",)),
}


def curve_name(point: Point, figure: Figure, models: list[str]) -> str:
    parts = [point.label] + [f"{name.split('_')[0]} {point.params[name]}" for name in figure.curve]
    if len(models) > 1:
        parts.append(point.model)
    return " ".join(parts)


def draw(figure: Figure, points: list[Point], machines: set[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p.model for p in points})
    columns = min(len(figure.panels), 4)
    rows = -(-len(figure.panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), squeeze=False)
    curves: dict[str, list[Point]] = {}
    for point in points:
        curves.setdefault(curve_name(point, figure, models), []).append(point)
    for ax, panel in zip(axes.flat, figure.panels):
        for name, members in sorted(curves.items()):
            members.sort(key=lambda p: p.params[figure.axis])
            style = dict(color=STYLE.get(members[0].strategy), linestyle=LINES[models.index(members[0].model) % 4])
            if figure.curve:
                style.pop("color")
            xs, ys, low, high = [], [], [], []
            for point in members:
                stats = point.stats(panel.metric)
                if stats is not None:
                    xs.append(point.params[figure.axis])
                    ys.append(stats[0] / panel.scale)
                    low.append((stats[0] - stats[1]) / panel.scale)
                    high.append((stats[2] - stats[0]) / panel.scale)
            if xs:
                line = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name, **style)
                color = line[0].get_color()
            else:
                color = style.get("color")
            failed = [p.params[figure.axis] for p in members if p.failure()]
            if failed:  # drawn at the bottom of the panel: the point exists, it did not run or fit
                ax.plot(failed, [0.02] * len(failed), "x", color=color, markersize=9, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set(xscale="log", xlabel=figure.xlabel, ylabel=panel.ylabel)
        axis_values = sorted({p.params[figure.axis] for p in points})
        ax.set_xticks(axis_values, [f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v) for v in axis_values])
        ax.minorticks_off()
    for ax in list(axes.flat)[len(figure.panels):]:
        ax.axis("off")
    labelled = [ax for ax in axes.flat if ax.get_legend_handles_labels()[1]]
    if labelled:
        labelled[0].legend(fontsize=7)
    repeats = max((len(p.runs) for p in points), default=0)
    fig.suptitle(f"{figure.title} - median of up to {repeats} repeats, bars min-max, x at the bottom: "
                 f"out of memory or failed\n{'; '.join(sorted(machines)) or 'no finished run'}; "
                 f"{', '.join(models)} (random weights)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(figure: Figure, points: list[Point], machines: set[str]) -> str:
    lines = [f"# {figure.title}", "", f"Machine: {'; '.join(sorted(machines)) or 'no finished run'}. "
             "Median over the finished repeats, spread min-max, n finished of the planned runs.", ""]
    header = ["model", "strategy", *figure.curve, figure.axis] + [panel.ylabel for panel in figure.panels]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    ordered = sorted(points, key=lambda p: (p.model, p.label, *(p.params[c] for c in figure.curve),
                                            p.params[figure.axis]))
    for point in ordered:
        row = [point.model, point.label, *(str(point.params[c]) for c in figure.curve), str(point.params[figure.axis])]
        failure = point.failure()
        for panel in figure.panels:
            stats = point.stats(panel.metric)
            if failure:
                row.append(failure)
            elif stats is None:
                row.append("-")
            else:
                median, low, high, n = (stats[0] / panel.scale, stats[1] / panel.scale, stats[2] / panel.scale,
                                        stats[3])
                row.append(f"{median:.4g} [{low:.4g}-{high:.4g}] n={n}/{len(point.runs)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def profiler_cost(points: list[Point], machines: set[str]) -> str:
    """kvprof's own cost (share of each run) per figure, model and strategy."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for point in points:
        groups.setdefault((point.figure, point.model, point.label), []).extend(point.values("profiler_cost_share"))
    lines = ["# kvprof's own cost per strategy", "",
             f"Machine: {'; '.join(sorted(machines))}. Share of each run's time spent in kvprof's hooks "
             "and sinks (run_end's profiler_hook_ns over the run), over every finished run of the sweep.", "",
             "| figure | model | strategy | runs | median | max |", "| --- | --- | --- | --- | --- | --- |"]
    for (figure, model, label), values in sorted(groups.items()):
        if values:
            lines.append(f"| {figure} | {model} | {label} | {len(values)} | {statistics.median(values):.3%} | "
                         f"{max(values):.3%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders (named fig1..., fig2..., ...)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--suffix", default="", help="appended to each file name (e.g. -h200)")
    args = parser.parse_args(argv)
    by_figure: dict[str, list[Point]] = {}
    machines: dict[str, set[str]] = {}
    for folder in args.folders:
        figure = folder.name.split("-")[0]
        if figure not in FIGURES:
            parser.error(f"{folder}: the folder's name must start with one of {', '.join(FIGURES)}")
        points, seen = read_folder(folder)
        by_figure.setdefault(figure, []).extend(points)
        machines.setdefault(figure, set()).update(seen)
    args.output.mkdir(parents=True, exist_ok=True)
    for key, points in sorted(by_figure.items()):
        figure = FIGURES[key]
        png = args.output / f"{figure.name}{args.suffix}.png"
        draw(figure, points, machines[key], png)
        markdown = args.output / f"{figure.name}{args.suffix}.md"
        markdown.write_text(table(figure, points, machines[key]) + f"\n![{figure.title}]({png.name})\n")
        print(f"{figure.title}: {png}, {markdown}")
    every = [p for points in by_figure.values() for p in points]
    cost = args.output / f"profiler-cost{args.suffix}.md"
    cost.write_text(profiler_cost(every, set().union(*machines.values())))
    print(f"profiler cost: {cost}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
