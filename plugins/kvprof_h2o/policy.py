"""The H2O cache policy for the kvprof transformers runner.

Per layer and KV head, each sequence keeps its heavy hitters (the tokens with the largest
accumulated attention: post-softmax weights summed over queries and decode steps, no
normalization) plus its most recent tokens. Prefill evicts down to the budget; each decode step
adds one token and evicts one. The attention function (`attention.h2o_attention`) hands every
layer's call to `H2OPolicy.attend`, which computes the attention and its scores, and evicts right
after that layer's attention, as the authors' real-drop code does: the layer's cache tensors are
replaced by gathered, smaller ones, so the memory is really freed and `kv_bytes` measures it.

Bookkeeping beside the cache, per layer: each slot's true position (-1 = empty) and accumulated
score, gathered together with the keys and values. Masks are built from the positions, so the
runner's 2-D slot mask is not used (`attention_mask` returns None).

Events, after each forward: an EVICTION phase per layer (the score update and the eviction; at
detail "step" one per step carrying their summed duration), and an evict event per layer and
request with the evicted positions per KV head (detail "head": one per KV head; "step": one per
request and forward, with num_layers x kv_heads position lists, layer-major). `step` is None for
the eviction at the end of prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvprof import Medium, Phase, UsageError
from kvprof_h2o import attention
from kvprof_h2o.heavy_hitters import dropped_positions, gather_slots, select_slots
from kvprof_transformers.runner import Batch, CachePolicy, KVBytes, Runner


@dataclass(frozen=True)
class Budget:
    """Tokens each sequence keeps per layer and KV head: heavy hitters + a recent window.

    Ratios are of the request's prompt length, rounded down as in the authors' code
    (`int(ratio * prompt_len)`), and may add up to the whole prompt. A count in tokens, when
    given, replaces its ratio and may exceed the prompt, as the authors' absolute defaults
    (1024 + 1024) do for short prompts: eviction then starts during decoding. It may not exceed
    the longest cache the request can have (prompt + max_new_tokens - 1), where it would never
    evict anything.
    """

    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    heavy_tokens: int | None = None
    recent_tokens: int | None = None

    def check(self) -> None:
        """The checks that need no prompt (the per-option range checks are the Options')."""
        heavy_zero = self.heavy_tokens == 0 if self.heavy_tokens is not None else self.heavy_ratio == 0
        recent_zero = self.recent_tokens == 0 if self.recent_tokens is not None else self.recent_ratio == 0
        if heavy_zero and recent_zero:
            raise UsageError("h2o: the budget is zero (heavy and recent are both 0)")
        ratios = (self.heavy_ratio if self.heavy_tokens is None else 0.0) + \
                 (self.recent_ratio if self.recent_tokens is None else 0.0)
        if ratios > 1.0:
            raise UsageError(f"h2o: heavy_ratio + recent_ratio = {ratios:g} is larger than the prompt (at most 1)")

    def for_request(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
        """(heavy, recent) in tokens for a request of `prompt_len` prompt tokens."""
        heavy = self.heavy_tokens if self.heavy_tokens is not None else int(self.heavy_ratio * prompt_len)
        recent = self.recent_tokens if self.recent_tokens is not None else int(self.recent_ratio * prompt_len)
        if heavy + recent == 0:
            raise UsageError(f"h2o: the budget for a {prompt_len}-token prompt rounds down to 0 tokens; "
                             "raise heavy_ratio/recent_ratio or give heavy_tokens/recent_tokens")
        longest = prompt_len + max_new_tokens - 1
        if heavy + recent > longest:
            raise UsageError(f"h2o: the budget of {heavy} heavy + {recent} recent tokens is larger than the "
                             f"{prompt_len}-token prompt and its {max_new_tokens} new tokens")
        return heavy, recent


@dataclass
class _LayerBook:
    """Per slot of one layer's cache: the token's true position (-1: empty) and its score."""

    positions: torch.Tensor | None = None   # (B, H, S) int64
    scores: torch.Tensor | None = None      # (B, H, S) float32; None on exempt layers

    def append(self, positions: torch.Tensor, scored: bool) -> None:
        new_scores = torch.zeros(positions.shape, dtype=torch.float32, device=positions.device) if scored else None
        if self.positions is None:
            self.positions, self.scores = positions.contiguous(), new_scores
        else:
            self.positions = torch.cat([self.positions, positions], dim=-1)
            if scored:
                self.scores = torch.cat([self.scores, new_scores], dim=-1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.positions, self.scores) if t is not None)


@dataclass
class _BatchState:
    """What the policy tracks while one batch runs."""

    cache: Any
    heavy: torch.Tensor                 # (B,) heavy-hitter budget of each sequence
    recent: torch.Tensor                # (B,) recent-window budget
    budgets: list[int]                  # heavy + recent, per sequence
    books: list[_LayerBook]
    held: list[int] = field(default_factory=list)   # tokens per (layer, head) before this forward's eviction
    query_positions: torch.Tensor | None = None     # (B, q) of the forward in flight; -1 = padding
    dropped: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, n) positions
    spans: list[tuple[int, Any, Any]] = field(default_factory=list)  # (layer, start mark, end mark)
    layers_seen: set[int] = field(default_factory=set)
    columns: int = 0                    # columns of the runner's slot mask already fed (prefill chunks)

    @property
    def kept(self) -> list[int]:
        return [min(h, b) for h, b in zip(self.held, self.budgets)]

    @property
    def evicting(self) -> bool:
        return any(h > b for h, b in zip(self.held, self.budgets))


