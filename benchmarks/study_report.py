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

`FIGURE=FOLDER` reads a folder as another figure's points: Fig 4's runs hold each request's E2E
too, so `fig5=out/fig4-8b` draws Fig 5 from them (at Fig 4's output length).

vLLM is not in the sweeps; `--vllm-study FILE` (benchmarks/vllm_study.py's JSON) adds its points to
Fig 1 (part `ttft`: kvprof's TTFT at batch 1), Fig 4 (part `sweep`: kvprof's decode tokens/s and
device KV peak per batch size) and Fig 5 (part `sweep`: kvprof's E2E median) as a `vllm` line:
medians over the JSON's rounds (the JSON keeps no spread), its device KV peak the largest over the
rounds. Workload parameters that differ between a figure's lines (vLLM's study used other output
lengths than the sweeps) are named on each line and in a table column; the shared ones once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STYLE = {"vllm": "k", "full": "tab:blue", "offload": "tab:orange", "h2o": "tab:green", "infinigen": "tab:red"}
LINES = ["-", "--", ":", "-."]  # one per model
GIB = 2**30
# The workload parameters a reader compares points by. Those the figure neither plots on x nor
# draws as curves of their own are either common to all its points (stated once) or differ between
# its lines (vLLM's study used 128 new tokens where a sweep used 64): then each line names its value.
WORKLOAD = ("prompt_len", "batch_size", "output_len")


@dataclass
class Point:
    """The runs of one point of a sweep: its repeats, done or failed."""

    figure: str
    model: str
    strategy: str
    options: dict[str, Any]
    params: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    # figures summarised already, name -> (median, rounds): vLLM's study JSON keeps no single runs
    summarised: dict[str, tuple[float, int]] = field(default_factory=dict)

    @property
    def done(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if run["status"] == "done"]

    @property
    def label(self) -> str:
        options = ",".join(f"{key}={value}" for key, value in self.options.items())
        return f"{self.strategy}[{options}]" if options else self.strategy

    @property
    def planned(self) -> int:
        """The runs planned: the sweep's repeats, or the rounds behind a summarised figure."""
        return len(self.runs) or max((rounds for _, rounds in self.summarised.values()), default=0)

    def failure(self) -> str | None:
        """'out of memory', 'failed: <error>', 'not run', or None when a run finished."""
        if self.done or self.summarised:
            return None
        if any(run.get("out_of_memory") for run in self.runs):
            return "out of memory"
        failed = [run for run in self.runs if run["status"] == "failed"]
        return f"failed: {failed[0]['error'][:120]}" if failed else "not run"

    def values(self, name: str) -> list[float]:
        return [float(v) for v in (figure_value(run, name) for run in self.done) if v is not None]

    def stats(self, name: str) -> tuple[float, float, float, int] | None:
        """(median, min, max, n) of a figure over the finished repeats."""
        if self.summarised:
            given = self.summarised.get(name)
            return None if given is None else (given[0], given[0], given[0], given[1])
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


def read_folder(folder: Path, figure: str) -> tuple[list[Point], set[str]]:
    """The points of one sweep folder, as points of `figure`, and the machines its results name."""
    index = json.loads((folder / "index.json").read_text())
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


def read_vllm_study(path: Path, machine: str | None = None) -> tuple[dict[str, list[Point]], str]:
    """vLLM's points of Figs 1, 4 and 5 from benchmarks/vllm_study.py's JSON, and the machine it names."""
    study = json.loads(path.read_text())
    parts, model = study.get("parts") or {}, study["model"]

    def point(figure: str, row: dict[str, Any], figures: dict[str, Any]) -> Point:
        rounds = int(row.get("rounds") or 1)
        params = {name: row[name] for name in WORKLOAD if name in row}
        return Point(figure, model, "vllm", {}, params,
                     summarised={name: (float(value), rounds) for name, value in figures.items() if value is not None})

    sweep = parts.get("sweep") or []
    points = {
        "fig1": [point("fig1", row, {"ttft_ms": row.get("kvprof_ttft_ms_median")}) for row in parts.get("ttft") or []],
        "fig4": [point("fig4", row, {"decode_tokens_per_s": row.get("kvprof_decode_tokens_per_s"),
                                     "kv_device_peak_bytes": row.get("kv_device_peak_bytes")}) for row in sweep],
        "fig5": [point("fig5", row, {"e2e_ms_median": row.get("kvprof_e2e_ms_median")}) for row in sweep],
    }
    if study.get("environment"):
        where = machine_of(study["environment"])
    else:  # vllm_study.py's JSONs before it recorded its environment
        where = machine or f"device {study.get('device', '?')}, machine not named in the JSON"
    return points, f"vLLM {study.get('vllm_version', '?')} ({path.name}): {where}"


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
                   "prompt tokens", [Panel("split:speculation", "speculation, in the step (ms/step)"),
                                     Panel("split:speculation_overlapped", "speculation, side stream (ms/step)"),
                                     Panel("split:kv_transfer", "KV transfer stall (ms/step)"),
                                     Panel("split:decode_compute", "rest of the step (ms/step)"),
                                     Panel("gather_ms_per_step", "gather, copy stream (ms/step)"),
                                     Panel("kv_device_peak_bytes", "device KV peak (GiB)", GIB),
                                     Panel("kv_aux_device_peak_bytes", "partial keys etc. (GiB)", GIB),
                                     Panel("kv_host_peak_bytes", "host KV peak (GiB)", GIB)],
                   curve=("batch_size",)),
}


