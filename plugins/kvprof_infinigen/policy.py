"""InfiniGen's eager cache policy (`--opt engine=eager`): the reference the fast engine
(`fast.py`, the default) is tested against. Full KV in host memory, speculative prefetch of the
tokens that matter.

Per decode step, for each layer t >= 2 (layers 0 and 1 fetch their whole KV, as in the authors'
code), while layer t-1 runs:

1. speculation (a forward pre-hook on layer t-1's self_attn; `hidden_states` there is layer t-1's
   attention input after its input_layernorm): layer t's query for the new token — its full
   W_q projection and RoPE, since for rotary models the skew acts on post-RoPE queries — skewed
   and cut to the partial columns, scored against layer t's partial key cache (device-resident,
   grown every step), selected by `select_tokens`; the positions stay on the device, their count
   goes to pinned host memory in one non-blocking copy. Timed as a SPECULATION phase on the
   compute stream.
2. fetch (a forward hook on decoder layer t-1, once its attention and MLP are queued): the host
   waits for the count (one host sync per layer, as in the authors' code: it sets the shapes; the
   device runs layer t-1's attention and MLP meanwhile), then the store fetches the rows on the
   fetch stream: a device gather straight from the pinned store where the GPU can read it, else
   a host gather into a pinned staging buffer and a copy.
3. layer t's cache `update()` makes the compute stream wait on that copy's event and attends over
   [selected ; new token]; the new K/V go back to the host store, its skewed partial key to the
   partial key cache.

Layers then hold different numbers of tokens, so decode runs with sdpa and no mask: batches must
have equal-length prompts (no padding); any batch size of such prompts works (the count is
averaged over batch rows and heads, as the authors do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvprof import Phase, UsageError
from kvprof_infinigen.attention import AttentionAccess
from kvprof_infinigen.selection import select_tokens, speculative_scores
from kvprof_infinigen.skewing import Skew
from kvprof_transformers.host_store import Copy, DeviceRing
from kvprof_transformers.offload import HostOffloadPolicy
from kvprof_transformers.runner import Batch, KVBytes, Runner

FULL_LAYERS = 2  # layers 0 and 1 always attend over their whole KV (authors' code)


@dataclass
class InfiniGenSettings:
    """The strategy's options (see InfiniGenStrategy.options for their meaning)."""

    alpha: float = 5.0
    partial_weight_ratio: float = 0.2
    budget: float = 0.2
    max_num_kv: int = 0               # absolute cap; 0: budget x (prompt + output tokens)
    partial_columns: str = "prefill"


@dataclass
class _Speculation:
    positions: torch.Tensor   # [batch, kv_heads, k] int64 on the device, the first `count` selected
    count: torch.Tensor       # host (pinned on a GPU): [1] int64, filled by a non-blocking copy
    done: Any                 # CUDA event after the count's copy to the host (None on a CPU device)
    start: Any                # Clock marks around the speculation
    end: Any