class H2OPolicy(CachePolicy):
    """Heavy hitters + recent window per layer and KV head; see the module docstring."""

    name = "h2o"

    def __init__(self, budget: Budget, exempt_layers: frozenset[int], previous_attention: str | None = None) -> None:
        self.budget = budget
        self.exempt_layers = exempt_layers
        self.previous_attention = previous_attention
        self.state: _BatchState | None = None

    # --- runner hooks ---------------------------------------------------------------------

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        self.num_layers = runner.loaded.config.get_text_config().num_hidden_layers
        attention.attach(runner.model, self)

    def new_cache(self, batch: Batch) -> Any:
        from transformers import DynamicCache

        budgets = [self.budget.for_request(n, r.max_new_tokens) for n, r in zip(batch.prompt_lens, batch.requests)]
        device = self.runner.device
        self.state = _BatchState(
            # Plain DynamicLayers everywhere: sliding windows are applied by position in `attend`.
            cache=DynamicCache(),
            heavy=torch.tensor([h for h, _ in budgets], device=device),
            recent=torch.tensor([r for _, r in budgets], device=device),
            budgets=[h + r for h, r in budgets],
            books=[_LayerBook() for _ in range(self.num_layers)],
        )
        return self.state.cache

    def attention_mask(self, batch: Batch, cache: Any) -> torch.Tensor | None:
        """Prepares the forward about to run; masking itself is by position, in `attend`."""
        state = self.state
        if batch.step < 0 and state.columns == 0:  # the prompt
            real = batch.attention_mask.bool()
            state.query_positions = torch.where(real, real.long().cumsum(-1) - 1, -1)
            state.held = list(batch.prompt_lens)
        elif batch.step < 0:  # a follow-up chunk: scored and evicted like the prompt
            real = batch.attention_mask[:, state.columns:].bool()
            first = batch.next_positions.long()[:, None]
            state.query_positions = torch.where(real, first + real.long().cumsum(-1) - 1, -1)
            state.held = [kept + n for kept, n in zip(state.kept, real.sum(-1).tolist())]
        else:
            state.query_positions = batch.next_positions.long().unsqueeze(-1)
            state.held = [kept + 1 for kept in state.kept]
        state.dropped.clear()
        state.spans.clear()
        state.columns = batch.attention_mask.shape[1]
        return None

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        if batch.attention_mask.shape[1] > tokens:  # a follow-up chunk (the prompt's reports in after_prefill)
            self._report(batch, cache)

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        missing = sorted(set(range(self.num_layers)) - self.state.layers_seen)
        if missing:
            raise UsageError(f"h2o: layers {missing} of this model did not call the attention function h2o "
                             "installs, so h2o cannot score or evict their tokens")
        self._report(batch, cache)

    def after_step(self, batch: Batch, cache: Any) -> None:
        self._report(batch, cache)

    def kv_bytes(self, cache: Any) -> KVBytes:
        result = super().kv_bytes(cache)
        if self.state is not None:
            result.aux_device += sum(book.nbytes() for book in self.state.books)
        return result

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        self.state = None

    def close(self) -> None:
        attention.detach(self.runner.model, self.previous_attention)

    # --- per layer, from the attention function ---------------------------------------------

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               sliding_window: int | None = None, softcap: float | None = None) -> tuple[torch.Tensor, None]:
        """One layer's attention for the forward in flight, then that layer's eviction."""
        state = self.state
        book = state.books[layer]
        scored = layer not in self.exempt_layers
        batch, kv_heads, q_len = key.shape[0], key.shape[1], query.shape[2]
        book.append(state.query_positions[:, None, :].expand(batch, kv_heads, q_len), scored)
        if book.positions.shape[-1] != key.shape[-2]:
            raise RuntimeError(f"h2o: layer {layer} holds {key.shape[-2]} cached tokens but its bookkeeping "
                               f"{book.positions.shape[-1]}; was the cache used outside the policy?")
        output, scores = attention.attend(query, key, value, book.positions, state.query_positions, scaling,
                                          sliding_window=sliding_window, softcap=softcap, want_scores=scored)
        state.layers_seen.add(layer)
        if scored:
            start = self.runner.clock.mark()
            book.scores += scores
            if state.evicting:
                self._evict(layer, book)
            state.spans.append((layer, start, self.runner.clock.mark()))
        return output, None

    def _evict(self, layer: int, book: _LayerBook) -> None:
        state = self.state
        kept = state.kept
        slots, keep = select_slots(book.positions, book.scores, state.heavy, state.recent, max(kept))
        most = max(h - k for h, k in zip(state.held, kept))
        state.dropped[layer] = dropped_positions(book.positions, slots, keep, most)
        cache_layer = state.cache.layers[layer]
        cache_layer.keys = gather_slots(cache_layer.keys, slots)
        cache_layer.values = gather_slots(cache_layer.values, slots)
        book.positions = book.positions.gather(-1, slots).masked_fill_(~keep, -1)
        book.scores = book.scores.gather(-1, slots).masked_fill_(~keep, 0.0)

    # --- events -----------------------------------------------------------------------------

    def _report(self, batch: Batch, cache: Any) -> None:
        """Emit this forward's eviction spans and evict events, at the run's detail level."""
        state = self.state
        if not self.runner.profiler.enabled or not state.spans:
            return
        clock = self.runner.clock
        spans = {layer: (clock.resolve(start), clock.resolve(end)) for layer, start, end in state.spans}
        step = batch.step if batch.step >= 0 else None  # None: the eviction right after prefill
        self._emit_phases(spans, step)
        if state.dropped:
            self._emit_evictions(batch, cache, spans, step)

    def _emit_phases(self, spans: dict[int, tuple[int, int]], step: int | None) -> None:
        profiler = self.runner.profiler
        if self.runner.detail == "step":
            # One event per step; its duration is the sum of the per-layer spans (they are
            # interleaved with attention compute, so only the sum is meaningful).
            start = min(s for s, _ in spans.values())
            busy = sum(e - s for s, e in spans.values())
            profiler.emit_phase(Phase.EVICTION.value, start, start + busy, step=step,
                                ext={"layers": float(len(spans))})
            return
        for layer, (start, end) in sorted(spans.items()):
            profiler.emit_phase(Phase.EVICTION.value, start, end, step=step, layer=layer)

    def _emit_evictions(self, batch: Batch, cache: Any, spans: dict[int, tuple[int, int]], step: int | None) -> None:
        state, profiler, detail = self.state, self.runner.profiler, self.runner.detail
        layers = sorted(state.dropped)
        dropped = torch.stack([state.dropped[layer] for layer in layers]).cpu().tolist()  # (L, B, H, n)
        entry_bytes = {layer: _entry_bytes(cache.layers[layer]) for layer in layers}
        device_bytes = self.kv_bytes(cache).device
        for row, request in enumerate(batch.requests):
            if batch.finished_ns[row] is not None:
                continue  # the request ended; its row still runs with the batch, unreported
            ext = {"budget_tokens": float(state.budgets[row])}
            common = {"reason": "h2o", "request_id": request.request_id, "step": step,
                      "src_medium": Medium.DEVICE.value, "kv_device_bytes": device_bytes}
            per_layer = [(layer, [sorted(p for p in head if p >= 0) for head in dropped[i][row]])
                         for i, layer in enumerate(layers)]
            if detail == "step":
                # Every layer's and KV head's positions, layer-major (num_layers x kv_heads lists),
                # so token survival needs no finer detail.
                tokens = sum(len(head) for _, heads in per_layer for head in heads)
                freed = sum(len(head) * entry_bytes[layer] for layer, heads in per_layer for head in heads)
                start = min(spans[layer][0] for layer in layers)
                end = max(spans[layer][1] for layer in layers)
                kv_heads = len(per_layer[0][1])
                by_layer = dict(per_layer)
                positions = [head for layer in range(self.num_layers)
                             for head in by_layer.get(layer, [[] for _ in range(kv_heads)])]
                profiler.emit_evict(start, end, tokens=tokens, bytes=freed, positions=positions,
                                    ext=ext | {"layers": float(self.num_layers), "kv_heads": float(kv_heads)},
                                    **common)
                continue
            for layer, heads in per_layer:
                start, end = spans[layer]
                if detail == "head":
                    for kv_head, head in enumerate(heads):
                        profiler.emit_evict(start, end, layer=layer, kv_head=kv_head, tokens=len(head),
                                            bytes=len(head) * entry_bytes[layer], positions=[head], ext=ext,
                                            **common)
                else:
                    tokens = sum(len(head) for head in heads)
                    profiler.emit_evict(start, end, layer=layer, tokens=tokens, bytes=tokens * entry_bytes[layer],
                                        positions=heads, ext=ext, **common)


def _entry_bytes(cache_layer: Any) -> int:
    """Bytes of one token's key and value in one KV head."""
    keys, values = cache_layer.keys, cache_layer.values
    return keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
