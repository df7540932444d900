"""The instrumented prefill + decode loop over a transformers model, with a pluggable cache.

The loop is greedy and batched with left padding. It passes true `position_ids` and keeps a
2-D attention mask in cache-slot coordinates (`Batch.attention_mask`).

A `CachePolicy` is what a strategy plugs in: it makes the cache, may act after prefill and after
each step (evict, offload, prefetch), reports what it did through the profiler, and says how
many KV bytes live in each tier. Two kinds of policy, two decode loops:

* `StaticPolicy` (the fast engine, `full`'s default): kvprof owns a preallocated cache
  (`static_cache.StaticKV`) and computes attention itself; the decode step is captured once in
  a CUDA graph and replayed. No host synchronisation inside a step: each step is timed by CUDA
  events around its replay, tokens stay on the device, and the host drains finished steps
  (timestamps, tokens, events) `DRAIN_LAG` steps behind the device, so it never idles it.
* `CachePolicy` (the eager engine): transformers' own cache classes, one synchronised step at a
  time. Reference implementations and policies that hook the model their own way use it.

Requests may carry a follow-up (`Request.followup_token_ids`): it is fed as a second prefill
chunk through the same cache after `after_prefill`, as a chat's next turn would be.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from kvprof import Clock, Profiler, Request, UsageError
from kvprof_transformers.attention_access import (
    AttentionRequest,
    AttentionTap,
    AttentionView,
    causal_visible,
    last_query_probabilities,
)
from kvprof_transformers.loading import LoadedModel
from kvprof_transformers.static_cache import (
    PassThroughCache,
    StaticKV,
    decode_attention,
    install,
    prefill_attention,
    uninstall,
)

# Prefill ext keys (prompt chunk): device KV when the prompt's forward (and `after_chunk`) ended,
# before the policy's `after_prefill` ran, and that call's duration: the policy's work lies in
# [end_ns - policy_ns, end_ns]. Peak device KV and the conformance kit read them.
FORWARD_KV_DEVICE_BYTES = "forward_kv_device_bytes"
POLICY_NS = "policy_ns"


@dataclass
class KVBytes:
    """Bytes of KV (and strategy structures) per tier."""

    device: int = 0
    host: int = 0
    aux_device: int = 0


@dataclass
class Batch:
    """The requests run together, and the loop's state for them."""

    requests: list[Request]
    input_ids: torch.Tensor             # (B, L) left-padded prompt ids
    attention_mask: torch.Tensor        # (B, S) 1 = real token, in cache-slot coordinates
    next_positions: torch.Tensor        # (B,) true position of each row's next token
    prompt_lens: list[int]
    arrival_ns: list[int] = field(default_factory=list)  # when each request arrived (queueing counts)
    step: int = -1                      # -1 during prefill, then 0, 1, ...
    start_ns: int = 0                   # when the batch's prefill started
    outputs: list[list[int]] = field(default_factory=list)
    finished_ns: list[int | None] = field(default_factory=list)
    prefill_report: Callable[[], None] | None = None  # emits the prefill's events (see Runner._report_prefill)

    def report_prefill(self) -> None:
        """Emit the prefill's events, once (nothing when the profiler is off)."""
        report, self.prefill_report = self.prefill_report, None
        if report is not None:
            report()

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def pad_lens(self) -> list[int]:
        width = self.input_ids.shape[1]
        return [width - n for n in self.prompt_lens]

    @property
    def slots(self) -> int:
        """Cache slots each row has filled so far (prompt, follow-up and fed tokens, padding too)."""
        return self.attention_mask.shape[1]


