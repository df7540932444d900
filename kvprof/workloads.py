"""Workloads: what a run feeds the model. Deterministic by seed.

* synthetic: random token ids of an exact prompt length; output length forced (EOS ignored).
* passkey: a number hidden at a chosen depth of filler text, then the question; the answer is
  checked in the output and the key's token span is recorded.
* facts: several facts at the start of the context, filler, then a question about one of them;
  every fact's token span is recorded, so retention analyses can ask whether those tokens were
  still cached when the question was asked.

Probe workloads ask their question in one of two ways (`question`, recorded in the trace):
`in_prompt` ends the prompt with it; `after` cuts the same tokens at the question, so the
context is prefilled (and managed by the strategy) first and the question is fed afterwards
through the same cache as a follow-up turn (`Request.followup_token_ids`), as in a chat. Both
modes feed the same tokens at the same positions.

Every workload may carry arrival times (a Poisson process at `rate` requests/s) for engines that
serve concurrent requests; without a rate all requests arrive at time 0.

Prompts are built as token ids, segment by segment, so the recorded spans are exact. The
tokenizer is passed in as two small things: `encode(text) -> ids` (no special tokens) and the
chat wrapping `(before, after)` around a user message, so this module imports no framework.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvprof.errors import UsageError

Encode = Callable[[str], list[int]]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FACTS = [
    ("The secret color of the front door is", "crimson", "What is the secret color of the front door?"),
    ("The name of the captain's cat is", "Biscuit", "What is the name of the captain's cat?"),
    ("The city where the treaty was signed is", "Lisbon", "In which city was the treaty signed?"),
    ("The code word for the mission is", "falcon", "What is the code word for the mission?"),
    ("The number of moons around planet Zorb is", "17", "How many moons are around planet Zorb?"),
    ("The favorite fruit of the old baker is", "mango", "What is the favorite fruit of the old baker?"),
    ("The month when the festival starts is", "October", "In which month does the festival start?"),
    ("The instrument the librarian plays is", "cello", "Which instrument does the librarian play?"),
]


@dataclass
class Probe:
    """What a retention prompt asks, where its facts are, and the right answer."""

    kind: str                          # "passkey" | "fact"
    answer: str                        # expected in the output (case-insensitive)
    spans: list[tuple[int, int]]       # token spans [start, end) of each fact in the prompt
    asked: int = 0                     # which span the question is about
    depth: float | None = None         # passkey: relative position of the key in the context


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    ignore_eos: bool = False
    probe: Probe | None = None
    # A second turn fed through the same cache after the prompt was prefilled and managed
    # (`--question after`): the engine prefills it as a second chunk before decoding.
    followup_token_ids: list[int] = field(default_factory=list)


@dataclass
class Workload:
    name: str
    params: dict[str, Any]
    requests: list[Request] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The workload as recorded in the trace: parameters and, per request, its probe."""
        return {
            "name": self.name,
            "params": self.params,
            "requests": [
                {"request_id": r.request_id, "prompt_tokens": len(r.prompt_token_ids),
                 "followup_tokens": len(r.followup_token_ids), "max_new_tokens": r.max_new_tokens,
                 "arrival_s": r.arrival_s,
                 "probe": asdict(r.probe) if r.probe else None}
                for r in self.requests
            ],
        }


