"""The CLI's contract with users: one clear line and exit 2 for their mistakes, no traceback."""

import json
import subprocess
import sys

import pytest

from kvprof import hookimpl

KVPROF = [sys.executable, "-m", "kvprof.cli"]


def kvprof(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*KVPROF, *args], capture_output=True, text=True, timeout=timeout)


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_plugin_names_the_installed_ones():
    assert_usage_error(kvprof("trace", "--plugin", "nope"), "unknown plugin 'nope'", "full")


def test_alias_without_local_weights_names_weights_random(tmp_path, monkeypatch):
    result = kvprof("trace", "--plugin", "full", "--model", "llama-3-8b")
    assert_usage_error(result, "--weights random")


@pytest.mark.parametrize("args, needle", [
    (["--prompt-len", "-5"], "prompt_len"),
    (["--depth", "2"], "depth"),
    (["--opt", "nonsense=1"], "unknown option"),
    (["--opt", "novalue"], "KEY=VALUE"),
])
def test_invalid_workload_or_options(args, needle):
    result = kvprof("trace", "--plugin", "full", "--model", "tiny-llama", "--weights", "random", *args)
    assert_usage_error(result, needle)


@pytest.mark.parametrize("content, needle", [
    (None, "no such trace file"),
    (b"", "empty file"),
    (b"garbage garbage", "not an Arrow IPC file or stream"),
])
def test_bad_trace_files(tmp_path, content, needle):
    path = tmp_path / "bad.arrow"
    if content is not None:
        path.write_bytes(content)
    assert_usage_error(kvprof("analyze", str(path)), needle)


def test_plugins_lists_the_builtin_strategies_as_json():
    result = kvprof("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    strategies = {s for row in rows for s in row.get("strategies", [])}
    assert {"full"} <= strategies
    transformers_row = next(row for row in rows if row["name"] == "transformers")
    assert transformers_row["version"] != "?"
    assert "kvprof_register_strategies" in transformers_row["hooks"]


class CrashingStrategy:
    """A strategy that reports a prefill, then fails the way a buggy plugin would."""

    name = "crashes"
    description = "fails after its first event"
    options = ()

    def run(self, ctx):
        ctx.profiler.start()
        ctx.profiler.emit_prefill(1, 2, request_id="req-0", tokens=3)
        raise RuntimeError("boom inside the plugin")


class CrashingPlugin:
    @hookimpl
    def kvprof_register_strategies(self, register):
        register(CrashingStrategy)


def trace_with_extra_plugin(monkeypatch, capsys, plugin, name, args):
    """`kvprof trace ARGS` with `plugin` registered beside the installed ones: (status, stderr)."""
    from kvprof import cli, session
    from kvprof.plugins import load_plugins

    monkeypatch.setattr(session, "load_plugins", lambda: load_plugins(extra={name: plugin}))
    status = cli.main(["trace", "--model", "tiny-llama", "--weights", "random", *args])
    return status, capsys.readouterr().err


def test_a_crashing_plugin_is_named_and_its_trace_stays_readable(tmp_path, monkeypatch, capsys):
    from kvprof.trace import partial_path, read_trace

    path = tmp_path / "crash.arrow"
    status, err = trace_with_extra_plugin(monkeypatch, capsys, CrashingPlugin(), "crashing-plugin",
                                          ["--plugin", "crashes", "-o", str(path)])
    assert status == 1
    assert "crashing-plugin" in err and "boom inside the plugin" in err and "Traceback" not in err
    assert f"the events so far are in {partial_path(path)}" in err and not path.exists()
    trace = read_trace(partial_path(path))
    assert trace.table["kind"].cast("string").to_pylist() == ["run_start", "prefill", "run_end"]
    assert any("failed" in warning for warning in trace.warnings)


class ExplodingSink:
    @hookimpl
    def kvprof_decode_step(self, event):
        raise ValueError("sink broke")


class ExplodingSinkPlugin:
    @hookimpl
    def kvprof_make_sinks(self, run, profiler):
        return [ExplodingSink()]


def test_a_crashing_sink_is_named_and_the_trace_stays_readable(tmp_path, monkeypatch, capsys):
    from kvprof.trace import partial_path, read_trace

    path = tmp_path / "sink.arrow"
    status, err = trace_with_extra_plugin(monkeypatch, capsys, ExplodingSinkPlugin(), "exploding-sink",
                                          ["--plugin", "full", "--prompt-len", "16", "--output-len", "4",
                                           "-o", str(path)])
    assert status == 1
    assert "plugin 'exploding-sink:ExplodingSink' failed" in err and "sink broke" in err and "Traceback" not in err
    kinds = read_trace(partial_path(path)).table["kind"].cast("string").to_pylist()
    assert kinds[:2] == ["run_start", "prefill"] and kinds[-1] == "run_end"