class CachePolicy:
    """What a strategy on the runner implements: the part that decides what the cache holds.

    The runner calls the methods below in order. The defaults keep every token in transformers'
    DynamicCache on the device (`FullCachePolicy`); a policy overrides what it changes.
    """

    name: str                           # the strategy's name, in messages and metadata
    supports_followup = True            # may a second prefill chunk follow `after_prefill`?
    # Set to see each layer's attention in `on_attention` (see kvprof_transformers.attention_access).
    attention_request: AttentionRequest | None = None

    def bind(self, runner: Runner) -> None:
        """Called once before the first batch: the runner gives access to the model, the
        profiler, the clock and the detail level. Install hooks on the model here."""
        self.runner = runner

    def prepare(self, batch_size: int, slots: int) -> None:
        """Called once before the traced run starts, with the largest batch and the most cache
        slots a row will need: allocate and capture here, outside every timing."""

    def new_cache(self, batch: Batch) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.runner.loaded.config)

    def before_prefill(self, batch: Batch, cache: Any) -> None:
        """Called once per batch, right before the prompt's forward (the cache is empty)."""

    def attention_mask(self, batch: Batch, cache: Any) -> torch.Tensor | None:
        """The mask for the next forward (prefill: the prompt's; decode: one more column)."""
        return batch.attention_mask

    def on_attention(self, view: AttentionView) -> None:
        """With `attention_request` set: called per layer and forward, right after that layer's
        attention, with the attention of the forward's last queries (`AttentionView`)."""

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        """Called after each prefill chunk's forward (`tokens` slots per row were written)."""

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        """Called once the prompt is in the cache and the first token is chosen (before a
        follow-up chunk, if the requests have one)."""

    def after_step(self, batch: Batch, cache: Any) -> None:
        """Called after each decode step's forward, before the step's end is timed."""

    def drain_prefill(self, batch: Batch, chunk: int) -> None:
        """Called once the first token's time is taken, right before the prefill events of
        `chunk` (0: the prompt, 1: a follow-up) are emitted: emit the events of that chunk's
        work here (timed with clock marks when it was done), so turning device results into
        events is not counted in TTFT. Only when the profiler is enabled."""

    def kv_bytes(self, cache: Any) -> KVBytes:
        """Measured from the cache tensors: each tensor counts in the tier where it lives."""
        result = KVBytes()
        for layer in getattr(cache, "layers", []):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is None or tensor.dim() < 2:
                    continue
                size = tensor.numel() * tensor.element_size()
                if tensor.device == self.runner.device:
                    result.device += size
                else:
                    result.host += size
        return result

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        """Called after the batch's last step: release per-batch state."""

    def close(self) -> None:
        """Called once after the last batch: remove hooks, free buffers."""


class FullCachePolicy(CachePolicy):
    """The eager engine's `full` policy: the interface's defaults, nothing evicted or moved.

    `full --opt engine=eager` runs it; it is the reference the fast engine is tested against.
    """

    name = "full"


