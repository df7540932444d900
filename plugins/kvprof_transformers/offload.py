"""`offload`: whole-layer KV offload to host memory, the FlexGen-style baseline of InfiniGen.

Every layer's full KV lives in a `HostKVStore` (pinned host memory on a GPU). During decode,
before layer i's attention its whole KV is copied back to the device: the copy of layer i+1 is
issued when layer i starts, on a separate CUDA stream, so it overlaps layer i's compute (and the
end of layer i-1's); the compute stream waits on the copy's event. The new token's K/V are written
back to the host. The device holds only the two layers in flight (`DeviceRing`).

The hook into transformers is a cache layer (`HostBackedLayer`, a `DynamicLayer`) whose
`update()` returns [fetched ; new] and reports the logical length, and a forward pre-hook on each
decoder layer that issues the prefetches. Every layer attends over its full length, so the
runner's 2-D mask stays valid: any batch, with padding, is supported.

Events: an offload event (host <- device) per layer for prefill's store, one (device <- host) per
layer and step for each fetch, one per step for the new tokens' write-back; KV_TRANSFER phase
events for the time the compute stream actually waited on a fetch (on a CPU device, where copies
are synchronous, the copy itself). Copy durations are CUDA-timed (`Clock.mark`/`resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvprof.events import Medium, Phase
from kvprof.strategy import UsageError

from kvprof_transformers.host_store import Copy, DeviceRing, HostKVStore
from kvprof_transformers.runner import Batch, CachePolicy, KVBytes, Runner


class HostBackedLayer(DynamicLayer):
    """A cache layer whose KV lives in the policy's host store; `update` asks the policy for the
    tensors to attend over. Lengths are logical (tokens seen), whatever is on the device."""

    def __init__(self, policy: HostOffloadPolicy, layer_idx: int) -> None:
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Nothing is kept here between forwards; empty tensors keep generic code working.
        self.keys = torch.tensor([], dtype=self.dtype, device=self.device)
        self.values = torch.tensor([], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.policy.attend(self.layer_idx, key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a host-backed KV cache cannot be cropped")


@dataclass
class _Stall:
    """The compute stream waited for a fetch (CUDA: from `waiting_from` to the copy's end)."""

    copy: Copy
    waiting_from: Any


class HostOffloadPolicy(CachePolicy):
    """All KV in host memory; each decode layer attends over what `fetch_whole` or a subclass
    fetched for it, plus the new token. Subclasses say which layers are fetched whole."""

    name = "offload"
    supports_followup = False
    overlap = True

    def __init__(self, overlap: bool = True) -> None:
        self.overlap = overlap

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        text = runner.loaded.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
            raise UsageError(f"{self.name}: models with sliding-window or linear-attention layers are not supported")
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.decoder_layers = decoder_layers(runner.model)
        self.hooks = [layer.register_forward_pre_hook(self._before_layer_hook(i))
                      for i, layer in enumerate(self.decoder_layers)]
        self.store: HostKVStore | None = None

    # --- per batch -----------------------------------------------------------------------------

    def new_cache(self, batch: Batch) -> Cache:
        dtype = self.runner.loaded.dtype
        capacity = batch.input_ids.shape[1] + max(r.max_new_tokens for r in batch.requests)
        geometry = (batch.size, self.kv_heads, self.head_dim, dtype, self.runner.device)
        self.store = HostKVStore(self.num_layers, *geometry, self.runner.clock, capacity)
        self.whole_ring = DeviceRing(capacity, *geometry)
        self.decoding = False
        self.step = -1
        self.pending: dict[int, Copy] = {}     # fetches issued, not yet consumed, by layer
        self.copies: list[Copy] = []           # this step's copies, emitted at its end
        self.stalls: list[_Stall] = []
        return Cache(layers=[HostBackedLayer(self, i) for i in range(self.num_layers)])

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        self._flush(batch)
        self.decoding = True

    def after_step(self, batch: Batch, cache: Any) -> None:
        self.step = batch.step
        self._flush(batch)

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        self.store = None
        self.whole_ring = None
        self.pending.clear()

    def close(self) -> None:
        for hook in getattr(self, "hooks", []):
            hook.remove()

    def kv_bytes(self, cache: Any) -> KVBytes:
        """Host: the KV held in the store. Device: the fetch buffers (the layers in flight)."""
        if self.store is None:
            return KVBytes()
        return KVBytes(device=self.device_kv_bytes(), host=self.store.nbytes)

    def device_kv_bytes(self) -> int:
        return self.whole_ring.nbytes

    # --- the layer loop --------------------------------------------------------------------------

    def fetches_whole(self, layer: int) -> bool:
        """Whether decode fetches this layer's whole KV (here: every layer)."""
        return True

    def _before_layer_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            if self.decoding:
                self.before_layer(layer)
        return hook

    def before_layer(self, layer: int) -> None:
        """Decode, layer `layer` starts: make sure its fetch is issued, and (overlap) prefetch the
        next, so its copy runs while this layer computes."""
        for target in (layer, layer + 1) if self.overlap else (layer,):
            if target < self.num_layers and self.fetches_whole(target) and target not in self.pending:
                self.pending[target] = self.store.fetch_all(target, self.whole_ring)

    def attend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What layer `layer` attends over: at prefill the prompt's own K/V (stored to the host
        on the side), at decode [fetched ; new]."""
        if not self.decoding:
            self.copies.append(self.store.append(layer, keys, values))
            return keys, values
        fetch = self.pending.pop(layer, None)
        if fetch is None:  # a layer nobody prefetched (never in the runner's loop)
            fetch = self.store.fetch_all(layer, self.whole_ring)
        self.stalls.append(_Stall(fetch, self.store.wait(fetch)))
        all_keys = torch.cat([fetch.keys, keys], dim=-2)
        all_values = torch.cat([fetch.values, values], dim=-2)
        self.store.release(fetch)
        self.copies.append(fetch)
        self.copies.append(self.store.append(layer, keys, values))
        return all_keys, all_values

    # --- events ----------------------------------------------------------------------------------

    def _flush(self, batch: Batch) -> None:
        """Emit this step's copies and stalls, resolving their CUDA marks (the step is over).

        Offload events, by detail level:
        - "step": one per direction and step (tokens and bytes summed over layers).
        - "layer" (default): one per layer for prefill's stores and for each fetch; a decode
          step's write-back of the new tokens is one event. `tokens` counts tokens per KV head.
        - "head": as "layer", but stores are one event per request and layer with their
          positions, and row fetches one per request and KV head with the fetched positions.
        KV_TRANSFER phases: one per stalled layer ("step": one per step whose duration is the sum
        of the stalls, starting at the first).
        """
        if not self.runner.profiler.enabled:  # warm-up, overhead baseline: nothing to resolve
            self.copies.clear()
            self.stalls.clear()
            return
        step = None if batch.step < 0 else batch.step
        detail = self.runner.detail
        fetches = [c for c in self.copies if c.to_device]
        stores = [c for c in self.copies if not c.to_device]
        if detail == "step":
            groups = [fetches, stores]
        else:
            groups = [[c] for c in fetches]
            if detail == "head":
                for copy in stores:
                    self._emit_store_per_request(copy, step, batch)
            else:
                groups += [[c] for c in stores] if step is None else [stores]
        for group in groups:
            if group:
                self._emit_copies(group, step, batch)
        self._emit_stalls(step, batch, per_layer=detail != "step")
        self.copies.clear()
        self.stalls.clear()

    def _emit_copies(self, copies: list[Copy], step: int | None, batch: Batch) -> None:
        """One offload event for `copies` (one direction), or, at detail "head", one per request
        and KV head for a row fetch."""
        clock = self.runner.clock
        spans = [(clock.resolve(c.start), clock.resolve(c.end)) for c in copies]
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        first = copies[0]
        ext: dict[str, float] = {"copy_ns": float(sum(e - s for s, e in spans))}
        if len(copies) == 1:
            ext.update(first.ext)
            ext.update(self.copy_ext(first))
        else:
            ext["layers"] = float(len(copies))
        src, dst = self._tiers(first)
        fields = {"step": step, "batch_size": batch.size, "src_medium": src, "dst_medium": dst,
                  "kv_device_bytes": self.device_kv_bytes(), "kv_host_bytes": self.store.nbytes, "ext": ext}
        profiler = self.runner.profiler
        if len(copies) == 1 and first.rows is not None:  # detail "head": per request and KV head
            rows, (size, heads, count) = first.rows, first.rows.shape
            for row, request in enumerate(batch.requests):
                for head in range(heads):
                    profiler.emit_offload(start, end, request_id=request.request_id, layer=first.layer, kv_head=head,
                                          tokens=count, bytes=first.bytes // (size * heads),
                                          positions=[rows[row, head].tolist()], **fields)
            return
        profiler.emit_offload(start, end, layer=first.layer if len(copies) == 1 else None,
                              tokens=sum(c.tokens for c in copies), bytes=sum(c.bytes for c in copies), **fields)

    def _emit_store_per_request(self, copy: Copy, step: int | None, batch: Batch) -> None:
        """Detail "head": a store as one event per request, with the positions it wrote (padding
        slots left out; a slot's position is the slot minus the request's padding)."""
        start, end = self.runner.clock.resolve(copy.start), self.runner.clock.resolve(copy.end)
        for row, request in enumerate(batch.requests):
            pad = batch.pad_lens[row]
            positions = [slot - pad for slot in range(copy.first, copy.first + copy.tokens) if slot >= pad]
            if not positions:
                continue
            self.runner.profiler.emit_offload(
                start, end, request_id=request.request_id, step=step, layer=copy.layer, batch_size=batch.size,
                tokens=len(positions), bytes=copy.bytes * len(positions) // (copy.tokens * batch.size),
                positions=[positions], src_medium=Medium.DEVICE.value, dst_medium=Medium.HOST.value,
                kv_device_bytes=self.device_kv_bytes(), kv_host_bytes=self.store.nbytes,
                ext={"copy_ns": float(end - start)},
            )

    @staticmethod
    def _tiers(copy: Copy) -> tuple[str, str]:
        if copy.to_device:
            return Medium.HOST.value, Medium.DEVICE.value
        return Medium.DEVICE.value, Medium.HOST.value

    def _emit_stalls(self, step: int | None, batch: Batch, per_layer: bool) -> None:
        """KV_TRANSFER phases: CUDA, the compute stream waited from `waiting_from` until the
        copy ended (if it had not yet); CPU, the copy ran synchronously on the critical path."""
        clock = self.runner.clock
        spans = []
        for stall in self.stalls:
            copy_end = clock.resolve(stall.copy.end)
            start = clock.resolve(stall.copy.start if stall.waiting_from is None else stall.waiting_from)
            if copy_end > start:
                spans.append((start, copy_end, stall.copy))
        if not spans:
            return
        profiler = self.runner.profiler
        if per_layer:
            for start, end, copy in spans:
                profiler.emit_phase(Phase.KV_TRANSFER.value, start, end, step=step, layer=copy.layer,
                                    batch_size=batch.size, bytes=copy.bytes)
            return
        first = min(start for start, _, _ in spans)
        total = sum(end - start for start, end, _ in spans)
        profiler.emit_phase(Phase.KV_TRANSFER.value, first, first + total, step=step, batch_size=batch.size,
                            bytes=sum(c.bytes for _, _, c in spans), ext={"spans": float(len(spans))})

    def copy_ext(self, copy: Copy) -> dict[str, float]:
        """Extra numeric detail for a copy's event (subclasses add theirs)."""
        return {}


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers (the modules whose forward runs one transformer layer)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UsageError(f"cannot find the decoder layers of {type(model).__name__}")
    return list(layers)
