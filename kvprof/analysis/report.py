"""A report page of one run or a comparison: the tables and the figures, in HTML or Markdown.

The HTML page is self-contained (figures embedded as data URIs), so it can be mailed or
attached to an issue as one file; the Markdown page refers to the PNGs written beside it.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvprof.analysis import RunAnalysis
from kvprof.analysis.tables import Table, comparison_tables, tables_for, to_html, to_markdown
from kvprof.errors import UsageError

FORMATS = ("html", "md")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.note { color: #666; font-size: 0.85em; margin: 0.2em 0; }
.warning { color: #a33; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


@dataclass
class Section:
    """A part of the page: a heading, lines of text, titled lists, then tables."""

    heading: str
    lines: list[str] = field(default_factory=list)
    lists: dict[str, list[str]] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)


def _run_facts(run: RunAnalysis) -> list[str]:
    info = run.trace.run or {}
    model = info.get("model") or {}
    workload = info.get("workload") or {}
    params = workload.get("params") or {}
    shown = ", ".join(f"{k}={params[k]}" for k in ("prompt_len", "output_len", "batch_size", "num_prompts")
                      if k in params)
    facts = [
        f"trace: {run.trace.path} (schema {run.trace.schema_version})",
        f"strategy: {info.get('strategy')} ({info.get('plugin_version') or '?'})  options: {info.get('options') or {}}",
        f"model: {model.get('name')} ({model.get('weights')} weights)  device: {info.get('device')}",
        f"workload: {workload.get('name')} {shown}",
    ]
    if info.get("metadata"):
        facts.append("metadata: " + ", ".join(f"{k}={v}" for k, v in info["metadata"].items()))
    return facts


def describe_environment(environment: dict[str, Any]) -> list[str]:
    """The run's software and hardware, a line each (from the trace's run metadata)."""
    if not environment:
        return ["not recorded in this trace"]
    versions = ", ".join(f"{name} {version}" for name, version in (environment.get("versions") or {}).items())
    lines = [f"python {environment.get('python')} on {environment.get('platform')}", versions]
    hardware = environment.get("hardware") or {}
    if hardware:
        memory = hardware.get("memory_bytes")
        lines.append(f"CPU: {hardware.get('cpu')}, {hardware.get('cpu_cores')} cores"
                     + (f", {memory / 2**30:.1f} GiB memory" if memory else ""))
        gpu = hardware.get("gpu") or {}
        if gpu.get("name"):
            lines.append(f"GPU: {gpu['name']}, {gpu.get('memory_bytes', 0) / 2**30:.0f} GiB, compute capability "
                         f"{gpu.get('compute_capability')}, CUDA {gpu.get('cuda')}, driver {gpu.get('driver', '?')}")
    return lines


def _sections(runs: list[RunAnalysis], comparison: dict[str, Any] | None) -> list[Section]:
    sections = []
    if comparison is not None:
        sections.append(Section("Comparison", tables=comparison_tables(comparison)))
    for run in runs:
        info = run.trace.run or {}
        lines = _run_facts(run) + [f"warning: {w}" for w in run.trace.warnings]
        lines += [f"{name} not applicable: {why}" for name, why in run.skipped.items()]
        lists = {
            "Deviations from the published method (recorded by the strategy)":
                info.get("deviations") or ["none recorded"],
            "Environment": describe_environment(info.get("environment") or {}),
        }
        tables = [table for name, result in run.results.items() for table in tables_for(name, result)]
        sections.append(Section(f"Run: {run.label}", lines, lists, tables))
    return sections


def write_report(runs: list[RunAnalysis], folder: str | Path, comparison: dict[str, Any] | None = None,
                 fmt: str = "html", plots: bool = True) -> Path:
    """Write the report page (index.html or README.md) and its figures into `folder`."""
    if fmt not in FORMATS:
        raise UsageError(f"--report-format {fmt}: choose one of {', '.join(FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    notes: list[str] = []
    if plots:
        try:
            from kvprof.analysis.plots import draw_figures

            figures = draw_figures(runs, folder / "figures")
        except UsageError as exc:  # matplotlib missing: the tables still make a report
            notes.append(str(exc))
    title = ("kvprof comparison" if comparison is not None
             else f"kvprof run: {runs[0].label}" if len(runs) == 1 else f"kvprof: {len(runs)} runs")
    sections = _sections(runs, comparison)
    if fmt == "html":
        path = folder / "index.html"
        path.write_text(_html(title, sections, figures, notes))
    else:
        path = folder / "README.md"
        path.write_text(_markdown(title, sections, figures, folder, notes))
    return path


def _html(title: str, sections: list[Section], figures: list[Path], notes: list[str]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>written {time.strftime('%Y-%m-%d %H:%M:%S')} by kvprof analyze</p>"]
    parts += [f"<p class='warning'>{html.escape(note)}</p>" for note in notes]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts += [f"<p class='{'warning' if line.startswith('warning') else 'note'}'>{html.escape(line)}</p>"
                  for line in section.lines]
        for name, items in section.lists.items():
            parts.append(f"<h3>{html.escape(name)}</h3><ul class='note'>"
                         + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>")
        parts += [to_html(table, title=table.title != section.heading) for table in section.tables]
    if figures:
        parts.append("<h2>Figures</h2>")
        for figure in figures:
            data = base64.b64encode(figure.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(figure.stem.replace('_', ' '))}</h3>"
                         f"<img alt='{html.escape(figure.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(title: str, sections: list[Section], figures: list[Path], folder: Path, notes: list[str]) -> str:
    parts = [f"# {title}", "", f"*written {time.strftime('%Y-%m-%d %H:%M:%S')} by kvprof analyze*", ""]
    parts += [f"**{note}**" for note in notes]
    for section in sections:
        parts += [f"## {section.heading}", ""] + [f"- {line}" for line in section.lines] + [""]
        for name, items in section.lists.items():
            parts += [f"### {name}", ""] + [f"- {item}" for item in items] + [""]
        parts += [to_markdown(table, title=table.title != section.heading) for table in section.tables]
    if figures:
        parts += ["## Figures", ""]
        parts += [f"![{figure.stem}]({figure.relative_to(folder).as_posix()})" for figure in figures]
    return "\n".join(parts) + "\n"
