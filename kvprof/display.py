"""The live display of `kvprof trace` and `kvprof sweep` (rich), on stderr.

It is a plugin object the CLI registers for the command's duration (not a per-run sink), so it
sees what happens before a run's sinks exist: the strategy's status messages while the model
loads, warms up and captures graphs (`kvprof_status`, sent by `Profiler.status`). From
run_start on it counts the workload the run recorded: requests prefilled (at their first
prefill event) out of the planned requests, and decode tokens out of the planned ones (each
request's max_new_tokens - 1, less what a request that stopped early at EOS will never produce),
with rates and an ETA. A sweep
adds one line for its points. The CLI shows it by default on a terminal; `--quiet` hides it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kvprof.events import Event
from kvprof.hookspecs import hookimpl
from kvprof.profiler import RunInfo

MIB = 2**20


class LiveDisplay:
    """Progress bars for one command: a sweep line (sweeps only), the current run's stage, its
    prefill and decode bars, and a line of rates and KV bytes."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        # The stage (what the strategy is doing, with its elapsed time) above the bars, so a long
        # message does not squeeze the bars' columns.
        self.stage = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                              console=self.console)
        self.progress = Progress(
            TextColumn("  {task.description:<8}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console,
        )
        self._sweep: TaskID | None = None
        self._stage: TaskID | None = None
        self._prefill: TaskID | None = None
        self._decode: TaskID | None = None
        self._planned_new: dict[str, int] = {}   # request id -> max_new_tokens of the running run
        self._prefilled: set[str | None] = set()
        self._decode_tokens = 0
        self._decode_ns = 0
        self._kv = (0.0, 0.0)
        self._live = Live(console=self.console, refresh_per_second=4, get_renderable=self._render)

    # --- the command ---------------------------------------------------------------------

    def __enter__(self) -> LiveDisplay:
        self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.stop()
        if not self.console.is_terminal:  # rich leaves the last line open off a terminal
            self.console.line()

    def start_sweep(self, points: int) -> None:
        self._sweep = self.progress.add_task("sweep", total=points, unit="points")

    def sweep_point_done(self, message: str) -> None:
        """One point finished (or was skipped): a line above the bars, and the sweep bar moves."""
        self.console.print(message, highlight=False)
        if self._sweep is not None:
            self.progress.advance(self._sweep)

    def _render(self) -> Group:
        lines: list[Any] = [self.stage, self.progress]
        if self._decode is not None:
            rate = self._decode_tokens / (self._decode_ns / 1e9) if self._decode_ns else 0.0
            device, host = self._kv
            lines.append(Text(f"  decode {rate:,.1f} tokens/s (step time only)   KV device {device / MIB:,.1f} MiB"
                              f"   host {host / MIB:,.1f} MiB", style="dim"))
        return Group(*lines)

    # --- hooks ---------------------------------------------------------------------------

    @hookimpl
    def kvprof_status(self, run: RunInfo, message: str) -> None:
        self._set_stage(f"{run.strategy}: {message}")

    def _set_stage(self, description: str, finished: bool = False) -> None:
        if self._stage is None:
            self._stage = self.stage.add_task(description, total=None)
        elif finished:
            self.stage.update(self._stage, description=description, total=1, completed=1)
        else:
            self.stage.reset(self._stage, description=description, total=None)
        if self._live.is_started:  # drawn now: a stage shorter than the refresh period is seen too
            self._live.refresh()

    @hookimpl
    def kvprof_run_start(self, run: RunInfo) -> None:
        self._clear_run()
        requests = (run.workload or {}).get("requests") or []
        self._planned_new = {r["request_id"]: int(r.get("max_new_tokens") or 0) for r in requests}
        planned_decode = sum(max(tokens - 1, 0) for tokens in self._planned_new.values())
        batch = ((run.workload or {}).get("params") or {}).get("batch_size")
        batches = f" in batches of {batch}" if batch and batch < len(requests) else ""
        self._set_stage(f"{run.strategy}: tracing {len(requests)} requests{batches} to {run.trace_path}")
        self._prefill = self.progress.add_task("prefill", total=len(requests) or None, unit="requests")
        self._decode = self.progress.add_task("decode", total=planned_decode or None, unit="tokens")

    @hookimpl
    def kvprof_prefill(self, event: Event) -> None:
        # A request counts at its first prefill event: chunks, follow-ups and recomputations
        # after a preemption fire more than one.
        if self._prefill is not None and event.request_id not in self._prefilled:
            self._prefilled.add(event.request_id)
            self.progress.advance(self._prefill)

    @hookimpl
    def kvprof_decode_step(self, event: Event) -> None:
        tokens = (event.tokens or 0) - int((event.ext or {}).get("prefill_tokens", 0))
        self._decode_tokens += tokens
        self._decode_ns += event.end_ns - event.start_ns
        self._kv = (event.kv_device_bytes or 0.0, event.kv_host_bytes or 0.0)
        if self._decode is not None:
            self.progress.advance(self._decode, tokens)

    @hookimpl
    def kvprof_request_end(self, event: Event) -> None:
        planned = self._planned_new.get(event.request_id or "")
        if planned and self._decode is not None and (event.tokens or 0) < planned:
            # Stopped at EOS: the tokens it will not produce leave the planned total.
            task = self._task(self._decode)
            self.progress.update(self._decode, total=max((task.total or 0) - (planned - (event.tokens or 0)),
                                                         task.completed))

    @hookimpl
    def kvprof_run_end(self, run: RunInfo, error: BaseException | None) -> None:
        for task in (self._prefill, self._decode):
            if task is not None and error is None:
                self.progress.update(task, total=self._task(task).completed)
        self._set_stage(f"{run.strategy}: {'failed' if error else 'done'}: {run.trace_path}", finished=True)

    def _task(self, task_id: TaskID) -> Any:
        return next(task for task in self.progress.tasks if task.id == task_id)

    def _clear_run(self) -> None:
        """A new run (the next sweep point) replaces the last run's bars."""
        for task in (self._prefill, self._decode):
            if task is not None:
                self.progress.remove_task(task)
        self._prefill = self._decode = None
        self._prefilled.clear()
        self._decode_tokens = self._decode_ns = 0
        self._kv = (0.0, 0.0)
