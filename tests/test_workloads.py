import pytest

from kvprof import UsageError, WorkloadParams, WorkloadSpec
from kvprof.workloads import FILLER, answer_is_correct, poisson_arrivals


def encode(text: str) -> list[int]:
    """A stand-in tokenizer with stable ids: one token per whitespace-separated word."""
    return [sum(map(ord, word)) % 30000 for word in text.split()]


def test_synthetic_is_exact_and_deterministic():
    spec = WorkloadSpec("synthetic", WorkloadParams(prompt_len=100, output_len=7, num_prompts=3, seed=5))
    first, second = spec.build(encode), spec.build(encode)
    assert [len(r.prompt_token_ids) for r in first.requests] == [100, 100, 100]
    assert [r.prompt_token_ids for r in first.requests] == [r.prompt_token_ids for r in second.requests]
    assert all(r.ignore_eos and r.max_new_tokens == 7 for r in first.requests)


def test_passkey_span_holds_the_key_at_the_requested_depth():
    spec = WorkloadSpec("passkey", WorkloadParams(prompt_len=400, depth=0.25, seed=1))
    (request,) = spec.build(encode).requests
    probe = request.probe
    start, end = probe.spans[0]
    assert encode(f"The pass key is {probe.answer}. Remember it.")[0:5] == request.prompt_token_ids[start:start + 5]
    assert len(request.prompt_token_ids) == 400
    opening = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
    filler_before = start - len(encode(opening))
    assert abs(filler_before / (400 - (end - start)) - 0.25) < 0.1


def test_facts_record_every_span_and_ask_in_turn():
    spec = WorkloadSpec("facts", WorkloadParams(prompt_len=300, num_prompts=3, num_facts=3, seed=2))
    requests = spec.build(encode, chat=("<user> ", " <assistant>")).requests
    assert [r.probe.asked for r in requests] == [0, 1, 2]
    for request in requests:
        assert len(request.probe.spans) == 3
        for start, end in request.probe.spans:
            assert 0 < start < end < 300
        assert request.prompt_token_ids[:1] == encode("<user>")


def test_random_weight_vocab_is_respected():
    spec = WorkloadSpec("passkey", WorkloadParams(prompt_len=200))
    (request,) = spec.build(encode, vocab_size=1000).requests
    assert max(request.prompt_token_ids) < 1000


def test_poisson_arrivals_have_the_requested_rate():
    import random

    times = poisson_arrivals(4000, rate=8.0, rng=random.Random(0))
    assert times[0] == 0.0 and times == sorted(times)
    assert abs(len(times) / times[-1] - 8.0) < 0.5


@pytest.mark.parametrize("params, message", [
    (WorkloadParams(prompt_len=-1), "prompt_len"),
    (WorkloadParams(depth=1.5), "depth"),
    (WorkloadParams(rate=0), "rate"),
    (WorkloadParams(num_facts=99), "num_facts"),
])
def test_bad_parameters_are_usage_errors(params, message):
    with pytest.raises(UsageError, match=message):
        WorkloadSpec("passkey", params).validate()


def test_too_short_context_is_a_usage_error():
    with pytest.raises(UsageError, match="too short"):
        WorkloadSpec("facts", WorkloadParams(prompt_len=10)).build(encode)


def test_answer_check_is_case_insensitive():
    assert answer_is_correct({"answer": "Lisbon"}, " lisbon.")
    assert not answer_is_correct({"answer": "Lisbon"}, FILLER)