class InfiniGenPolicy(HostOffloadPolicy):
    """The offload policy with layers 2+ fetched by speculation (see the module docstring)."""

    name = "infinigen"

    def __init__(self, access: AttentionAccess, skew: Skew, settings: InfiniGenSettings) -> None:
        self.access = access
        self.skew_data = skew
        self.settings = settings

    # --- setup -----------------------------------------------------------------------------------

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        device, dtype = runner.device, runner.loaded.dtype
        self.skew = self.skew_data.matrices.to(device, dtype)
        self.partial_width = max(1, int(self.head_dim * self.settings.partial_weight_ratio))
        self.partial_skew: dict[int, torch.Tensor] = {}
        if self.settings.partial_columns == "calibration":
            self._columns_from_calibration()
        self.hooks += [attention.register_forward_pre_hook(self._attention_hook(i), with_kwargs=True)
                       for i, attention in enumerate(self.access.modules)]
        self.hooks += [layer.register_forward_hook(self._after_layer_hook(i))
                       for i, layer in enumerate(self.decoder_layers)]

    def _columns_from_calibration(self) -> None:
        self.partial_skew, self.partial_width = calibration_partial_skew(
            self.skew, self.skew_data, self.partial_width, range(FULL_LAYERS, self.num_layers))

    def new_cache(self, batch: Batch) -> Any:
        if any(batch.pad_lens):
            raise UsageError("infinigen needs equal-length prompts in a batch (its layers attend over different "
                             "token counts, so no padding mask applies); use --batch-size 1 or the synthetic workload")
        capacity = batch.input_ids.shape[1] + max(r.max_new_tokens for r in batch.requests)
        settings = self.settings
        self.max_num_kv = settings.max_num_kv or max(1, int(settings.budget * capacity))
        self._require_device_room(batch.size, capacity)
        cache = super().new_cache(batch)
        geometry = (batch.size, self.kv_heads, self.head_dim, self.runner.loaded.dtype, self.runner.device)
        self.rows_ring = DeviceRing(self.max_num_kv, *geometry, staging=not self.store.gathers_on_device)
        self.partial_keys = {
            layer: torch.empty(batch.size, self.kv_heads, capacity, self.partial_width,
                               dtype=self.runner.loaded.dtype, device=self.runner.device)
            for layer in range(FULL_LAYERS, self.num_layers)
        }
        pin = self.runner.device.type == "cuda"
        self.count_buffers = [torch.empty(1, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.speculations: dict[int, _Speculation] = {}
        self.speculation_spans: list[tuple[Any, Any, int, int]] = []
        return cache

    def _require_device_room(self, batch_size: int, capacity: int) -> None:
        """A clear error instead of an out-of-memory crash when the partial structures don't fit."""
        if self.runner.device.type != "cuda":
            return
        element = torch.empty((), dtype=self.runner.loaded.dtype).element_size()
        token_bytes = 2 * batch_size * self.kv_heads * self.head_dim * element
        partial_keys = ((self.num_layers - FULL_LAYERS) * batch_size * self.kv_heads * capacity
                        * self.partial_width * element)
        rings = DeviceRing.SLOTS * (capacity + self.max_num_kv) * token_bytes
        free, _ = torch.cuda.mem_get_info(self.runner.device)
        free += torch.cuda.memory_reserved(self.runner.device) - torch.cuda.memory_allocated(self.runner.device)
        require_room(partial_keys + rings, free)

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        super().finish_batch(batch, cache)
        self.partial_keys = {}
        self.rows_ring = None
        if self.settings.partial_columns == "prefill":
            self.partial_skew = {}

    # --- memory ----------------------------------------------------------------------------------

    def device_kv_bytes(self) -> int:
        return self.whole_ring.nbytes + self.rows_ring.nbytes

    def kv_bytes(self, cache: Any) -> KVBytes:
        """Host: the store. Device: the fetch buffers. Aux: the partial key cache (tokens held)
        and the partial skew matrices."""
        result = super().kv_bytes(cache)
        if self.store is None:
            return result
        for layer, keys in self.partial_keys.items():
            held = self.store.lengths[layer]
            result.aux_device += keys[:, :, :held].numel() * keys.element_size()
        result.aux_device += sum(p.numel() * p.element_size() for p in self.partial_skew.values())
        return result

    # --- the layer loop ----------------------------------------------------------------------------

    def fetches_whole(self, layer: int) -> bool:
        return layer < FULL_LAYERS

    def attend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer >= FULL_LAYERS:
            self._append_partial_keys(layer, keys)
        return super().attend(layer, keys, values)

    def _append_partial_keys(self, layer: int, keys: torch.Tensor) -> None:
        first, count = self.store.lengths[layer], keys.shape[-2]
        store = self.partial_keys[layer]
        if first + count > store.shape[2]:  # longer than preallocated: grow by doubling
            grown = store.new_empty((*store.shape[:2], max(first + count, 2 * store.shape[2]), store.shape[3]))
            grown[:, :, :first] = store[:, :, :first]
            self.partial_keys[layer] = store = grown
        store[:, :, first:first + count] = torch.einsum("bknd,kdc->bknc", keys, self.partial_skew[layer])

    def _attention_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not self.decoding:
                if layer >= FULL_LAYERS and self.settings.partial_columns == "prefill":
                    self._choose_columns(layer, kwargs)
            elif FULL_LAYERS <= layer + 1 < self.num_layers:
                self._speculate(layer + 1, kwargs)
        return hook

    def _after_layer_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.decoding and layer + 1 in self.speculations:
                self._fetch_selected(layer + 1)
        return hook

    def _choose_columns(self, layer: int, kwargs: dict[str, Any]) -> None:
        """The authors' runtime choice: per KV head, the partial_weight_ratio of columns with the
        largest sum of |Q·A| over the prompt (here over all batch rows and the query group)."""
        queries = self.access.query(layer, kwargs["hidden_states"], kwargs["position_embeddings"])
        self.partial_skew[layer] = prefill_partial_skew(self.skew[layer], queries, self.partial_width)

    def _speculate(self, target: int, kwargs: dict[str, Any]) -> None:
        """Choose layer `target`'s tokens from this layer's attention input (see module doc)."""
        clock = self.runner.clock
        start = clock.mark()
        query = self.access.query(target, kwargs["hidden_states"], kwargs["position_embeddings"])[:, :, -1]
        held = self.store.lengths[target]
        scores = speculative_scores(query, self.partial_skew[target], self.partial_keys[target][:, :, :held],
                                    self.access.scaling(target))
        positions, count = select_tokens(scores, self.settings.alpha, self.max_num_kv)
        host_count = self.count_buffers[target % 2]  # read two layers later at the latest
        host_count.copy_(count.view(1), non_blocking=True)
        done = None
        if self.runner.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        self.speculations[target] = _Speculation(positions, host_count, done, start, clock.mark())

    def _fetch_selected(self, target: int) -> None:
        """Wait (host) for the speculation's count, then fetch the selected rows."""
        speculation = self.speculations.pop(target)
        if speculation.done is not None:
            speculation.done.synchronize()
        count = int(speculation.count[0])
        rows = speculation.positions[..., :count]
        copy = self.store.fetch_rows(target, rows, self.rows_ring, ready=speculation.done)
        if self.runner.detail == "head":
            copy.rows = rows.cpu()
        copy.ext.update(selected_tokens=float(count), stored_tokens=float(self.store.lengths[target]),
                        max_num_kv=float(self.max_num_kv))
        self.pending[target] = copy
        self.speculation_spans.append((speculation.start, speculation.end, target, count))

    # --- events ------------------------------------------------------------------------------------

    def _flush(self, batch: Batch) -> None:
        super()._flush(batch)
        clock, profiler = self.runner.clock, self.runner.profiler
        step = None if batch.step < 0 else batch.step
        spans = [(clock.resolve(s), clock.resolve(e), layer, count) for s, e, layer, count in self.speculation_spans]
        self.speculation_spans.clear()
        if not spans:
            return
        if self.runner.detail != "step":
            for start, end, layer, count in spans:
                profiler.emit_phase(Phase.SPECULATION.value, start, end, step=step, layer=layer,
                                    batch_size=batch.size, tokens=count, ext={"selected_tokens": float(count)})
            return
        first = min(start for start, _, _, _ in spans)
        total = sum(end - start for start, end, _, _ in spans)
        profiler.emit_phase(Phase.SPECULATION.value, first, first + total, step=step, batch_size=batch.size,
                            tokens=sum(c for _, _, _, c in spans), ext={"spans": float(len(spans))})

    def copy_ext(self, copy: Copy) -> dict[str, float]:
        """Fetches say whether they are a speculated selection (layers 2+) or a whole layer."""
        return {"speculated": float(copy.layer >= FULL_LAYERS)} if copy.to_device else {}


def calibration_partial_skew(skew: torch.Tensor, skew_data: Skew, top: int,
                             layers: Any) -> tuple[dict[int, torch.Tensor], int]:
    """The authors' accuracy-path columns: per KV head, the union of the top columns by
    calibration |Q·A| and by |K·A|. Heads (and layers) with a smaller union get zero columns up
    to the widest one's width, which adds nothing to the scores. Returns the partial skew per
    layer ``[kv_heads, head_dim, width]`` and the width."""
    kv_heads, head_dim = skew.shape[1], skew.shape[2]
    masks = {}
    for layer in layers:
        mask = torch.zeros(kv_heads, head_dim, dtype=torch.bool)
        for energy in (skew_data.query_energy[layer], skew_data.key_energy[layer]):
            mask.scatter_(-1, energy.topk(top, dim=-1).indices, True)
        masks[layer] = mask
    width = max((int(mask.sum(-1).max()) for mask in masks.values()), default=top)
    partial_skew = {}
    for layer, mask in masks.items():
        partial = skew.new_zeros(kv_heads, head_dim, width)
        for head in range(kv_heads):
            columns = mask[head].nonzero().squeeze(-1).to(skew.device)
            partial[head, :, :len(columns)] = skew[layer, head][:, columns]
        partial_skew[layer] = partial
    return partial_skew, width


def prefill_partial_skew(skew: torch.Tensor, queries: torch.Tensor, width: int) -> torch.Tensor:
    """The authors' runtime choice of a layer's partial columns: per KV head, the `width` columns
    with the largest sum of |Q·A| over the prompt (here over all batch rows and the query
    group). queries ``[batch, query_heads, tokens, head_dim]`` post-RoPE; skew: the layer's
    ``[kv_heads, head_dim, head_dim]``. Returns ``[kv_heads, head_dim, width]``."""
    batch, _, tokens, dim = queries.shape
    kv_heads = skew.shape[0]
    grouped = queries.view(batch, kv_heads, -1, tokens, dim)
    skewed = torch.einsum("bkgnd,kde->bkgne", grouped, skew)
    energy = skewed.abs().sum(dim=(0, 2, 3), dtype=torch.float32)          # [kv_heads, dim]
    columns = energy.topk(width, dim=-1).indices                            # [kv_heads, partial]
    return skew.gather(-1, columns.unsqueeze(1).expand(-1, dim, -1))


def require_room(needed_bytes: int, free_bytes: int) -> None:
    """UsageError when InfiniGen's device structures (partial key cache, fetch buffers) don't fit."""
    if needed_bytes > free_bytes:
        raise UsageError(
            f"infinigen: the GPU has {free_bytes / 2**30:.2f} GiB free but its partial key cache and fetch "
            f"buffers need {needed_bytes / 2**30:.2f} GiB; lower partial_weight_ratio, budget or the prompt length"
        )
