"""`kvprof sweep`: the grid, resuming, and figures from real (tiny, random-weight) runs."""

import json

import pytest

from kvprof import UsageError, WorkloadParams, cli, hookimpl
from kvprof.sweep import parse_grid, plan
from kvprof.trace import partial_path, read_trace
from sweep_runs import OutOfMemoryStrategy, with_out_of_memory_strategy


def test_option_axes_apply_only_to_plugins_that_take_them():
    points = plan(["full", "h2o"], WorkloadParams(), {"prompt_len": [64, 128], "batch_size": [1, 2]},
                  parse_grid(["heavy_ratio=0.1,0.2"]))
    assert len([p for p in points if p.strategy == "full"]) == 4
    assert len([p for p in points if p.strategy == "h2o"]) == 8
    assert {p.params.num_prompts for p in points if p.params.batch_size == 2} == {2}
    names = {p.file_name() for p in points}
    assert "h2o-heavy_ratio=0.2-p128-b2-o32.arrow" in names and len(names) == 12


def test_probe_workloads_run_twenty_prompts_per_point_and_sweep_their_own_axes():
    axes = {"batch_size": [1, 32], "depth": [0.1, 0.9], "question": ["in_prompt", "after"]}
    points = plan(["full"], WorkloadParams(), axes, {}, workload="passkey")
    assert len(points) == 8
    assert {(p.params.batch_size, p.params.num_prompts) for p in points} == {(1, 20), (32, 32)}
    assert "full-p512-b1-o32-n20-d0.1-qafter.arrow" in {p.file_name() for p in points}
    chosen = plan(["full"], WorkloadParams(), {"num_prompts": [5], "num_facts": [2]}, {}, workload="facts")
    assert [p.file_name() for p in chosen] == ["full-p512-b1-o32-n5-f2.arrow"]
    assert plan(["full"], WorkloadParams(), {"batch_size": [4]}, {})[0].params.num_prompts == 4  # synthetic


def test_an_option_no_plugin_takes_is_refused():
    with pytest.raises(UsageError, match="alpha"):
        plan(["full"], WorkloadParams(), {"prompt_len": [64]}, parse_grid(["alpha=1,2"]))


def test_sweep_runs_resumes_and_draws(tmp_path, capsys):
    args = ["sweep", "-p", "full", "-p", "h2o", "--model", "tiny-llama", "--weights", "random",
            "--workload", "passkey", "--prompt-len", "96,160", "--output-len", "3", "--num-prompts", "2",
            "--opt", "recent_ratio=0.2", "-o", str(tmp_path)]
    assert cli.main(args) == 0
    traces = sorted(tmp_path.glob("*.arrow"))
    assert len(traces) == 4
    h2o = read_trace(tmp_path / "h2o-recent_ratio=0.2-p160-b1-o3-n2.arrow")
    assert h2o.run["options"]["recent_ratio"] == 0.2 and h2o.run["workload"]["params"]["prompt_len"] == 160
    assert {path.with_suffix(".json").is_file() for path in traces} == {True}  # a result file per point
    figures = {path.name for path in (tmp_path / "figures").glob("*.png")}
    assert {"ttft_vs_prompt_length.png", "accuracy_vs_budget.png", "latency_breakdown.png"} <= figures
    capsys.readouterr()
    assert cli.main(args + ["--no-plots"]) == 0
    assert capsys.readouterr().out.count("exists, skipped") == 4


def test_resume_runs_truncated_and_killed_points_again(tmp_path, capsys):
    args = ["sweep", "-p", "full", "--model", "tiny-llama", "--weights", "random", "--prompt-len", "32,48,64",
            "--output-len", "2", "-o", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 0
    done, cut, killed = (tmp_path / f"full-p{p}-b1-o2.arrow" for p in (32, 48, 64))
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])          # as an older kvprof left a killed run
    killed.rename(partial_path(killed))               # as this one leaves it
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"{done.name} exists, skipped" in out
    assert f"{cut.name}: its trace is truncated; running it again" in out
    assert not read_trace(cut).truncated and not read_trace(killed).truncated


class CrashingStrategy:
    name = "crashes"
    options = ()

    def run(self, ctx):
        ctx.profiler.start()
        raise RuntimeError("boom")


class CrashingPlugin:
    @hookimpl
    def kvprof_register_strategies(self, register):
        register(CrashingStrategy)