@dataclass(frozen=True)
class WorkloadParams:
    """Parameters of all workloads; each uses the ones that apply."""

    prompt_len: int = 512          # tokens (synthetic: exact; passkey/facts: context length)
    output_len: int = 32           # tokens to generate (probes stop earlier at EOS)
    num_prompts: int = 1           # requests in the workload
    batch_size: int = 1            # requests run together by batch engines
    depth: float = 0.5             # passkey depth in [0, 1]
    num_facts: int = 4             # facts workload: facts at the start
    rate: float | None = None      # requests/s of the Poisson arrival process; None = all at 0
    question: str = "in_prompt"    # probes: "in_prompt" | "after" (a follow-up turn, see the module doc)
    seed: int = 0
    vocab_size: int = 32000        # synthetic token ids are drawn below this

    def validate(self) -> None:
        for name in ("prompt_len", "output_len", "num_prompts", "batch_size", "num_facts", "vocab_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"workload parameter {name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.depth <= 1.0:
            raise UsageError(f"workload parameter depth={self.depth} must be in [0, 1]")
        if self.rate is not None and self.rate <= 0:
            raise UsageError(f"workload parameter rate={self.rate} must be positive")
        if self.question not in QUESTION_MODES:
            raise UsageError(f"workload parameter question={self.question!r}: "
                             f"choose one of {', '.join(QUESTION_MODES)}")
        if self.num_facts > len(FACTS):
            raise UsageError(f"workload parameter num_facts={self.num_facts}: at most {len(FACTS)}")


WORKLOADS = ("synthetic", "passkey", "facts")
PROBE_WORKLOADS = ("passkey", "facts")
QUESTION_MODES = ("in_prompt", "after")


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload before a tokenizer is known: strategies build it once the model is loaded."""

    name: str
    params: WorkloadParams = field(default_factory=WorkloadParams)

    def validate(self) -> None:
        if self.name not in WORKLOADS:
            raise UsageError(f"unknown workload {self.name!r}; choose one of: {', '.join(WORKLOADS)}")
        self.params.validate()

    def build(self, encode: Encode, chat: tuple[str, str] = ("", ""), vocab_size: int | None = None) -> Workload:
        """The requests, for a tokenizer (`encode`, `chat`) and a model of `vocab_size` tokens."""
        params = self.params
        if vocab_size is not None:
            params = replace(params, vocab_size=min(params.vocab_size, vocab_size))
        workload = build_workload(self.name, params, encode, chat)
        if vocab_size is not None:
            # A random-weight model may have a smaller vocabulary than the tokenizer lent to it.
            for request in workload.requests:
                request.prompt_token_ids = [t % vocab_size for t in request.prompt_token_ids]
                request.followup_token_ids = [t % vocab_size for t in request.followup_token_ids]
        return workload


def chat_wrapping(tokenizer: Any) -> tuple[str, str]:
    """The text before and after a user message in the tokenizer's chat template, or ("", "")."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    sentinel = "\x00KVPROF\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(sentinel)
    return before, after


def build_workload(name: str, params: WorkloadParams, encode: Encode,
                   chat: tuple[str, str] = ("", "")) -> Workload:
    """The requests of workload `name`; `chat` wraps each prompt as the model's user turn."""
    WorkloadSpec(name, params).validate()
    builders = {"synthetic": _synthetic, "passkey": _passkey, "facts": _facts}
    rng = random.Random(params.seed)
    requests = [builders[name](i, params, encode, chat, rng) for i in range(params.num_prompts)]
    for request, arrival in zip(requests, poisson_arrivals(params.num_prompts, params.rate, rng)):
        request.arrival_s = arrival
    return Workload(name, asdict(params), requests)


def poisson_arrivals(count: int, rate: float | None, rng: random.Random) -> list[float]:
    """Arrival times in seconds: exponential gaps of mean 1/rate, or all 0 without a rate."""
    if rate is None:
        return [0.0] * count
    now, times = 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def _synthetic(i: int, p: WorkloadParams, encode: Encode, chat: tuple[str, str], rng: random.Random) -> Request:
    # Skip the lowest ids: tokenizers keep special tokens there.
    ids = [rng.randrange(256, p.vocab_size) for _ in range(p.prompt_len)]
    return Request(f"req-{i}", ids, p.output_len, ignore_eos=True)


class _PromptBuilder:
    """Concatenates encoded segments and remembers where chosen segments landed."""

    def __init__(self, encode: Encode) -> None:
        self.encode = encode
        self.ids: list[int] = []

    def add(self, text: str) -> tuple[int, int]:
        start = len(self.ids)
        self.ids.extend(self.encode(text))
        return start, len(self.ids)

    def request(self, request_id: str, question: str, mode: str, output_len: int, probe: Probe) -> Request:
        """The request: the question ends the prompt (`in_prompt`) or is its follow-up (`after`)."""
        start, _ = self.add(question)
        ids, followup = (self.ids, []) if mode == "in_prompt" else (self.ids[:start], self.ids[start:])
        return Request(request_id, ids, output_len, probe=probe, followup_token_ids=followup)

    def add_filler(self, count: int) -> None:
        unit = self.encode(FILLER)
        self.ids.extend((unit * (count // len(unit) + 1))[:count])


def _filler_budget(p: WorkloadParams, fixed_tokens: int) -> int:
    budget = p.prompt_len - fixed_tokens
    if budget < 0:
        raise UsageError(f"prompt_len={p.prompt_len} is too short for this workload "
                         f"(needs at least {fixed_tokens} tokens)")
    return budget


def _passkey(i: int, p: WorkloadParams, encode: Encode, chat: tuple[str, str], rng: random.Random) -> Request:
    key = str(rng.randrange(10000, 100000))
    intro = chat[0] + "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    # The question ends the user turn; the assistant turn starts with the answer's lead-in,
    # so even a small model answers with the number rather than a chat reply.
    question = "What is the pass key?" + chat[1] + "The pass key is"
    fixed = sum(len(encode(t)) for t in (intro, needle, question))
    filler = _filler_budget(p, fixed)
    before = int(filler * p.depth)
    prompt = _PromptBuilder(encode)
    prompt.add(intro)
    prompt.add_filler(before)
    span = prompt.add(needle)
    prompt.add_filler(filler - before)
    probe = Probe("passkey", key, [span], 0, p.depth)
    return prompt.request(f"req-{i}", question, p.question, p.output_len, probe)


def _facts(i: int, p: WorkloadParams, encode: Encode, chat: tuple[str, str], rng: random.Random) -> Request:
    chosen = rng.sample(FACTS, p.num_facts)
    asked = i % p.num_facts
    intro = chat[0] + "Read the facts below and remember them; a question about them comes at the end.\n"
    statements = [f"{subject} {answer}.\n" for subject, answer, _ in chosen]
    question = "\nAnswer in one word. " + chosen[asked][2] + chat[1]
    fixed = sum(len(encode(t)) for t in (intro, *statements, question))
    prompt = _PromptBuilder(encode)
    prompt.add(intro)
    spans = [prompt.add(statement) for statement in statements]
    prompt.add_filler(_filler_budget(p, fixed))
    probe = Probe("fact", chosen[asked][1], spans, asked)
    return prompt.request(f"req-{i}", question, p.question, p.output_len, probe)


def answer_is_correct(probe: dict[str, Any] | Probe, text: str) -> bool:
    """Whether generated `text` contains the probe's answer (case-insensitive)."""
    answer = probe.answer if isinstance(probe, Probe) else probe["answer"]
    return answer.lower() in (text or "").lower()