def differing(figure: Figure, points: list[Point]) -> tuple[str, ...]:
    """The figure's curve parameters, then the workload parameters that differ between its points."""
    rest = [name for name in WORKLOAD if name != figure.axis and name not in figure.curve]
    return figure.curve + tuple(name for name in rest if len({p.params[name] for p in points if name in p.params}) > 1)


def common(figure: Figure, points: list[Point]) -> str:
    """'prompt_len 2048, output_len 64': the workload parameters every point of the figure has alike."""
    shown = (figure.axis, *differing(figure, points))
    shared = []
    for name in WORKLOAD:
        values = {p.params.get(name) for p in points}
        if name not in shown and len(values) == 1 and None not in values:
            shared.append(f"{name} {values.pop()}")
    return ", ".join(shared) or "no parameter in common"


def curve_name(point: Point, figure: Figure, points: list[Point], models: list[str]) -> str:
    parts = [point.label] + [f"{name.split('_')[0]} {point.params.get(name, '?')}"
                             for name in differing(figure, points)]
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
        curves.setdefault(curve_name(point, figure, points, models), []).append(point)
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
    repeats = max((p.planned for p in points), default=0)
    title = (f"{figure.title} ({common(figure, points)}) - median of up to {repeats} repeats, bars min-max, "
             "x at the bottom: out of memory or failed",
             f"{'; '.join(sorted(machines)) or 'no finished run'}; {', '.join(models)} (random weights)")
    width = int(fig.get_figwidth() * 15)  # characters of 9 pt text per inch, so a one-panel title is not cut off
    fig.suptitle("\n".join(textwrap.fill(part, width) for part in title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(figure: Figure, points: list[Point], machines: set[str]) -> str:
    lines = [f"# {figure.title}", "", f"Machine: {'; '.join(sorted(machines)) or 'no finished run'}. "
             f"Every point: {common(figure, points)}. "
             "Median over the finished repeats, spread min-max, n finished of the planned runs.", ""]
    if any(point.summarised for point in points):
        lines += ["vllm: kvprof's figures from vLLM's study JSON, medians over its rounds (the JSON keeps no "
                  "spread); its device KV peak is the largest over the rounds.", ""]
    columns = differing(figure, points)
    header = ["model", "strategy", *columns, figure.axis] + [panel.ylabel for panel in figure.panels]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    ordered = sorted(points, key=lambda p: (p.model, p.label, *(str(p.params.get(c)) for c in columns),
                                            p.params[figure.axis]))
    for point in ordered:
        row = [point.model, point.label, *(str(point.params.get(c, "?")) for c in columns),
               str(point.params[figure.axis])]
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
                spread = "no spread kept" if point.summarised else f"[{low:.4g}-{high:.4g}]"
                row.append(f"{median:.4g} {spread} n={n}/{point.planned}")
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
    parser.add_argument("folders", nargs="+", help="sweep folders, named fig1..., fig2..., ...; FIGURE=FOLDER "
                        "reads a folder as another figure's points (fig5=out/fig4-8b: E2E from Fig 4's runs)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--suffix", default="", help="appended to each file name (e.g. -h200)")
    parser.add_argument("--vllm-study", type=Path, help="benchmarks/vllm_study.py's JSON: vLLM's points "
                        "in Figs 1, 4 and 5")
    parser.add_argument("--vllm-machine", help="the machine of a --vllm-study JSON that does not name it "
                        "(vllm_study.py's runs before it recorded its environment)")
    args = parser.parse_args(argv)
    by_figure: dict[str, list[Point]] = {}
    machines: dict[str, set[str]] = {}
    runs_of: dict[Path, list[Point]] = {}  # each folder's points once, for kvprof's cost: a folder may feed two figures
    for argument in args.folders:
        figure, _, path = argument.rpartition("=")
        folder = Path(path)
        figure = figure or folder.name.split("-")[0]
        if figure not in FIGURES:
            parser.error(f"{argument}: name the figure (FIGURE=FOLDER) or start the folder's name with one of "
                         f"{', '.join(FIGURES)}")
        points, seen = read_folder(folder, figure)
        by_figure.setdefault(figure, []).extend(points)
        machines.setdefault(figure, set()).update(seen)
        runs_of.setdefault(folder.resolve(), points)
    sweep_machines = set().union(*machines.values())
    if args.vllm_study:
        vllm_points, vllm_machine = read_vllm_study(args.vllm_study, args.vllm_machine)
        for figure, points in vllm_points.items():
            if points and figure in by_figure:  # vLLM's points beside the sweeps', never a figure of their own
                by_figure[figure].extend(points)
                machines[figure].add(vllm_machine)
    args.output.mkdir(parents=True, exist_ok=True)
    for key, points in sorted(by_figure.items()):
        figure = FIGURES[key]
        png = args.output / f"{figure.name}{args.suffix}.png"
        draw(figure, points, machines[key], png)
        markdown = args.output / f"{figure.name}{args.suffix}.md"
        markdown.write_text(table(figure, points, machines[key]) + f"\n![{figure.title}]({png.name})\n")
        print(f"{figure.title}: {png}, {markdown}")
    cost = args.output / f"profiler-cost{args.suffix}.md"
    cost.write_text(profiler_cost([p for points in runs_of.values() for p in points], sweep_machines))
    print(f"profiler cost: {cost}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
