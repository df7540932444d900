"""The instrumented prefill + decode loop over a transformers model, with a pluggable cache.

The loop is greedy and batched with left padding. It passes true `position_ids` and keeps a
2-D attention mask in cache-slot coordinates (`Batch.attention_mask`); both stay right even when
a policy drops cache entries, as long as the policy keeps the mask in step with the slots it
keeps (or supplies its own mask through `CachePolicy.attention_mask`).

A `CachePolicy` is what a strategy plugs in: it makes the cache, may act after prefill and after
each step (evict, offload, prefetch), reports what it did through the profiler, and says how
many KV bytes live in each tier. The runner times prefill and each decode step with
synchronized timestamps and emits prefill, decode_step, sample and request_end events.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from kvprof.clock import Clock
from kvprof.profiler import Profiler
from kvprof.workloads import Request

from kvprof_transformers.loading import LoadedModel


@dataclass
class KVBytes:
    """Bytes of KV (and strategy structures) per tier, measured from the tensors."""

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
    step: int = -1                      # -1 during prefill, then 0, 1, ...
    start_ns: int = 0                   # when the batch's prefill started
    outputs: list[list[int]] = field(default_factory=list)
    finished_ns: list[int | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def pad_lens(self) -> list[int]:
        width = self.input_ids.shape[1]
        return [width - n for n in self.prompt_lens]


class CachePolicy:
    """The default policy: transformers' DynamicCache, everything on the device (`full`)."""

    name = "full"

    def bind(self, runner: Runner) -> None:
        """Called once before the first batch: the runner gives access to the model, the
        profiler, the clock and the detail level. Install hooks on the model here."""
        self.runner = runner

    def new_cache(self, batch: Batch) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.runner.loaded.config)

    def attention_mask(self, batch: Batch, cache: Any) -> torch.Tensor | None:
        """The mask for the next forward (prefill: the prompt's; decode: one more column)."""
        return batch.attention_mask

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        """Called once the prompt is in the cache and the first token is chosen."""

    def after_step(self, batch: Batch, cache: Any) -> None:
        """Called after each decode step's forward, before the step's end is timed."""

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


class Runner:
    """Runs a workload's requests through the model, batch by batch, under a CachePolicy."""

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

    # --- public --------------------------------------------------------------------------

    def run(self, requests: list[Request], batch_size: int) -> list[list[int]]:
        """Generate for all requests; returns the generated ids per request, in order."""
        self.policy.bind(self)
        outputs: list[list[int]] = []
        try:
            for first in range(0, len(requests), batch_size):
                outputs.extend(self.run_batch(requests[first:first + batch_size]))
        finally:
            self.policy.close()
        return outputs

    @torch.inference_mode()
    def run_batch(self, requests: list[Request]) -> list[list[int]]:
        batch = self._make_batch(requests)
        cache = self.policy.new_cache(batch)
        next_ids = self._prefill(batch, cache)
        max_new = max(r.max_new_tokens for r in requests)
        while batch.step + 1 < max_new and not self._all_finished(batch):
            batch.step += 1
            next_ids = self._decode_step(batch, cache, next_ids)
        self._finish(batch)
        self.policy.finish_batch(batch, cache)
        return batch.outputs

    # --- the loop ------------------------------------------------------------------------

    def _make_batch(self, requests: list[Request]) -> Batch:
        lens = [len(r.prompt_token_ids) for r in requests]
        width = max(lens)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, width - lens[row]:] = torch.tensor(request.prompt_token_ids)
            mask[row, width - lens[row]:] = 1
        return Batch(
            requests=requests,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            next_positions=torch.tensor(lens, device=self.device),
            prompt_lens=lens,
            outputs=[[] for _ in requests],
            finished_ns=[None] * len(requests),
        )

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
        start = batch.start_ns = self.clock.now_synced()
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        next_ids = self._forward(batch, cache, batch.input_ids, position_ids)
        self.policy.after_prefill(batch, cache)
        end = self.clock.now_synced()
        self._record_tokens(batch, next_ids, end)
        if not self.profiler.enabled:  # overhead baseline: no measuring work at all
            return next_ids
        kv = self.policy.kv_bytes(cache)
        for row, request in enumerate(batch.requests):
            self.profiler.emit_prefill(
                start, end, request_id=request.request_id, tokens=batch.prompt_lens[row],
                batch_size=batch.size, kv_device_bytes=kv.device, kv_host_bytes=kv.host,
                aux_device_bytes=kv.aux_device,
                ext={"prompt_tokens": float(batch.prompt_lens[row]), "pad_tokens": float(batch.pad_lens[row])},
            )
        self._sample(end)
        return next_ids

    def _decode_step(self, batch: Batch, cache: Any, next_ids: torch.Tensor) -> torch.Tensor:
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
            # A batch runner serves requests as they come in its list: each arrives when its
            # batch's prefill starts.
            self.profiler.emit_request_end(
                batch.start_ns, batch.finished_ns[row] or self.clock.now(), request_id=request.request_id,
                tokens=len(batch.outputs[row]), text=text,
                ext={"prompt_tokens": float(batch.prompt_lens[row])},
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


def _rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0