def test_a_failing_point_is_reported_and_left_out(tmp_path, capsys, monkeypatch):
    """The sweep goes on past a failing point, says which did not finish and exits 1; the
    next resume runs it again."""
    from kvprof import session, sweep
    from kvprof.plugins import load_plugins

    def with_crashing_plugin():
        return load_plugins(extra={"crashing": CrashingPlugin()})

    monkeypatch.setattr(session, "load_plugins", with_crashing_plugin)
    monkeypatch.setattr(sweep, "load_plugins", with_crashing_plugin)
    args = ["sweep", "-p", "crashes", "-p", "full", "--model", "tiny-llama", "--weights", "random",
            "--prompt-len", "32", "--output-len", "2", "-o", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "sweep point crashes-p32-b1-o2.arrow did not finish: RuntimeError: boom" in err
    assert (tmp_path / "full-p32-b1-o2.arrow").exists()
    assert sweep.unfinished_reason(tmp_path / "crashes-p32-b1-o2.arrow") == "its run did not finish (a partial trace)"
    crashed, full = json.loads((tmp_path / "index.json").read_text())["runs"]
    assert (crashed["status"], crashed["error"], crashed["out_of_memory"]) == ("failed", "RuntimeError: boom", False)
    assert full["status"] == "done" and full["figures"]["ttft_ms"] > 0 and full["result"] == "full-p32-b1-o2.json"


def test_a_point_over_the_models_context_is_recorded_failed_and_the_sweep_goes_on(tmp_path, capsys):
    """A point whose prompt + output exceed the model's context fails its preflight: the index
    marks it failed with the reason, the next point runs, the exit code says one did not finish."""
    from kvprof.models import resolve_model
    from kvprof.preflight import context_length

    _, positions = context_length(resolve_model("tiny-llama", "random").config)
    too_long = positions - 1  # with 2 output tokens: one over the context
    args = ["sweep", "-p", "full", "--model", "tiny-llama", "--weights", "random", "--prompt-len",
            f"{too_long},32", "--output-len", "2", "-o", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 1
    out, err = capsys.readouterr()
    impossible, fine = f"full-p{too_long}-b1-o2.arrow", "full-p32-b1-o2.arrow"
    assert f"{impossible} failed its preflight" in out
    assert f"sweep point {impossible} did not finish: UsageError: " in err and f"context of {positions}" in err
    assert (tmp_path / fine).exists() and not (tmp_path / impossible).exists()
    assert not partial_path(tmp_path / impossible).exists()  # nothing ran
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["status"] == {"failed": 1, "done": 1}
    over, done = index["runs"]
    assert (over["trace"], over["status"], over["out_of_memory"]) == (impossible, "failed", False)
    assert over["error"].startswith("UsageError: ") and f"context of {positions}" in over["error"]
    assert done["trace"] == fine and done["status"] == "done" and done["figures"]["ttft_ms"] > 0


@pytest.mark.parametrize("mistake, message", [
    (["--dtype", "float7"], "--dtype 'float7'"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--opt-grid", "heavy_ratio=0.1,lots"], "heavy_ratio"),
])
def test_an_argument_no_point_can_pass_fails_before_any_run(tmp_path, capsys, mistake, message):
    """Argument errors that do not depend on the model still stop the sweep at once (exit 2),
    before it writes an index or runs a point."""
    args = ["sweep", "-p", "full", "-p", "h2o", "--model", "tiny-llama", "--weights", "random",
            "--prompt-len", "32", "--output-len", "2", "-o", str(tmp_path / "sweep"), "--no-plots", *mistake]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_the_index_lists_every_run_and_marks_out_of_memory_points(tmp_path, monkeypatch):
    """index.json: every planned run with its repeat, status and figures, written before and
    after each run (a killed sweep leaves it); a point out of memory is a failed run marked so."""
    with_out_of_memory_strategy(monkeypatch)
    from kvprof_transformers.model_cache import MODELS

    MODELS.clear()  # the first run loads the model, the second reuses it
    OutOfMemoryStrategy.index_seen.clear()
    args = ["sweep", "-p", "full", "-p", "oom", "--model", "tiny-llama", "--weights", "random",
            "--prompt-len", "32", "--output-len", "2", "--repeats", "2", "-o", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 1
    assert OutOfMemoryStrategy.index_seen == [["done", "done", "running", "not run"],
                                             ["done", "done", "failed", "running"]]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["planned_runs"] == 4 and index["status"] == {"done": 2, "failed": 2}
    runs = index["runs"]
    assert [(run["strategy"], run["repeat"], run["trace"]) for run in runs] == [
        ("full", 0, "full-p32-b1-o2-0.arrow"), ("full", 1, "full-p32-b1-o2-1.arrow"),
        ("oom", 0, "oom-p32-b1-o2-0.arrow"), ("oom", 1, "oom-p32-b1-o2-1.arrow")]
    assert all(run["out_of_memory"] and "CUDA out of memory" in run["error"] for run in runs[2:])
    assert [run["model_reused"] for run in runs[:2]] == [False, True]
    assert all(run["params"]["prompt_len"] == 32 and run["figures"]["decode_tokens_per_s"] > 0 for run in runs[:2])
    assert cli.main(args) == 1  # resumed: the done runs are kept as such, the failed ones run again
    resumed = json.loads((tmp_path / "index.json").read_text())["runs"]
    assert [run["existed"] for run in resumed[:2]] == [True, True]


def test_skip_plugin_leaves_out_a_strategy_a_grid_names(tmp_path, capsys):
    args = ["sweep", "-p", "full", "-p", "h2o", "--skip-plugin", "h2o", "--model", "tiny-llama", "--weights",
            "random", "--prompt-len", "32,48", "-o", str(tmp_path), "--dry-run"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs (2 points" in out and " h2o " not in out
    assert cli.main(args + ["--skip-plugin", "full"]) != 0
    assert "--skip-plugin left no strategy" in capsys.readouterr().err
