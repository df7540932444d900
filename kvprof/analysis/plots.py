"""The study's figures, drawn from one or more analyzed runs (PNG, matplotlib).

Sweep figures put one point per run, one line per strategy (the run label: plugin and options),
and take x from the run's workload parameters; one is drawn only when its runs give at least two
values on its x axis (a single run makes no line), and an axis of whole numbers gets whole-number
ticks:

    ttft_vs_prompt_length      median TTFT against prompt_len
    throughput_vs_batch_size   decode throughput and memory efficiency against batch_size
    e2e_vs_batch_size          median end-to-end latency against batch_size
    decode_time_vs_output_len  median request decode time (E2E - TTFT) against output_len
    accuracy_vs_budget         Figure 8: retention accuracy against the KV budget each strategy declared,
                               one line per strategy, full as the reference, 95 % Wilson intervals
    latency_breakdown          stacked bars: time per phase, per run
    memory_breakdown           stacked bars: memory per component at the peak, per run

and per-run figures (first four runs): memory over time, the phase split of each decode step, and
the share of the asked facts' tokens still cached per layer and KV head (retention runs).
A figure whose data no run has is not drawn. matplotlib is imported only here (extra `plots`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvprof.analysis import RunAnalysis
from kvprof.analysis.breakdown import MEMORY_COMPONENTS, PHASE_LABELS
from kvprof.analysis.common import nested_number, strategy_labels, workload_param
from kvprof.errors import UsageError

PHASE_COLORS = {"prefill": "#4c72b0", "decode_compute": "#55a868", "speculation": "#8172b2",
                "kv_transfer": "#c44e52", "eviction": "#ccb974", "sync_stall": "#64b5cd", "other": "#b0b0b0"}
MEMORY_COLORS = {"weights": "#4c72b0", "kv_device": "#c44e52", "kv_host": "#dd8452", "aux_device": "#8172b2",
                 "workspace": "#b0b0b0"}
GIB = 2**30
SWEEP_PARAMS = {"prompt_len": "prompt", "batch_size": "batch", "output_len": "output"}  # name -> legend word
PER_RUN_FIGURES = 4


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'kvprof[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(runs: list[RunAnalysis], x_param: str, *y_keys: str,
            strategy_of: Callable[[RunAnalysis], str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per series: (x, y) points sorted by x; repeated runs at one x give their median.

    A series is a strategy (`strategy_of`, default: plugin and the options that vary among the
    runs), split further by any other sweep parameter that varies (say, batch size on a figure
    of TTFT against prompt length).
    """
    if strategy_of is None:
        names = dict(zip(map(id, runs), strategy_labels([run.trace for run in runs])))

        def strategy_of(run: RunAnalysis) -> str:
            return names[id(run)]
    varying = [name for name in SWEEP_PARAMS if name != x_param
               and len({workload_param(run.trace, name) for run in runs}) > 1]
    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        x = workload_param(run.trace, x_param)
        y = nested_number(run.results, *y_keys)
        if x is not None and y is not None:
            name = " ".join([strategy_of(run)] + [f"{SWEEP_PARAMS[p]}={workload_param(run.trace, p)}" for p in varying])
            points[name][float(x)].append(y)
    return {name: sorted((x, float(np.median(ys))) for x, ys in by_x.items()) for name, by_x in points.items()}