class StaticPolicy(CachePolicy):
    """The fast engine's policy (`full`): a preallocated `StaticKV`, attended by kvprof.

    Subclasses that keep other state override `attend` (eager during prefill chunks, captured
    in the decode graph when `decoding`), `before_decode_step` / `after_decode_step` (inside
    the graph: device work only) and `drain` (on the host, for steps already finished).
    """

    name = "full"

    def __init__(self, graphs: bool = True) -> None:
        self.graphs = graphs
        self.kv: StaticKV | None = None
        self.decoding = False

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        text = runner.loaded.config.get_text_config()
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.previous_attention = install(runner.model, self)

    def prepare(self, batch_size: int, slots: int) -> None:
        needed = 2 * self.num_layers * self.kv_heads * self.head_dim * self.runner.loaded.dtype.itemsize \
            * batch_size * slots
        available = free_memory_bytes(self.runner.device)
        if needed > available:
            raise UsageError(f"{self.name}: the preallocated KV cache needs {needed / 2**30:.2f} GiB "
                             f"({batch_size} rows x {slots} slots) but the {self.runner.device.type} has "
                             f"{available / 2**30:.2f} GiB free; lower --batch-size, --prompt-len or --output-len")
        self._allocate(batch_size, slots)

    def _allocate(self, batch_size: int, slots: int) -> None:
        if self.kv is not None and (self.kv.batch, self.kv.slots) == (batch_size, slots):
            return
        self.kv = None  # free the old buffers before taking new ones
        self.runner.graph = None
        loaded = self.runner.loaded
        self.kv = StaticKV(self.num_layers, batch_size, self.kv_heads, slots, self.head_dim,
                           loaded.dtype, self.runner.device, getattr(self, "layer_slots", None))
        self.slot = torch.zeros(1, dtype=torch.long, device=self.runner.device)

    def new_cache(self, batch: Batch) -> PassThroughCache:
        self._allocate(batch.size, self.runner.slots)
        self.kv.reset()
        self.key_valid = None if all(n == 0 for n in batch.pad_lens) else batch.attention_mask
        self.filled = 0
        self.decoding = False
        return PassThroughCache()

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        kv = self.kv
        if self.decoding:
            kv.write_at(layer, self.slot, keys, values)
            output = decode_attention(query, kv.keys[layer], kv.values[layer], kv.mask, scaling)
            if self.attention_request is not None and self.attention_request.decode:
                self._observe_decode(layer, query, scaling)
            return output
        first, end = self.filled, self.filled + keys.shape[-2]
        kv.write(layer, first, keys, values)
        valid = None if self.key_valid is None else self.key_valid[:, :end]
        output = prefill_attention(query, kv.keys[layer][:, :, :end], kv.values[layer][:, :, :end], scaling,
                                   valid, first)
        if self.attention_request is not None and self.attention_request.prefill:
            self._observe_prefill(layer, query, kv.keys[layer][:, :, :end], valid, first, scaling)
        return output

    def _observe_prefill(self, layer: int, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None,
                         first: int, scaling: float) -> None:
        request, q_len, slots = self.attention_request, query.shape[2], keys.shape[2]
        n = min(request.last_queries, q_len)
        last = query[:, :, q_len - n:]
        q_slots = torch.arange(first + q_len - n, first + q_len, device=query.device)
        query_valid = torch.ones((query.shape[0], n), dtype=torch.bool, device=query.device) if valid is None \
            else valid[:, first + q_len - n:first + q_len].bool()
        probabilities = None
        if request.probabilities:
            visible = causal_visible(q_slots, slots, valid)
            probabilities = last_query_probabilities(last, keys, visible, scaling)
        self.on_attention(AttentionView(layer, False, keys, query_valid, probabilities,
                                        last if request.queries else None))

    def _observe_decode(self, layer: int, query: torch.Tensor, scaling: float) -> None:
        """Inside the captured step (device work only): the one query over every slot."""
        request, kv = self.attention_request, self.kv
        probabilities = None
        if request.probabilities:
            probabilities = last_query_probabilities(query, kv.keys[layer], kv.mask == 0, scaling)
        query_valid = torch.ones((query.shape[0], 1), dtype=torch.bool, device=query.device)
        self.on_attention(AttentionView(layer, True, kv.keys[layer], query_valid, probabilities,
                                        query if request.queries else None))

    def attention_mask(self, batch: Batch, cache: Any) -> torch.Tensor | None:
        # Before each prefill chunk: the real-token mask over the slots so far (a follow-up's
        # padding included), or None while no slot is padding (the fused kernel stays on).
        if not self.decoding and (self.key_valid is not None or not bool(batch.attention_mask.all())):
            self.key_valid = batch.attention_mask
        return super().attention_mask(batch, cache)

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        self.kv.open_range(self.filled, batch.attention_mask[:, self.filled:self.filled + tokens])
        self.filled += tokens

    def new_cache_for_capture(self) -> None:
        """Eager: a decode state good enough to capture the step (the real batch resets it)."""
        self.slot.zero_()
        self.decoding = True

    def start_decode(self, batch: Batch) -> None:
        """Eager, before the first step: decode writes from the next free slot on."""
        self.slot.fill_(self.filled)
        self.decoding = True

    def before_decode_step(self) -> None:
        """Inside the graph: the slot this step writes becomes visible."""
        self.kv.open_slot(self.slot)

    def after_decode_step(self) -> None:
        """Inside the graph."""
        self.slot += 1

    def drain(self, batch: Batch, step: int, start_ns: int, end_ns: int) -> None:
        """On the host, once `step` has finished on the device: emit what the policy did in it
        (device work to read it back goes in `self.runner.drain_stream()`)."""

    def kv_bytes(self, cache: Any) -> KVBytes:
        """Occupied slots x bytes per slot (the buffers hold `slots` per row)."""
        return KVBytes(device=self.kv.bytes_per_slot * self.kv.batch * self.runner.filled_slots)

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        self.decoding = False

    def close(self) -> None:
        self.kv = None
        self.runner.graph = None
        uninstall(self.runner.model, getattr(self, "previous_attention", None))


@dataclass
class _DecodeState:
    """The device tensors a captured decode step reads and writes (fixed addresses)."""

    ids: torch.Tensor          # (B, 1) the token each row feeds next
    positions: torch.Tensor    # (B, 1) its true position
    step: torch.Tensor         # (1,) index of the step being run
    tokens: torch.Tensor       # (B, max_new + 1) the tokens chosen, column = step + 1


