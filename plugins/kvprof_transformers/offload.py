"""`offload`: whole-layer KV offload to host memory, the FlexGen-style baseline of InfiniGen.

Two engines. `StaticOffloadPolicy` (the default, `--opt engine=static`, at the end of this file)
runs on the fast engine: a pinned, mapped host store and a graph-captured decode step with its
copies on a copy stream. `HostOffloadPolicy` (`--opt engine=eager`, described below) is the
eager reference on transformers' cache and hooks; `infinigen --opt engine=eager` builds on it.

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

from kvprof import Medium, Phase, UsageError
from kvprof_transformers.host_store import (
    Copy,
    DeviceRing,
    HostKVStore,
    PinnedLayers,
    StepLog,
    _on,
    _record,
    side_streams,
)
from kvprof_transformers.runner import Batch, CachePolicy, KVBytes, Runner, StaticPolicy, free_memory_bytes
from kvprof_transformers.static_cache import PassThroughCache, decode_attention, prefill_attention, uninstall


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


# --- `offload` on the fast engine ------------------------------------------------------------------


class StaticOffloadPolicy(StaticPolicy):
    """`offload` on the fast engine: every layer's KV in pinned host memory (`PinnedLayers`), the
    decode step graph-captured with its copies.

    Per decode step (all inside one CUDA graph on a GPU): the copy stream forks from the compute
    stream at the step's start; each layer's whole KV block (all slots: a fixed size, so the
    copy can be captured; slots not yet written are masked) is copied by DMA into one of two
    device ring buffers. With `overlap`, layer t+1's copy is issued when layer t starts (its
    attention module's pre-hook), after layer t-1 released that ring buffer (an event); without,
    each layer's copy is issued when its attention needs it and waited for at once (FlexGen
    without overlap, the InfiniGen paper's baseline). The compute stream waits on the copy's
    event, writes the new token into the ring buffer and, through the mapping, into the host
    store, and attends with the step's additive mask. The streams join at the step's end.

    Timing without host waits: tiny kernels stamp the GPU timer into a per-step row of pinned
    memory (`StepLog`) at the step start, around each copy (copy stream) and where the compute
    stream starts waiting for it; the host reads a step's row once the step is over (`drain`,
    DRAIN_LAG steps behind) and turns it into offload events and KV_TRANSFER phases (compute
    stream waiting: from the wait's start to the copy's end, when the copy ended later).
    """

    name = "offload"
    FULL_FETCH_LAYERS: int | None = None  # None: every layer is fetched whole
    COLUMNS = 6  # per layer in the step log: fetch start, fetch end, wait start, spec start, spec end, count

    def __init__(self, overlap: bool = True, graphs: bool = True) -> None:
        super().__init__(graphs)
        self.overlap = overlap
        self.host: PinnedLayers | None = None
        self.log: StepLog | None = None

    # --- setup -------------------------------------------------------------------------------------

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        text = runner.loaded.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
            raise UsageError(f"{self.name}: models with sliding-window or linear-attention layers are not supported")
        self.layer_modules = [getattr(layer, "self_attn", layer) for layer in decoder_layers(runner.model)]
        self.hooks = [module.register_forward_pre_hook(self._layer_start_hook(i), with_kwargs=True)
                      for i, module in enumerate(self.layer_modules)]
        self.copy_stream, self.spec_stream = side_streams(runner.device)
        self.cuda = runner.device.type == "cuda"

    def device_bytes_needed(self, batch_size: int, slots: int) -> int:
        """Device bytes this policy allocates: the two whole-layer ring buffers (K and V)."""
        return 2 * 2 * batch_size * self.kv_heads * slots * self.head_dim * self.runner.loaded.dtype.itemsize

    def prepare(self, batch_size: int, slots: int) -> None:
        device = self.runner.device
        needed = self.device_bytes_needed(batch_size, slots)
        available = free_memory_bytes(device)
        if needed > available:
            raise UsageError(f"{self.name}: its device buffers need {needed / 2**30:.2f} GiB ({batch_size} rows x "
                             f"{slots} slots) but the {device.type} has {available / 2**30:.2f} GiB free")
        host = (2 * self.num_layers * batch_size * self.kv_heads * slots * self.head_dim
                * self.runner.loaded.dtype.itemsize)
        host_free = free_memory_bytes(torch.device("cpu")) + self._pooled_host_bytes()
        if device.type == "cuda" and host > host_free:
            raise UsageError(f"{self.name}: the host KV store needs {host / 2**30:.2f} GiB of pinned memory but "
                             f"{host_free / 2**30:.2f} GiB are available")
        self._allocate(batch_size, slots)

    @staticmethod
    def _pooled_host_bytes() -> int:
        from kvprof_transformers.host_store import _HOST_POOL

        return sum(t.nbytes for buffers in _HOST_POOL.values() for t in buffers)

    def _allocate(self, batch_size: int, slots: int) -> None:
        if self.host is not None and self.host.shape[:3] == (batch_size, self.kv_heads, slots):
            return
        self.host = None
        self.runner.graph = None
        dtype, device = self.runner.loaded.dtype, self.runner.device
        self.host = PinnedLayers(self.num_layers, batch_size, self.kv_heads, slots, self.head_dim, dtype, device)
        shape = (batch_size, self.kv_heads, slots, self.head_dim)
        self.ring = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                     for _ in range(2)]
        self.mask = torch.full((batch_size, 1, 1, slots), float("-inf"), dtype=dtype, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.batch_size, self.slots = batch_size, slots
        self.log = None

    def _ensure_log(self) -> None:
        steps = self.runner.state.tokens.shape[1] if hasattr(self.runner, "state") else 1
        if self.log is None or self.log.rows.shape[0] < steps:
            self.log = StepLog(steps, 1 + self.COLUMNS * self.num_layers, self.runner.device)

    def new_cache_for_capture(self) -> None:
        self._ensure_log()
        self.slot.zero_()
        self.decoding = True

    # --- per batch ---------------------------------------------------------------------------------

    def new_cache(self, batch: Batch) -> PassThroughCache:
        self._allocate(batch.size, self.runner.slots)
        self._ensure_log()
        self.mask.fill_(float("-inf"))
        self.host.clear_from(batch.input_ids.shape[1])
        self.key_valid = None if all(n == 0 for n in batch.pad_lens) else batch.attention_mask
        self.filled = 0
        self.decoding = False
        self.stores: list[tuple[int, Any, Any]] = []  # prefill: (layer, start mark, end mark)
        return PassThroughCache()

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        if self.decoding:
            return self.attend_decode(layer, query, keys, values, scaling)
        clock = self.runner.clock
        start = clock.mark()
        first, end = self.filled, self.filled + keys.shape[-2]
        self.host.store_chunk(layer, first, keys, values)
        self.stores.append((layer, start, clock.mark()))
        valid = None if self.key_valid is None else self.key_valid[:, :end]
        if first == 0:
            return prefill_attention(query, keys, values, scaling, valid, 0)
        # A follow-up chunk is a prefill: it attends over the whole stored layer (read from the host).
        return prefill_attention(query, self.host.device_keys[layer][:, :, :end],
                                 self.host.device_values[layer][:, :, :end], scaling, valid, first)

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        if self.filled:  # a follow-up chunk: its stores now (the prompt's are emitted in after_prefill)
            self._emit_stores(batch, self.filled, tokens)
        valid = batch.attention_mask[:, self.filled:self.filled + tokens]
        view = self.mask[:, 0, 0, self.filled:self.filled + tokens]
        view.copy_(torch.where(valid.bool(), 0.0, float("-inf")).to(view.dtype))
        self.filled += tokens

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        self._emit_stores(batch, 0, batch.slots)

    def _emit_stores(self, batch: Batch, first: int, tokens: int) -> None:
        """A prefill chunk's stores (slots [first, first + tokens)) as offload events (the chunk
        is over: resolving marks costs nothing)."""
        profiler = self.runner.profiler
        stores, self.stores = self.stores, []
        if not profiler.enabled:
            return
        clock, detail = self.runner.clock, self.runner.detail
        spans = [(layer, clock.resolve(s), clock.resolve(e)) for layer, s, e in stores]
        host_bytes = self.num_layers * (first + tokens) * self.host.token_bytes
        common = {"src_medium": Medium.DEVICE.value, "dst_medium": Medium.HOST.value,
                  "kv_device_bytes": self.device_kv_bytes(), "kv_host_bytes": host_bytes}
        if detail == "step":
            profiler.emit_offload(spans[0][1], spans[-1][2], batch_size=batch.size, tokens=tokens * len(spans),
                                  bytes=len(spans) * tokens * self.host.token_bytes,
                                  ext={"copy_ns": float(sum(e - s for _, s, e in spans)), "layers": float(len(spans))},
                                  **common)
            return
        for layer, start, end in spans:
            if detail == "head":
                self._emit_store_per_request(layer, start, end, None, range(first, first + tokens), batch, common)
            else:
                profiler.emit_offload(start, end, layer=layer, batch_size=batch.size, tokens=tokens,
                                      bytes=tokens * self.host.token_bytes,
                                      ext={"copy_ns": float(end - start)}, **common)

    def _emit_store_per_request(self, layer: int, start: int, end: int, step: int | None, slots: Any,
                                batch: Batch, common: dict[str, Any]) -> None:
        slots = list(slots)
        for row, request in enumerate(batch.requests):
            pad = batch.pad_lens[row]
            positions = [slot - pad for slot in slots if slot >= pad]
            if positions:
                self.runner.profiler.emit_offload(
                    start, end, request_id=request.request_id, step=step, layer=layer, batch_size=batch.size,
                    tokens=len(positions),
                    bytes=len(positions) * self.host.token_bytes // batch.size, positions=[positions],
                    ext={"copy_ns": float(end - start)}, **common)

    def start_decode(self, batch: Batch) -> None:
        self._ensure_log()
        self.slot.fill_(self.filled)
        self.prompt_slots = self.filled
        self.decoding = True

    # --- the decode step (inside the graph) ---------------------------------------------------------

    def _step(self) -> torch.Tensor:
        return self.runner.state.step

    def _column(self, layer: int, which: int) -> int:
        return 1 + self.COLUMNS * layer + which

    def fetches_whole(self, layer: int) -> bool:
        return self.FULL_FETCH_LAYERS is None or layer < self.FULL_FETCH_LAYERS

    def before_decode_step(self) -> None:
        self.mask.index_fill_(-1, self.slot, 0.0)
        self.log.stamp(self._step(), 0)
        self._fetched: dict[int, Any] = {}
        self._consumed: dict[int, Any] = {}
        if self.cuda:
            compute = torch.cuda.current_stream(self.runner.device)
            self.copy_stream.wait_stream(compute)
            self.spec_stream.wait_stream(compute)
        if self.overlap:
            self._fetch_whole(0)

    def after_decode_step(self) -> None:
        if self.cuda:
            compute = torch.cuda.current_stream(self.runner.device)
            compute.wait_stream(self.copy_stream)
            compute.wait_stream(self.spec_stream)
        self.slot += 1

    def _layer_start_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if self.decoding:
                self.layer_start(layer, kwargs)
        return hook

    def layer_start(self, layer: int, kwargs: dict[str, Any]) -> None:
        """Decode, layer `layer` starts (its attention input is ready): prefetch the next layer."""
        if self.overlap and layer + 1 < self.num_layers and self.fetches_whole(layer + 1):
            self._fetch_whole(layer + 1)

    def _fetch_whole(self, layer: int, now: bool = False) -> None:
        """Copy the layer's block into its ring buffer on the copy stream, once the buffer's last
        reader is done; `now`: also not before the compute stream reached this point."""
        keys, values = self.ring[layer % 2]
        if now and self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with _on(self.copy_stream):
            released = self._consumed.get(layer % 2)
            if released is not None:
                self.copy_stream.wait_event(released)
            self.log.stamp(self._step(), self._column(layer, 0))
            self.host.fetch_into(layer, keys, values)
            self.log.stamp(self._step(), self._column(layer, 1))
            self._fetched[layer] = _record(self.copy_stream)

    def _wait_fetched(self, layer: int) -> None:
        self.log.stamp(self._step(), self._column(layer, 2))
        done = self._fetched.pop(layer)
        if done is not None:
            torch.cuda.current_stream(self.runner.device).wait_event(done)

    def attend_decode(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scaling: float) -> torch.Tensor:
        if layer not in self._fetched:  # no overlap: fetch now (not before), wait at once
            self._fetch_whole(layer, now=True)
        self._wait_fetched(layer)
        ring_keys, ring_values = self.ring[layer % 2]
        ring_keys.index_copy_(2, self.slot, keys)
        ring_values.index_copy_(2, self.slot, values)
        self.host.store_at(layer, self.slot, keys, values)
        out = decode_attention(query, ring_keys, ring_values, self.mask, scaling)
        if self.cuda:
            self._consumed[layer % 2] = _record(torch.cuda.current_stream(self.runner.device))
        return out

    # --- events (host, for finished steps) ---------------------------------------------------------

    def drain(self, batch: Batch, step: int, start_ns: int, end_ns: int) -> None:
        row = self.log.row(step)
        origin = row[0]

        def at(value: int) -> int:
            ns = start_ns + (value - origin) if self.cuda else value
            return min(max(ns, start_ns), end_ns)

        held = self.prompt_slots + step  # slots held per row before this step's token
        self.emit_step(batch, step, row, at, held, start_ns, end_ns)

    def layer_fetch(self, layer: int, row: list[int], at: Any, held: int) -> dict[str, Any]:
        """One layer's fetch in a finished step: its span, tokens per head, bytes moved, ext."""
        start, end = at(row[self._column(layer, 0)]), at(row[self._column(layer, 1)])
        # tokens/bytes: the KV held (what the layer attends over); the DMA moves every slot of
        # the block (a fixed size, so the graph can hold it): ext copied_bytes.
        return {"layer": layer, "start": start, "end": end, "tokens": held, "bytes": held * self.host.token_bytes,
                "ext": {"copy_ns": float(end - start), "copied_bytes": float(self.host.layer_bytes),
                        "speculated": 0.0},
                "positions": None}

    def emit_step(self, batch: Batch, step: int, row: list[int], at: Any, held: int, start_ns: int,
                  end_ns: int) -> None:
        profiler, detail = self.runner.profiler, self.runner.detail
        fetches = [self.layer_fetch(layer, row, at, held) for layer in range(self.num_layers)]
        stalls = []
        for fetch in fetches:
            # CUDA: the compute stream waited from its wait's start to the copy's end, if later.
            # Without overlap the copy started only once compute reached it, so all of it is a
            # stall even when the graph ran the wait's stamp after the copy (seen on the H200).
            # CPU: copies are synchronous, so every copy is on the critical path.
            waiting = at(row[self._column(fetch["layer"], 2)]) if self.cuda else fetch["start"]
            if not self.overlap:
                waiting = min(waiting, fetch["start"])
            if fetch["end"] > waiting:
                stalls.append((waiting, fetch["end"], fetch))
        host_bytes = self.num_layers * (self.runner.filled_slots) * self.host.token_bytes
        common = {"step": step, "batch_size": batch.size, "kv_device_bytes": self.device_kv_bytes(),
                  "kv_host_bytes": host_bytes}
        to_device = {"src_medium": Medium.HOST.value, "dst_medium": Medium.DEVICE.value}
        to_host = {"src_medium": Medium.DEVICE.value, "dst_medium": Medium.HOST.value}
        if detail == "step":
            profiler.emit_offload(min(f["start"] for f in fetches), max(f["end"] for f in fetches),
                                  tokens=sum(f["tokens"] for f in fetches), bytes=sum(f["bytes"] for f in fetches),
                                  ext={"copy_ns": float(sum(f["end"] - f["start"] for f in fetches)),
                                       "layers": float(len(fetches))}, **to_device, **common)
        else:
            for fetch in fetches:
                if detail == "head" and fetch["positions"] is not None:
                    self._emit_rows_per_head(fetch, batch, common, to_device)
                else:
                    profiler.emit_offload(fetch["start"], fetch["end"], layer=fetch["layer"], tokens=fetch["tokens"],
                                          bytes=fetch["bytes"], ext=fetch["ext"], **to_device, **common)
        slot = self.prompt_slots + step
        if detail == "head":
            for layer in range(self.num_layers):
                fields = {k: v for k, v in common.items() if k not in ("step", "batch_size")}
                self._emit_store_per_request(layer, start_ns, end_ns, step, [slot], batch, {**fields, **to_host})
        else:
            profiler.emit_offload(start_ns, end_ns, tokens=self.num_layers,
                                  bytes=self.num_layers * self.host.token_bytes,
                                  ext={"layers": float(self.num_layers)}, **to_host, **common)
        if detail == "step":
            if stalls:
                first = min(s for s, _, _ in stalls)
                total = sum(e - s for s, e, _ in stalls)
                profiler.emit_phase(Phase.KV_TRANSFER.value, first, first + total, step=step, batch_size=batch.size,
                                    bytes=sum(f["bytes"] for _, _, f in stalls), ext={"spans": float(len(stalls))})
        else:
            for start, end, fetch in stalls:
                profiler.emit_phase(Phase.KV_TRANSFER.value, start, end, step=step, layer=fetch["layer"],
                                    batch_size=batch.size, bytes=fetch["bytes"])

    def _emit_rows_per_head(self, fetch: dict[str, Any], batch: Batch, common: dict[str, Any],
                            media: dict[str, str]) -> None:
        positions = fetch["positions"]  # [batch, kv_heads, n] slots
        size, heads, count = positions.shape
        for row, request in enumerate(batch.requests):
            pad = batch.pad_lens[row]
            for head in range(heads):
                self.runner.profiler.emit_offload(
                    fetch["start"], fetch["end"], request_id=request.request_id, layer=fetch["layer"], kv_head=head,
                    tokens=count, bytes=fetch["bytes"] // (size * heads),
                    positions=[[p - pad for p in positions[row, head].tolist()]], ext=fetch["ext"], **media, **common)

    # --- memory ------------------------------------------------------------------------------------

    def device_kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.ring)

    def kv_bytes(self, cache: Any) -> KVBytes:
        """Device: the ring buffers (preallocated). Host: the slots filled, every layer."""
        return KVBytes(device=self.device_kv_bytes(),
                       host=self.num_layers * self.runner.filled_slots * self.host.token_bytes)

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        self.decoding = False

    def close(self) -> None:
        for hook in getattr(self, "hooks", []):
            hook.remove()
        self.hooks = []
        self.host = None
        self.ring = []
        self.runner.graph = None
        uninstall(self.runner.model, getattr(self, "previous_attention", None))
