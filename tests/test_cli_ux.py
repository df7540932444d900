"""What a new user meets first: --version, help with defaults, plugins with their options,
models, the live display (status before the run, totals), and sweep --dry-run."""

import argparse
import io
import json

import pytest
from rich.console import Console

import kvprof
from kvprof import RunInfo, WorkloadParams, WorkloadSpec, cli, hookimpl
from kvprof.display import LiveDisplay
from kvprof.plugins import load_plugins
from kvprof.session import TraceSettings, run_trace


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvprof {kvprof.__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    commands = _subparsers(cli.build_parser())
    assert {"trace", "sweep", "plugins", "models", "analyze", "compare", "export", "validate"} <= set(commands)
    for name, parser in commands.items():
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"kvprof {name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in (action.help or "") or f"(default: {action.default})" in help_text, \
                    f"kvprof {name} {action.option_strings}: default not shown"
    trace_help = " ".join(commands["trace"].format_help().split())
    assert "--prompt-len PROMPT_LEN prompt (context) length in tokens (default: 512)" in trace_help


def test_plugins_lists_each_strategys_options_with_type_default_and_help(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    strategies = {s["name"]: s for row in rows for s in row.get("strategy_details", [])}
    assert {"full", "offload", "h2o", "infinigen", "vllm"} <= set(strategies)
    options = {option["name"]: option for option in strategies["offload"]["options"]}
    assert options["overlap"]["type"] == "bool" and options["overlap"]["default"] is True
    assert "prefetch" in options["overlap"]["help"]
    assert cli.main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "strategy h2o" in text and "heavy_ratio" in text


def test_models_lists_the_embedded_model_and_the_aliases(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["smollm2-135m"]["source"] == "embedded"
    llama = rows["llama-3-8b"]
    assert (llama["source"], llama["layers"], llama["attention_heads"], llama["kv_heads"]) == ("alias", 32, 32, 8)
    assert llama["hf_id"] == "meta-llama/Meta-Llama-3-8B"


def test_sweep_dry_run_lists_the_runs_and_runs_nothing(tmp_path, capsys):
    folder = tmp_path / "sweep"
    status = cli.main(["sweep", "--plugin", "full", "--plugin", "h2o", "--model", "tiny-llama", "--weights", "random",
                       "--prompt-len", "32,64", "--opt-grid", "heavy_ratio=0.1,0.2", "--repeats", "2",
                       "-o", str(folder), "--dry-run"])
    assert status == 0
    out = capsys.readouterr().out
    # full: 2 prompt lengths; h2o: 2 prompt lengths x 2 ratios; each twice
    assert "12 runs (6 points x 2 repeats), 12 to run" in out
    assert "h2o heavy_ratio=0.2 prompt=64" in out
    assert not folder.exists()


class StatusRecorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def kvprof_status(self, run, message):
        self.calls.append(("status", message))

    @hookimpl
    def kvprof_run_start(self, run):
        self.calls.append(("run_start", run.strategy))


def tiny_settings(tmp_path, display=None, num_prompts=3) -> TraceSettings:
    params = WorkloadParams(prompt_len=16, output_len=4, batch_size=2, num_prompts=num_prompts)
    return TraceSettings(strategy="full", model="tiny-llama", weights="random",
                         workload=WorkloadSpec("synthetic", params), trace_path=tmp_path / "run.arrow", display=display)


def test_status_messages_reach_plugins_before_the_run_starts(tmp_path):
    recorder = StatusRecorder()
    outcome = run_trace(tiny_settings(tmp_path), load_plugins(extra={"recorder": recorder}))
    assert outcome.error is None
    kinds = [kind for kind, _ in recorder.calls]
    assert kinds.index("status") < kinds.index("run_start")
    messages = [message for kind, message in recorder.calls if kind == "status"]
    assert messages[0].startswith("loading tiny-llama (random weights)")
    assert any(message.startswith("allocating the full cache") for message in messages)


def test_live_display_shows_the_stages_and_the_totals(tmp_path):
    from kvprof_transformers.model_cache import MODELS

    MODELS.clear()  # the model loads in this run (a model an earlier test loaded would be reused at once)
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    with LiveDisplay(console) as display:
        outcome = run_trace(tiny_settings(tmp_path, display), load_plugins())
    assert outcome.error is None
    text = console.export_text()
    assert "full: loading tiny-llama" in text
    assert "full: done" in text
    assert "3/3" in text and "requests" in text        # every request prefilled
    assert "9/9" in text and "tokens" in text          # 3 requests x (4 - 1) decode tokens


def test_every_stage_is_drawn_however_short():
    """A stage that ends before the display's next timed refresh (a cached model's load) is drawn too."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    run = RunInfo(strategy="full", model={}, workload={}, options={}, device="cpu")
    with LiveDisplay(console) as display:
        for stage in ("loading", "allocating", "warming up"):
            display.kvprof_status(run=run, message=stage)
    text = console.export_text()
    assert all(f"full: {stage}" in text for stage in ("loading", "allocating", "warming up"))


def test_no_live_display_off_a_terminal_unless_asked():
    parser = cli.build_parser()
    args = parser.parse_args(["trace", "--plugin", "full"])
    assert not cli.live_display_wanted(args)  # pytest's stderr is not a terminal
    assert cli.live_display_wanted(parser.parse_args(["trace", "--plugin", "full", "--progress"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["trace", "--plugin", "full", "--progress", "--quiet"])


def test_live_display_counts_a_chunked_prefill_once_and_drops_tokens_an_early_stop_never_makes():
    from kvprof import Event, Kind, RunInfo

    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    run = RunInfo(strategy="vllm", model={}, options={}, trace_path="t.arrow",
                  workload={"requests": [{"request_id": "a", "max_new_tokens": 10},
                                         {"request_id": "b", "max_new_tokens": 10}]})
    display = LiveDisplay(console)
    display.kvprof_run_start(run)
    for request in ("a", "a", "b"):  # a's prompt in two chunks
        display.kvprof_prefill(Event(Kind.PREFILL, 0, 1, request_id=request, ext={"chunk": 1.0}))
    display.kvprof_decode_step(Event(Kind.DECODE_STEP, 1, 2, tokens=3, ext={"prefill_tokens": 1.0}))
    display.kvprof_request_end(Event(Kind.REQUEST_END, 0, 2, request_id="a", tokens=3))  # EOS after 3 of 10
    console.print(display._render())
    text = console.export_text()
    assert "2/2" in text                      # prefill: two requests, not three events
    assert "2/11" in text                     # decode: 18 planned, less a's 7 that will never come
