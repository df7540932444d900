"""The fast engine (static cache, graph-captured decode on CUDA) against the eager reference."""

from __future__ import annotations

import pytest

from kvprof import Profiler, RunInfo, UsageError, WorkloadParams, WorkloadSpec
from kvprof.plugins import load_plugins
from kvprof_transformers.offload import StaticOffloadPolicy
from kvprof_transformers.runner import FullCachePolicy, Runner, StaticPolicy

pytestmark = pytest.mark.slow


def _silent() -> Profiler:
    return Profiler(load_plugins().manager, RunInfo(strategy="full", model={}, workload={}, options={}), enabled=False)


def _passkey_requests(loaded, prompt_len: int, count: int, trim: int = 0):
    spec = WorkloadSpec("passkey", WorkloadParams(prompt_len=prompt_len, output_len=8, batch_size=count,
                                                  num_prompts=count))
    requests = spec.build(loaded.encode, loaded.chat_wrapping(), vocab_size=loaded.config.vocab_size).requests
    if trim:  # unequal lengths: the batch is left-padded
        requests[1].prompt_token_ids = requests[1].prompt_token_ids[trim:]
    return requests


def test_static_engine_gives_the_eager_engines_greedy_tokens_with_padding(smollm2):
    requests = _passkey_requests(smollm2, 256, 3, trim=7)
    eager = Runner(smollm2, FullCachePolicy(), _silent()).run(requests, batch_size=3)
    static = Runner(smollm2, StaticPolicy(), _silent()).run(requests, batch_size=3)
    assert static == eager
    assert all(len(tokens) >= 1 for tokens in static)


def test_static_engine_matches_eager_with_a_followup_turn_and_a_smaller_last_batch(smollm2):
    requests = _passkey_requests(smollm2, 192, 3)
    for request in requests:  # the question as a second turn through the same cache
        request.followup_token_ids = request.prompt_token_ids[-12:]
        request.prompt_token_ids = request.prompt_token_ids[:-12]
    requests[2].followup_token_ids = requests[2].followup_token_ids[3:]  # a padded follow-up chunk
    eager = Runner(smollm2, FullCachePolicy(), _silent()).run(requests, batch_size=2)
    static = Runner(smollm2, StaticPolicy(), _silent()).run(requests, batch_size=2)
    assert static == eager


@pytest.mark.parametrize("policy", [StaticPolicy, StaticOffloadPolicy])
@pytest.mark.parametrize("prompt_trim", [0, 5], ids=["equal-prompts", "padded-prompts"])
def test_followups_of_unequal_lengths_in_one_batch_give_the_tokens_of_one_at_a_time(smollm2, policy, prompt_trim):
    # The facts workload's `after` mode: each row's question (its follow-up) has its own length.
    requests = _passkey_requests(smollm2, 160, 3, trim=prompt_trim)
    for request, cut in zip(requests, (12, 9, 15)):
        request.followup_token_ids = request.prompt_token_ids[-cut:]
        request.prompt_token_ids = request.prompt_token_ids[:-cut]
    one_at_a_time = Runner(smollm2, FullCachePolicy(), _silent()).run(requests, batch_size=1)
    batched = Runner(smollm2, policy(), _silent()).run(requests, batch_size=3)
    assert batched == one_at_a_time


def test_kv_bytes_are_slot_arithmetic_that_agrees_with_the_eager_tensors(smollm2):
    requests = _passkey_requests(smollm2, 128, 2)
    for request in requests:
        request.ignore_eos = True
    readings = {}
    for policy in (FullCachePolicy(), StaticPolicy()):
        runner = Runner(smollm2, policy, _silent())
        seen = []
        original = runner._record_tokens

        def record(batch, ids, at_ns, runner=runner, seen=seen, original=original):
            original(batch, ids, at_ns)
            seen.append(runner.policy.kv_bytes(getattr(runner, "_cache", None)).device
                        if isinstance(runner.policy, StaticPolicy) else None)

        runner._record_tokens = record
        runner.run(requests, batch_size=2)
        readings[type(policy).__name__] = seen
    static = readings["StaticPolicy"]
    text = smollm2.config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) \
        * smollm2.dtype.itemsize * 2  # two rows
    assert [b - a for a, b in zip(static, static[1:])] == [per_token] * (len(static) - 1)
    width = max(len(r.prompt_token_ids) for r in requests)
    assert static[0] == per_token * width  # after prefill: the prompt's slots


def test_a_cache_that_does_not_fit_is_refused_before_allocating(smollm2):
    requests = _passkey_requests(smollm2, 128, 1)
    requests[0].max_new_tokens = 1 << 40
    with pytest.raises(UsageError, match=r"needs .* GiB .* free"):
        Runner(smollm2, StaticPolicy(), _silent()).run(requests, batch_size=1)
