"""The transformers plugin's model cache: one model load for the runs of a process, and a reused
model that gives the tokens a fresh one gives, whatever the run before it did to it."""

import pytest
import torch

from kvprof import WorkloadParams, WorkloadSpec, cli
from kvprof.session import TraceSettings, run_trace
from kvprof.trace import read_trace
from kvprof_transformers.model_cache import MODELS
from kvprof_transformers.plugin import FullStrategy
from kvprof_transformers.runner import StaticPolicy


def texts(path):
    ends = read_trace(path).of_kind("request_end")
    return dict(zip(ends["request_id"].to_pylist(), ends["text"].to_pylist()))


def settings(path, strategy="full", **options):
    params = WorkloadParams(prompt_len=40, output_len=8, batch_size=2, num_prompts=2)
    return TraceSettings(strategy=strategy, model="tiny-llama", weights="random", options=options,
                         workload=WorkloadSpec("synthetic", params), trace_path=path)


class FailsAfterPrefill(StaticPolicy):
    """Fails mid-run, as a batch that runs out of device memory does."""

    def after_prefill(self, batch, cache):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated after the prefill)")


def zero_output(module, args, output):
    return output * 0 if isinstance(output, torch.Tensor) else (output[0] * 0, *output[1:])


class LeakyFailingStrategy(FullStrategy):
    """A strategy that leaves a forward hook and an attribute in the model and then fails."""

    name = "leaky"

    def make_policy(self, loaded, options):
        layer = loaded.model.model.layers[0]
        layer.register_forward_hook(zero_output)  # left in place, it would change every later run's tokens
        layer.leaked_policy_state = object()
        return FailsAfterPrefill(graphs=False)


class WeightChangingStrategy(FullStrategy):
    name = "changes-weights"

    def make_policy(self, loaded, options):
        with torch.no_grad():
            loaded.model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
        return super().make_policy(loaded, options)


def test_a_sweep_loads_the_model_once(tmp_path):
    MODELS.clear()
    args = ["sweep", "-p", "full", "-p", "h2o", "-p", "offload", "-p", "infinigen", "--model", "tiny-llama",
            "--weights", "random", "--prompt-len", "32,48", "--output-len", "3", "-o", str(tmp_path), "--no-plots"]
    assert cli.main(args) == 0
    extras = [read_trace(path).run["extra"] for path in sorted(tmp_path.glob("*.arrow"))]
    assert len(extras) == 8
    assert sorted(extra["model_reused"] for extra in extras) == [False] + [True] * 7
    loaded_once = [extra for extra in extras if not extra["model_reused"]]
    assert loaded_once[0]["model_load_s"] > 0
    assert not any("model_restored" in extra for extra in extras)  # the built-in strategies leave nothing behind


def test_a_run_after_a_failing_leaky_run_matches_a_fresh_model(tmp_path):
    MODELS.clear()
    fresh = run_trace(settings(tmp_path / "fresh.arrow"))
    assert fresh.error is None and fresh.run.extra["model_reused"] is False
    failed = run_trace(settings(tmp_path / "leaky.arrow", "leaky"), strategy_cls=LeakyFailingStrategy)
    assert isinstance(failed.error, torch.OutOfMemoryError)
    layer = MODELS.entry.loaded.model.model.layers[0]
    assert not layer._forward_hooks and not hasattr(layer, "leaked_policy_state")
    after = run_trace(settings(tmp_path / "after.arrow"))
    assert after.error is None and after.run.extra["model_reused"] is True
    restored = after.run.extra["model_restored"]
    assert any("_forward_hooks" in item for item in restored)
    assert any("leaked_policy_state" in item for item in restored)
    assert texts(tmp_path / "after.arrow") == texts(tmp_path / "fresh.arrow")
    h2o = run_trace(settings(tmp_path / "h2o-reused.arrow", "h2o", engine="eager"))
    MODELS.clear()
    h2o_fresh = run_trace(settings(tmp_path / "h2o-fresh.arrow", "h2o", engine="eager"))
    assert h2o.run.extra["model_reused"] and not h2o_fresh.run.extra["model_reused"]
    assert texts(tmp_path / "h2o-reused.arrow") == texts(tmp_path / "h2o-fresh.arrow")


def test_a_model_whose_weights_changed_is_loaded_again(tmp_path):
    MODELS.clear()
    with pytest.warns(UserWarning, match="changed the model's weights"):
        changed = run_trace(settings(tmp_path / "changed.arrow", "changes-weights"),
                            strategy_cls=WeightChangingStrategy)
    assert changed.error is None and MODELS.entry is None
    fresh = run_trace(settings(tmp_path / "fresh.arrow"))
    assert fresh.run.extra["model_reused"] is False


def test_another_seed_or_dtype_loads_another_model(tmp_path):
    MODELS.clear()
    first = run_trace(settings(tmp_path / "a.arrow"))
    other_seed = settings(tmp_path / "b.arrow")
    other_seed.seed = 1
    second = run_trace(other_seed)
    other_dtype = settings(tmp_path / "c.arrow")
    other_dtype.seed, other_dtype.dtype = 1, "bfloat16"
    third = run_trace(other_dtype)
    assert [run.run.extra["model_reused"] for run in (first, second, third)] == [False, False, False]
    assert str(MODELS.entry.loaded.dtype) == "torch.bfloat16"