class Runner:
    """Runs a workload's requests through the model, batch by batch, under a CachePolicy."""

    DRAIN_LAG = 8  # the host turns a step into events this many steps after queuing it
    # The first drain also emits the prefill's events (an H2O cut at batch 16 is 25M positions):
    # more steps queued before it keep the device busy meanwhile.
    FIRST_DRAIN_LAG = 2 * DRAIN_LAG

    def __init__(self, loaded: LoadedModel, policy: CachePolicy, profiler: Profiler,
                 detail: str = "layer", sample_every: int = 1) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.policy = policy
        self.profiler = profiler
        self.detail = detail
        self.sample_every = sample_every
        self.clock = Clock(str(loaded.device))
        self.eos_ids = self._eos_ids()
        self.pad_id = self._pad_id()
        self.graph: Any = None
        self.slots = 0
        self.filled_slots = 0
        self.run_start_ns = 0
        self.requests: list[Request] = []
        self.batch: Batch | None = None     # the batch running now
        self.tap: AttentionTap | None = None
        self._drain_stream: Any = None                  # see drain_stream
        self._host_tokens: torch.Tensor | None = None   # pinned: _token_column copies into it

    @property
    def is_static(self) -> bool:
        return isinstance(self.policy, StaticPolicy)

    # --- public --------------------------------------------------------------------------

    def run(self, requests: list[Request], batch_size: int,
            on_ready: Callable[[], None] | None = None) -> list[list[int]]:
        """Generate for all requests; returns the generated ids per request, in order.

        `on_ready` is called once the policy has allocated (and captured) everything, just
        before the first request is served: the traced run starts there.
        """
        self.requests = requests
        self.policy.bind(self)
        if self.policy.attention_request is not None and not self.is_static:
            self.tap = AttentionTap(self)  # the fast engine's policy computes attention itself
        self.slots = max(self._slots_needed(requests[i:i + batch_size]) for i in range(0, len(requests), batch_size))
        outputs: list[list[int]] = []
        try:
            with torch.inference_mode():
                self.profiler.status(f"allocating the {self.policy.name} cache ({self.slots} slots per request)")
                self.policy.prepare(min(batch_size, len(requests)), self.slots)
                if self.is_static:
                    if self.device.type == "cuda" and self.policy.graphs:
                        self.profiler.status("capturing the decode step in a CUDA graph")
                    self._capture(min(batch_size, len(requests)), max(r.max_new_tokens for r in requests))
            if on_ready:
                on_ready()
            self.run_start_ns = self.clock.now_synced()
            for first in range(0, len(requests), batch_size):
                outputs.extend(self.run_batch(requests[first:first + batch_size]))
        finally:
            if self.tap is not None:
                self.tap.remove()
                self.tap = None
            self.policy.close()
        return outputs

    @torch.inference_mode()
    def run_batch(self, requests: list[Request]) -> list[list[int]]:
        if self.is_static and self.state.ids.shape[0] != len(requests):
            # A smaller last batch gets buffers and a graph of its own (its time counts).
            self.policy.prepare(len(requests), self.slots)
            self._capture(len(requests), self.state.tokens.shape[1] - 1)
        batch = self.batch = self._make_batch(requests)
        cache = self.policy.new_cache(batch)
        next_ids = self._prefill(batch, cache)
        if self.is_static:
            self._decode_static(batch, cache, next_ids)
        else:
            batch.report_prefill()
            max_new = max(r.max_new_tokens for r in requests)
            while batch.step + 1 < max_new and not self._all_finished(batch):
                batch.step += 1
                next_ids = self._decode_step(batch, cache, next_ids)
        self._finish(batch)
        self.policy.finish_batch(batch, cache)
        return batch.outputs

    # --- the loop ------------------------------------------------------------------------

    @staticmethod
    def _slots_needed(requests: list[Request]) -> int:
        prompt = max(len(r.prompt_token_ids) for r in requests)
        followup = max(len(r.followup_token_ids) for r in requests)
        return prompt + followup + max(r.max_new_tokens for r in requests)

    def _make_batch(self, requests: list[Request]) -> Batch:
        lens = [len(r.prompt_token_ids) for r in requests]
        ids, mask = self._left_padded([r.prompt_token_ids for r in requests])
        start = self.run_start_ns
        return Batch(
            requests=requests,
            input_ids=ids,
            attention_mask=mask,
            next_positions=torch.tensor(lens, device=self.device),
            prompt_lens=lens,
            arrival_ns=[start + int(r.arrival_s * 1e9) for r in requests],
            outputs=[[] for _ in requests],
            finished_ns=[None] * len(requests),
        )

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, batch: Batch, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.policy.attention_mask(batch, cache),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # a 16K prompt would otherwise materialize 16K x vocab logits
        )
        return out.logits[:, -1, :].argmax(dim=-1)

    def _prefill(self, batch: Batch, cache: Any) -> torch.Tensor:
        """The prompt, then (if any) the follow-up as a second chunk; TTFT ends after the last."""
        start = batch.start_ns = self.clock.now_synced()
        self.policy.before_prefill(batch, cache)
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        next_ids = self._forward(batch, cache, batch.input_ids, position_ids)
        self.policy.after_chunk(batch, cache, batch.input_ids.shape[1])
        self.filled_slots = batch.slots
        # The prompt's KV before the policy's post-prefill work (a compressor's cut): the peak.
        measuring = self.profiler.enabled
        forward_kv = self.policy.kv_bytes(cache) if measuring else None
        policy_start = self.clock.now_synced() if measuring else 0
        self.policy.after_prefill(batch, cache)
        chunks = [(start, self.clock.now_synced(), batch.prompt_lens)]
        prompt_kv = self.policy.kv_bytes(cache) if measuring else None
        followups = [r.followup_token_ids for r in batch.requests]
        if any(followups):
            if not self.policy.supports_followup:
                raise UsageError(f"{self.policy.name}: this policy cannot take a follow-up turn (--question after)")
            next_ids = self._prefill_followup(batch, cache, followups)
            chunks.append((chunks[-1][1], self.clock.now_synced(), [len(f) for f in followups]))
        end = chunks[-1][1]
        self.filled_slots = batch.slots
        self._record_tokens(batch, next_ids, end)
        if self.profiler.enabled:  # an overhead baseline does no measuring work at all
            final_kv = self.policy.kv_bytes(cache) if len(chunks) > 1 else prompt_kv
            batch.prefill_report = lambda: self._report_prefill(batch, chunks, forward_kv, policy_start,
                                                                prompt_kv, final_kv)
        return next_ids

    def _report_prefill(self, batch: Batch, chunks: list[tuple[int, int, list[int]]], forward_kv: KVBytes,
                        policy_start: int, prompt_kv: KVBytes, final_kv: KVBytes) -> None:
        """The prefill's events (the policy's first, `drain_prefill`). The fast engine calls it
        once the first decode steps are queued, so the device is busy while the host works."""
        for chunk, (chunk_start, chunk_end, lens) in enumerate(chunks):
            self.policy.drain_prefill(batch, chunk)  # its events come before the chunk's prefill events
            kv = final_kv if chunk else prompt_kv
            for row, request in enumerate(batch.requests):
                # A follow-up chunk says so; its prompt_tokens count the prompt and the follow-up.
                ext = {"prompt_tokens": float(batch.prompt_lens[row] + (lens[row] if chunk else 0)),
                       "pad_tokens": float(batch.pad_lens[row]),
                       # arrival = start_ns - queued_ns, for a request the run never finishes
                       "queued_ns": float(chunk_start - batch.arrival_ns[row])}
                if chunk:
                    ext["followup"] = 1.0
                else:  # the prompt's own KV, and how long the policy's after_prefill took
                    ext[FORWARD_KV_DEVICE_BYTES] = float(forward_kv.device)
                    ext[POLICY_NS] = float(chunk_end - policy_start)
                self.profiler.emit_prefill(
                    chunk_start, chunk_end, request_id=request.request_id, tokens=lens[row],
                    batch_size=batch.size, kv_device_bytes=kv.device, kv_host_bytes=kv.host,
                    aux_device_bytes=kv.aux_device, ext=ext,
                )
        self._sample(chunks[-1][1])

    def _prefill_followup(self, batch: Batch, cache: Any, followups: list[list[int]]) -> torch.Tensor:
        ids, valid = self._left_padded(followups)
        batch.attention_mask = torch.cat([batch.attention_mask, valid], dim=-1)
        position_ids = batch.next_positions[:, None] + (valid.cumsum(-1) - 1).clamp(min=0)
        next_ids = self._forward(batch, cache, ids, position_ids)
        self.policy.after_chunk(batch, cache, ids.shape[1])
        batch.next_positions = batch.next_positions + valid.sum(-1)
        return next_ids

    def _decode_step(self, batch: Batch, cache: Any, next_ids: torch.Tensor) -> torch.Tensor:
        """The eager engine: one synchronised step."""
        start = self.clock.now()  # the device is idle: the previous step ended synchronized
        active = sum(ns is None for ns in batch.finished_ns)
        batch.attention_mask = torch.cat(
            [batch.attention_mask, batch.attention_mask.new_ones((batch.size, 1))], dim=-1
        )
        position_ids = batch.next_positions.unsqueeze(-1)
        next_ids = self._forward(batch, cache, next_ids.unsqueeze(-1), position_ids)
        self.policy.after_step(batch, cache)
        end = self.clock.now_synced()
        batch.next_positions = batch.next_positions + 1
        self.filled_slots = batch.slots
        self._record_tokens(batch, next_ids, end)
        if not self.profiler.enabled:
            return next_ids
        kv = self.policy.kv_bytes(cache)
        self.profiler.emit_decode_step(
            start, end, step=batch.step, batch_size=active, tokens=active,
            kv_device_bytes=kv.device, kv_host_bytes=kv.host, aux_device_bytes=kv.aux_device,
        )
        if (batch.step + 1) % self.sample_every == 0:
            self._sample(end)
        return next_ids

    # --- the fast engine's decode --------------------------------------------------------

    def _capture(self, batch_size: int, max_new: int) -> None:
        """Make the decode state and, on CUDA with graphs on, capture one decode step."""
        device = self.device
        self.state = _DecodeState(
            ids=torch.zeros((batch_size, 1), dtype=torch.long, device=device),
            positions=torch.zeros((batch_size, 1), dtype=torch.long, device=device),
            step=torch.zeros(1, dtype=torch.long, device=device),
            tokens=torch.zeros((batch_size, max_new + 1), dtype=torch.long, device=device),
        )
        self.graph = None
        if device.type != "cuda" or not self.policy.graphs:
            return
        policy = self.policy
        policy.new_cache_for_capture()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS workspaces, lazy init
            for _ in range(2):
                self.state.step.zero_()
                self._decode_body()
        self.state.step.zero_()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._decode_body()
        except RuntimeError as exc:
            raise UsageError(f"{policy.name}: capturing the decode step in a CUDA graph failed ({exc}); "
                             "--opt graphs=false runs it eagerly") from None
        # A graph's first launch also uploads it to the device, milliseconds for a model's
        # thousand-odd kernels: launched once here, so the first timed step does not pay it
        # (the H200's first ITL was 3-6 ms longer than the rest). It writes what the warm-up did.
        graph.replay()
        self.state.step.zero_()
        policy.decoding = False
        self.graph = graph

    def _decode_body(self) -> None:
        """One decode step on the device: the whole of it is what the CUDA graph captures."""
        state, policy = self.state, self.policy
        policy.before_decode_step()
        logits = self.model(input_ids=state.ids, position_ids=state.positions, past_key_values=PassThroughCache(),
                            use_cache=True, logits_to_keep=1).logits
        chosen = logits[:, -1, :].argmax(dim=-1)
        state.ids.copy_(chosen[:, None])
        state.tokens.index_copy_(1, state.step + 1, chosen[:, None])
        state.positions += 1
        state.step += 1
        policy.after_decode_step()

    def _decode_static(self, batch: Batch, cache: Any, next_ids: torch.Tensor) -> None:
        """Queue steps without waiting; turn each into events `DRAIN_LAG` steps later."""
        state, clock = self.state, self.clock
        state.ids.copy_(next_ids[:, None])
        state.positions.copy_(batch.next_positions[:, None])
        state.step.zero_()
        self.policy.start_decode(batch)
        steps = max(r.max_new_tokens for r in batch.requests) - 1
        marks: list[tuple[Any, Any]] = []
        drained = 0
        for step in range(steps):
            start = clock.mark()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_body()
            marks.append((start, clock.mark()))
            if step - drained >= (self.DRAIN_LAG if drained else self.FIRST_DRAIN_LAG) or step == steps - 1:
                batch.report_prefill()  # first: its events come before the steps'
                while drained <= step - (0 if step == steps - 1 else self.DRAIN_LAG):
                    self._drain_step(batch, drained, marks[drained])
                    drained += 1
                if self._all_finished(batch):
                    break
        batch.report_prefill()  # when no step followed
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # steps queued past the last EOS

    def _drain_step(self, batch: Batch, step: int, marks: tuple[Any, Any]) -> None:
        """Step `step` has finished (or will, without the device idling): its tokens and events."""
        clock = self.clock
        start, end = clock.resolve(marks[0]), clock.resolve(marks[1])
        batch.step = step
        active = sum(ns is None for ns in batch.finished_ns)
        column = step + 1
        tokens = self._token_column(column) if self.device.type == "cuda" else self.state.tokens[:, column]
        self.filled_slots = batch.slots + step + 1
        measuring = self.profiler.enabled and active > 0
        if measuring:  # before the tokens: a row that ends in this step was still in it
            self.policy.drain(batch, step, start, end)
        self._record_tokens(batch, tokens, end)
        if not measuring:
            return
        kv = self.policy.kv_bytes(None)
        self.profiler.emit_decode_step(
            start, end, step=step, batch_size=active, tokens=active,
            kv_device_bytes=kv.device, kv_host_bytes=kv.host, aux_device_bytes=kv.aux_device,
        )
        if (step + 1) % self.sample_every == 0:
            self._sample(end)

    @contextmanager
    def drain_stream(self) -> Iterator[None]:
        """Where a drain's device work goes (copies of a finished step's tokens, a policy's
        records of it): a side stream. The compute stream has later steps queued, and work queued
        there would wait for all of them; what a drain reads is finished (the host waited for the
        step's end, or for the prefill's)."""
        if self.device.type != "cuda":
            yield
            return
        if self._drain_stream is None:
            self._drain_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._drain_stream):
            yield

    def _token_column(self, column: int) -> torch.Tensor:
        """One column of the device token buffer, copied to the host on the drain stream."""
        tokens = self.state.tokens[:, column]
        if self._host_tokens is None or self._host_tokens.shape != tokens.shape:  # a smaller last batch
            self._host_tokens = torch.empty(tokens.shape, dtype=torch.long, pin_memory=True)
        with self.drain_stream():
            self._host_tokens.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        copied.synchronize()
        return self._host_tokens

    def _record_tokens(self, batch: Batch, next_ids: torch.Tensor, at_ns: int) -> None:
        for row, token in enumerate(next_ids.tolist()):
            if batch.finished_ns[row] is not None:
                continue
            request = batch.requests[row]
            batch.outputs[row].append(token)
            eos = token in self.eos_ids and not request.ignore_eos
            if eos or len(batch.outputs[row]) >= request.max_new_tokens:
                batch.finished_ns[row] = at_ns

    def _all_finished(self, batch: Batch) -> bool:
        return all(ns is not None for ns in batch.finished_ns)

    def _finish(self, batch: Batch) -> None:
        for row, request in enumerate(batch.requests):
            text = self.loaded.tokenizer.decode(batch.outputs[row], skip_special_tokens=True)
            # A batch runner's requests all arrive when the run starts (plus their arrival_s):
            # a later batch's queueing counts in its TTFT and E2E.
            self.profiler.emit_request_end(
                batch.arrival_ns[row], batch.finished_ns[row] or self.clock.now(), request_id=request.request_id,
                tokens=len(batch.outputs[row]), text=text,
                ext={"prompt_tokens": float(batch.prompt_lens[row] + len(request.followup_token_ids)),
                     "queued_ns": float(batch.start_ns - batch.arrival_ns[row])},
            )

    # --- telemetry -----------------------------------------------------------------------

    def _sample(self, at_ns: int) -> None:
        if self.device.type == "cuda":
            index = self.device
            self.profiler.emit_sample(
                at_ns,
                mem_allocated_bytes=torch.cuda.memory_allocated(index),
                mem_reserved_bytes=torch.cuda.memory_reserved(index),
                mem_peak_allocated_bytes=torch.cuda.max_memory_allocated(index),
                mem_peak_reserved_bytes=torch.cuda.max_memory_reserved(index),
            )
            torch.cuda.reset_peak_memory_stats(index)
        else:
            self.profiler.emit_sample(at_ns, ext={"rss_bytes": float(_rss_bytes())})

    # --- tokenizer details ---------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.loaded.tokenizer, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(value)
        return ids

    def _pad_id(self) -> int:
        tokenizer = self.loaded.tokenizer
        for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if isinstance(value, int):
                return value
        return 0


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can still take: free device memory plus what torch's caching
    allocator holds unused (CUDA), or the kernel's MemAvailable (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: let the allocator be the judge


def _rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0