def _line_plot(ax: Any, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, points in sorted(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name)
    if all(float(x).is_integer() for points in series.values() for x, _ in points):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # batch sizes, token counts
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _sweep_figure(plt: Any, panels: list[tuple[dict, str, str, str]], title: str) -> Any:
    """One figure of line panels: (series, x label, y label, panel title). A panel needs at
    least two values on its x axis (one run, or runs that share x, make no line); None if no
    panel has them."""
    panels = [panel for panel in panels if len({x for points in panel[0].values() for x, _ in points}) >= 2]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (series, xlabel, ylabel, panel_title) in zip(axes[0], panels):
        _line_plot(ax, series, xlabel, ylabel)
        ax.set_title(panel_title)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def ttft_vs_prompt_length(plt: Any, runs: list[RunAnalysis]) -> Any:
    series = _series(runs, "prompt_len", "summary", "latency_ms", "ttft", "median")
    return _sweep_figure(plt, [(series, "prompt length (tokens)", "TTFT, median (ms)", "")],
                         "Time to first token against prompt length")


def throughput_vs_batch_size(plt: Any, runs: list[RunAnalysis]) -> Any:
    throughput = _series(runs, "batch_size", "summary", "throughput_tokens_per_s", "decode")
    efficiency = _series(runs, "batch_size", "summary", "kv_per_token", "memory_efficiency_tokens_per_gb")
    total = _series(runs, "batch_size", "summary", "kv_per_token", "memory_efficiency_total_tokens_per_gb")
    return _sweep_figure(plt, [
        (throughput, "batch size", "decode throughput (tokens/s)", "decode throughput"),
        (efficiency, "batch size", "context tokens per GB of device KV", "memory efficiency, device KV"),
        (total, "batch size", "context tokens per GB of device + host KV", "memory efficiency, total KV"),
    ], "Decode throughput and memory efficiency against batch size")


def e2e_vs_batch_size(plt: Any, runs: list[RunAnalysis]) -> Any:
    series = _series(runs, "batch_size", "summary", "latency_ms", "e2e", "median")
    return _sweep_figure(plt, [(series, "batch size", "end-to-end latency, median (ms)", "")],
                         "End-to-end latency against batch size")


def decode_time_vs_output_len(plt: Any, runs: list[RunAnalysis]) -> Any:
    series = _series(runs, "output_len", "summary", "latency_ms", "decode", "median")
    return _sweep_figure(plt, [(series, "output length (tokens)", "request decode time, median (ms)", "")],
                         "Decode time against output length")


def accuracy_vs_budget(plt: Any, runs: list[RunAnalysis]) -> Any:
    """Figure 8 from analyzed runs: one panel per probe workload, context length and question mode."""
    points = []
    for run in runs:
        retention = run.results.get("retention")
        if not retention:
            continue
        params = ((run.trace.run or {}).get("workload") or {}).get("params") or {}
        panel = f"{(run.trace.run.get('workload') or {}).get('name')}, {params.get('prompt_len')} tokens, " \
                f"question {retention.get('question', 'in_prompt')}"
        points.append({"panel": panel, "strategy": run.trace.run.get("strategy") or run.label,
                       "budget": retention["budget"], "correct": retention["overall"]["correct"],
                       "judged": retention["overall"]["requests"]})
    return retention_figure(points, "Retention accuracy against KV budget", plt)


def retention_figure(points: list[dict[str, Any]], title: str, plt: Any = None) -> Any:
    """Figure 8: answer accuracy against the KV budget with 95 % Wilson intervals, one line per
    strategy that declares a budget, `full` (no budget: it keeps everything) as the reference band.

    `points`: dicts with panel (a title), strategy, budget (fraction of the prompt; None for the
    reference), correct and judged (probe counts; runs at one budget are pooled). None when no
    panel has a budgeted strategy with two budgets, or one budget and a reference."""
    from kvprof.analysis.retention import wilson_interval

    plt = plt or _pyplot()
    pooled: dict[str, dict[tuple[str, float | None], list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for point in points:
        if point["budget"] is None and point["strategy"] != "full":
            continue  # a strategy without a declared budget has no place on this axis
        counts = pooled[point["panel"]][(point["strategy"], point["budget"])]
        counts[0] += point["correct"]
        counts[1] += point["judged"]
    panels = {name: lines for name, lines in pooled.items() if _drawable(lines)}
    if not panels:
        return None
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.2 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, sorted(panels.items())):
        _accuracy_panel(ax, lines, wilson_interval)
        ax.set_title(name, fontsize="medium")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _drawable(lines: dict[tuple[str, float | None], list[int]]) -> bool:
    budgets: dict[str, set[float]] = defaultdict(set)
    for strategy, budget in lines:
        if budget is not None:
            budgets[strategy].add(budget)
    reference = any(budget is None for _, budget in lines)
    return any(len(values) >= 2 or (values and reference) for values in budgets.values())


def _accuracy_panel(ax: Any, lines: dict[tuple[str, float | None], list[int]], interval: Callable) -> None:
    from matplotlib.ticker import PercentFormatter

    judged_lines = {key: counts for key, counts in lines.items() if counts[1] > 0}
    for (strategy, budget), (correct, judged) in judged_lines.items():
        if budget is None:  # the reference: its accuracy and interval across the whole axis
            low, high = interval(correct, judged)
            ax.axhline(correct / judged, color="black", linestyle="--", label=f"{strategy} (reference)")
            ax.axhspan(low, high, color="black", alpha=0.08)
    for index, strategy in enumerate(sorted({s for s, b in judged_lines if b is not None})):
        chosen = sorted((b, c) for (s, b), c in judged_lines.items() if s == strategy and b is not None)
        xs = np.array([b for b, _ in chosen])
        ys = np.array([c / n for _, (c, n) in chosen])
        bounds = np.array([interval(c, n) for _, (c, n) in chosen])
        ax.errorbar(xs, ys, yerr=[ys - bounds[:, 0], bounds[:, 1] - ys], marker="o", capsize=3,
                    color=f"C{index}", label=strategy)
    ax.set_xlabel("KV budget (fraction of the prompt)")
    ax.set_ylabel("answer accuracy (95 % Wilson interval)")
    ax.set_ylim(-0.03, 1.03)  # an accuracy is a share: the whole 0-100 % range, whatever the values
    ax.set_xlim(0.0, 1.05)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")


def _stacked_bars(ax: Any, labels: list[str], stacks: list[dict[str, float]], order: list[str],
                  colors: dict[str, str], names: dict[str, str], ylabel: str, title: str) -> None:
    bottom = np.zeros(len(labels))
    for part in order:
        values = np.array([stack.get(part, 0.0) for stack in stacks])
        if not values.any():
            continue
        ax.bar(range(len(labels)), values, bottom=bottom, label=names.get(part, part), color=colors.get(part))
        bottom += values
    ax.set_xticks(range(len(labels)), [label if len(label) < 28 else label[:26] + "…" for label in labels],
                  rotation=20, ha="right", fontsize="small")
    ax.set_xlim(-1.0 if len(labels) < 3 else -0.6, len(labels) - (0.0 if len(labels) < 3 else 0.4))  # no slab
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _bar_figure(plt: Any, panels: int, runs: int) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, panels, figsize=(panels * max(5.0, 1.6 * runs + 2.5), 4.5), squeeze=False)
    return fig, list(axes[0])


def latency_breakdown(plt: Any, runs: list[RunAnalysis]) -> Any:
    chosen = [run for run in runs if "breakdown" in run.results]
    if not chosen:
        return None
    stacks = [run.results["breakdown"]["time"]["seconds"] for run in chosen]
    order = list(dict.fromkeys(["prefill", "decode_compute", *PHASE_LABELS, *(k for s in stacks for k in s)]))
    fig, (ax,) = _bar_figure(plt, 1, len(chosen))
    _stacked_bars(ax, [run.label for run in chosen], stacks, order, PHASE_COLORS, PHASE_LABELS,
                  "time (s)", "Latency breakdown")
    fig.tight_layout()
    return fig


def memory_breakdown(plt: Any, runs: list[RunAnalysis]) -> Any:
    """Memory per component at each run's peak; a second panel shows the KV tiers and strategy
    structures alone, which the weights dwarf on small models."""
    chosen = [run for run in runs if run.results.get("breakdown", {}).get("memory", {}).get("components")]
    if not chosen:
        return None
    at_peak = [{k: v for k, v in run.results["breakdown"]["memory"]["at_peak"].items() if k != "t_s"}
               for run in chosen]
    labels = [run.label for run in chosen]
    kv_parts = ["kv_device", "kv_host", "aux_device"]
    kv_peak = max(sum(stack.get(part, 0.0) for part in kv_parts) for stack in at_peak)
    scale, unit = (GIB, "GiB") if kv_peak >= GIB else (2**20, "MiB")
    fig, (whole, kv) = _bar_figure(plt, 2, len(chosen))
    _stacked_bars(whole, labels, [{k: v / GIB for k, v in s.items()} for s in at_peak], list(MEMORY_COMPONENTS),
                  MEMORY_COLORS, {}, "GiB at the peak", "Memory breakdown")
    _stacked_bars(kv, labels, [{k: s[k] / scale for k in kv_parts if k in s} for s in at_peak], kv_parts,
                  MEMORY_COLORS, {}, f"{unit} at the peak", "KV and strategy structures")
    fig.tight_layout()
    return fig


def memory_over_time(plt: Any, run: RunAnalysis) -> Any:
    """Stacked memory components over the run; the constant weights are named, not drawn, so
    the KV growth stays visible."""
    memory = run.results.get("breakdown", {}).get("memory", {})
    series = memory.get("series", {})
    drawn = [c for c in memory.get("components", []) if c != "weights" and any(series[c])]
    if not drawn:
        return None
    peak = max(sum(values) for values in zip(*(series[c] for c in drawn)))
    scale, unit = (GIB, "GiB") if peak >= GIB else (2**20, "MiB")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(series["t_s"], *(np.array(series[c]) / scale for c in drawn),
                 labels=drawn, colors=[MEMORY_COLORS[c] for c in drawn], step="post")
    ax.set_xlim(left=0.0)  # from the run's start: the time before the first KV report (prefill) shows
    ax.set_xlabel("time since run start (s)")
    ax.set_ylabel(unit)
    weights = memory.get("peak_bytes", {}).get("weights")
    title = f"Memory over time: {run.label}"
    if weights:
        title += f"\n(weights, {weights / GIB:.2f} GiB, not drawn)"
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def step_times(plt: Any, run: RunAnalysis) -> Any:
    from matplotlib.ticker import MaxNLocator

    per_step = run.results.get("breakdown", {}).get("time", {}).get("per_step", {})
    if not per_step.get("duration_ms"):
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    phases = per_step["phases_ms"]
    steps = np.arange(len(per_step["duration_ms"]))
    ax.stackplot(steps, *(phases[name] for name in phases), labels=[PHASE_LABELS.get(n, n) for n in phases],
                 colors=[PHASE_COLORS.get(name, f"C{i}") for i, name in enumerate(phases)])
    for i, (name, values) in enumerate(per_step.get("overlapped_ms", {}).items()):  # not part of the stack
        ax.plot(steps, values, linestyle="--", color=PHASE_COLORS.get(name, f"C{i}"),
                label=f"{PHASE_LABELS.get(name, name)} (beside, another stream)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decode step (run order)")
    ax.set_ylabel("ms")
    ax.set_title(f"Decode step time by phase: {run.label}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def token_survival(plt: Any, run: RunAnalysis) -> Any:
    """Layer x KV head heat map: share of the asked facts' tokens still cached at question time
    (mean over the probe requests)."""
    spans = [s for s in run.results.get("retention", {}).get("survival", {}).get("spans", []) if s["asked"]]
    if not spans:
        return None
    grid = np.mean([s["per_layer_head"] for s in spans], axis=0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * grid.shape[1] + 3), max(3.5, 0.22 * grid.shape[0] + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"Asked facts still cached at question time: {run.label}\n"
                 f"(mean over {len(spans)} probe requests: {grid.mean():.0%})", fontsize="medium")
    fig.colorbar(image, ax=ax, label="share of the fact's tokens")
    fig.tight_layout()
    return fig


SWEEP_FIGURES: dict[str, Callable[[Any, list[RunAnalysis]], Any]] = {
    "ttft_vs_prompt_length": ttft_vs_prompt_length,
    "throughput_vs_batch_size": throughput_vs_batch_size,
    "e2e_vs_batch_size": e2e_vs_batch_size,
    "decode_time_vs_output_len": decode_time_vs_output_len,
    "accuracy_vs_budget": accuracy_vs_budget,
    "latency_breakdown": latency_breakdown,
    "memory_breakdown": memory_breakdown,
}
RUN_FIGURES: dict[str, Callable[[Any, RunAnalysis], Any]] = {
    "memory_over_time": memory_over_time,
    "step_times": step_times,
    "token_survival": token_survival,
}


def draw_figures(runs: list[RunAnalysis], folder: str | Path) -> list[Path]:
    """Draw every figure the runs have data for into `folder`; returns the PNG paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Any]] = [(name, draw(plt, runs)) for name, draw in SWEEP_FIGURES.items()]
    for index, run in enumerate(runs[:PER_RUN_FIGURES]):
        suffix = f"-{index}" if len(runs) > 1 else ""
        figures += [(f"{name}{suffix}", draw(plt, run)) for name, draw in RUN_FIGURES.items()]
    paths = []
    for name, fig in figures:
        if fig is None:
            continue
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
