"""H2O on kvprof's fast engine: a fixed cache of budget + 1 slots per KV head, evicted in place.

The rule is the eager policy's (`policy.H2OPolicy`, the authors' real-drop code): per layer and KV
head keep the `recent` newest tokens and the `heavy` others with the largest accumulated
attention (post-softmax weights summed over queries, query heads of a group and steps). What
changes is the machinery, after the authors' own fast (FlexGen-based) version:

* Decode: each layer holds, per (row, KV head), `budget + 1` slots with their true positions and
  float32 scores, and the index of its free slot. A step writes the new token into the free
  slot, attends over all slots (positions mask empty ones), adds the attention weights to the
  scores, and picks the next free slot: the lowest-scoring slot outside the recent window (an
  empty slot first, while the cache is not full). The token in it is the step's eviction; its
  position goes into a device buffer (`evicted[step]`). All of it is device work with fixed
  shapes, captured in the runner's CUDA graph: no host sync. On CUDA the step of a layer is two
  Triton kernels (`decode_kernel`); `torch_decode` is the same step in torch (the CPU path).
* Prefill: the output from the fused SDPA kernel; each key's attention mass from a pass over
  blocks of queries that only visits keys a block can see (causal), without keeping the score
  matrix; then the one-time compression to the budget, layer by layer, so the full prompt KV of
  one layer at most is resident beside the compressed cache.
* A follow-up chunk (`--question after`) attends over the kept slots plus itself by position,
  with the eager attention function, and compresses back to the budget.
* Events: the prefill compression's evictions are emitted after prefill; a decode step's are read
  from the device buffer when the runner drains that step (a side-stream copy), at the run's
  detail. At detail "step" one event per request and step carries every layer's and KV head's
  evicted positions (num_layers x kv_heads lists, layer-major), so token survival needs no
  finer detail.

Exempt layers keep their whole cache in a full-size buffer and attend like `full`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from kvprof import Kind, Medium, Phase, UsageError
from kvprof.events import EventBatch, Positions
from kvprof_h2o import attention
from kvprof_h2o.decode_kernel import fused_decode
from kvprof_h2o.heavy_hitters import dropped_positions, select_slots
from kvprof_h2o.mass_kernel import triton_mass
from kvprof_transformers.runner import Batch, KVBytes, StaticPolicy
from kvprof_transformers.static_cache import prefill_attention

_TRITON_MASS = {"usable": True}
# The decode kernels run on CUDA tensors; "cpu": on CPU ones too (under Triton's interpreter: the tests).
_TRITON_DECODE = {"usable": True, "cpu": False}
MASS_LOGITS_PER_BLOCK = 1 << 26  # logits held at once by the prefill mass pass (256 MiB in float32)


def prefill_mass(query: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                 scaling: float, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each key of a prompt receives, summed over the real queries and the query heads
    of its KV head: (B, Hkv, L) float32. On CUDA the Triton kernels of `mass_kernel` (given each
    query's log-sum-exp `lse` (B, Hq, L) from the prompt's attention, only the second); else (or if
    they cannot be built) `torch_prefill_mass`.

    query (B, Hq, L, D); keys (B, Hkv, L, D) at slots = prompt indices; query_positions (B, L),
    -1 for padding (a padding key receives nothing and a padding query gives nothing).
    """
    if query.is_cuda and _TRITON_MASS["usable"]:
        try:
            return triton_mass(query, keys, query_positions, scaling, lse=lse)
        except Exception as exc:  # noqa: BLE001 - no Triton or no compiler here: the torch pass
            _TRITON_MASS["usable"] = False
            warnings.warn(f"h2o: the Triton prefill mass kernels failed ({exc!r}); using the torch pass",
                          stacklevel=2)
    return torch_prefill_mass(query, keys, query_positions, scaling)


def _cudnn_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, keys, values, None, True, 0.0, True, False, scale=scaling)[:2]


def _flash_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    group = query.shape[1] // keys.shape[1]
    if group > 1:  # this kernel takes grouped-query heads only expanded
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, keys, values, 0.0, True, False,
                                                               scale=scaling)[:2]


# SDPA's kernels that also return each query's log-sum-exp, in the order tried. One Llama-3-8B
# layer at 8K x 16 on the H200 (`benchmarks/h2o_gpu.py`): plain SDPA 14.5 ms, cuDNN's on the
# grouped keys 14.0 ms (output equal to SDPA's), flash's on expanded keys 26.0 ms. One that
# fails, or whose log-sum-exp fails the conservation check the first time it is used, is
# dropped for the rest of the process.
LSE_KERNELS = {"cudnn": _cudnn_with_lse, "flash": _flash_with_lse}
_LSE = {"usable": list(LSE_KERNELS), "checked": set()}


def attention_with_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """A causal, unpadded prompt's attention by one of `LSE_KERNELS`: output (B, L, Hq, D), each
    query's natural log-sum-exp (B, Hq, L) float32, and the kernel's name; None where none runs
    (then the mass kernels compute the log-sum-exp themselves)."""
    if not (query.is_cuda and _TRITON_MASS["usable"] and query.dtype in (torch.bfloat16, torch.float16)):
        return None  # the kernels are half-precision only
    for name in list(_LSE["usable"]):
        try:
            output, lse = LSE_KERNELS[name](query, keys, values, scaling)
        except (RuntimeError, AttributeError) as exc:  # no such kernel for these shapes or this build
            _drop_lse_kernel(name, f"failed ({exc!r})")
            continue
        if lse.numel() != query.shape[0] * query.shape[1] * query.shape[2]:
            _drop_lse_kernel(name, f"gave a log-sum-exp of shape {tuple(lse.shape)}")
            continue
        return output.transpose(1, 2), lse.reshape(query.shape[:3]), name
    return None


def _drop_lse_kernel(name: str, why: str) -> None:
    if name in _LSE["usable"]:
        _LSE["usable"].remove(name)
        warnings.warn(f"h2o: SDPA's {name} kernel with log-sum-exp {why}; trying the next", stacklevel=3)


def _mass_is_conserved(mass: torch.Tensor, query_positions: torch.Tensor, group: int) -> bool:
    """Each real query hands out one unit of attention per query head: checked once per process
    and kernel on its log-sum-exp (natural log, per query head, as the kernels document)."""
    expected = (query_positions >= 0).sum(-1, dtype=torch.float32)[:, None] * group
    return bool(torch.allclose(mass.sum(-1), expected.expand(mass.shape[:2]), rtol=1e-3))


def torch_prefill_mass(query: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor, scaling: float,
                       block_elements: int = MASS_LOGITS_PER_BLOCK) -> torch.Tensor:
    """`prefill_mass` in torch: same arithmetic as `attention.attend` (logits in the model's
    dtype, float32 softmax), over blocks of queries that visit only the keys they can see."""
    batch, q_heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    grouped = (query * scaling).view(batch, kv_heads, group, length, dim)
    key_pos = query_positions[:, None, None, None, :]  # (B, 1, 1, 1, L)
    real = (query_positions >= 0).to(torch.float32)
    mass = query.new_zeros((batch, kv_heads, length), dtype=torch.float32)
    block = max(1, min(length, block_elements // max(1, batch * q_heads * length)))
    minimum = torch.finfo(query.dtype).min
    for start in range(0, length, block):
        end = min(length, start + block)
        size = end - start
        q_block = grouped[:, :, :, start:end].reshape(batch, kv_heads, group * size, dim)
        logits = torch.matmul(q_block, keys[:, :, :end].transpose(-1, -2)).view(batch, kv_heads, group, size, end)
        q_pos = query_positions[:, None, None, start:end, None]
        visible = (key_pos[..., :end] >= 0) & (key_pos[..., :end] <= q_pos)
        logits.masked_fill_(~visible, minimum)
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).view(batch, kv_heads, group * size, end)
        rows = real[:, None, start:end].expand(batch, group, size).reshape(batch, 1, 1, group * size)
        mass[:, :, :end] += torch.matmul(rows, weights).squeeze(-2)
    return mass


def torch_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache_keys: torch.Tensor,
                 cache_values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor, free: torch.Tensor,
                 now: torch.Tensor, recent: torch.Tensor, cap: torch.Tensor, evicted: torch.Tensor,
                 step: torch.Tensor, scaling: float) -> torch.Tensor:
    """One layer's decode step in torch (the CPU path and the reference of `decode_kernel.fused_decode`,
    which documents the arguments): the new token into its free slot, attention over every slot,
    the weights added to the scores, the next free slot chosen and its victim recorded."""
    batch, kv_heads, _, dim = cache_keys.shape
    slot = free[:, :, None]
    cache_keys.scatter_(2, slot[..., None].expand(batch, kv_heads, 1, dim), keys)
    cache_values.scatter_(2, slot[..., None].expand(batch, kv_heads, 1, dim), values)
    positions.scatter_(-1, slot, now[:, :, None].expand(batch, kv_heads, 1))
    scores.scatter_(-1, slot, 0.0)
    group = query.shape[1] // kv_heads
    grouped = (query * scaling).reshape(batch, kv_heads, group, dim)
    logits = torch.matmul(grouped, cache_keys.transpose(-1, -2))
    logits.masked_fill_((positions < 0)[:, :, None, :], torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    output = torch.matmul(weights.to(cache_values.dtype), cache_values)
    scores += weights.sum(dim=2)
    chosen = next_free(positions, scores, now, recent, cap)
    free.copy_(chosen)
    victims = positions.gather(-1, chosen[..., None]).squeeze(-1)
    evicted.index_copy_(0, step, victims[None])
    return output.reshape(batch, 1, group * kv_heads, dim)


def next_free(positions: torch.Tensor, scores: torch.Tensor, now: torch.Tensor | None, recent: torch.Tensor,
              cap: torch.Tensor) -> torch.Tensor:
    """Per (row, head): an empty usable slot if there is one, else the lowest-scoring slot
    outside the recent window (the next eviction). now (B, 1) or None (the newest position held);
    recent (B,) the window; cap (B, 1, 1) the usable slots."""
    valid = positions >= 0
    newest = positions.amax(dim=-1, keepdim=True) if now is None else now[:, :, None]
    in_window = valid & (positions > newest - recent[:, None, None])
    slot_index = torch.arange(positions.shape[-1], device=positions.device)
    unusable = slot_index[None, None, :] >= cap
    priority = scores.masked_fill(in_window | unusable, float("inf")).masked_fill(~valid & ~unusable, float("-inf"))
    return priority.argmin(dim=-1)


class FastH2OPolicy(StaticPolicy):
    """H2O with in-place eviction in a budget + 1 slot cache; see the module docstring."""

    name = "h2o"

    def __init__(self, budget: Any, exempt_layers: frozenset[int], graphs: bool = True) -> None:
        super().__init__(graphs)
        self.budget = budget
        self.exempt = exempt_layers
        self.books = None

    # --- buffers --------------------------------------------------------------------------------

    def _allocate(self, batch_size: int, slots: int) -> None:
        budgets = [sum(self.budget.for_request(len(r.prompt_token_ids), r.max_new_tokens))
                   for r in self.runner.requests]
        self.width = max(budgets) + 1  # slots per (row, KV head) in a budgeted layer
        if self.books is not None and self.kv.batch == batch_size and self.kv.slots == slots:
            return
        scored = [layer for layer in range(self.num_layers) if layer not in self.exempt]
        # Budgeted layers get `width` slots; exempt layers the full length (and the decode mask).
        self.layer_slots = [self.width if layer in scored else slots for layer in range(self.num_layers)]
        super()._allocate(batch_size, slots)
        device = self.runner.device
        self.books = {layer: (torch.full((batch_size, self.kv_heads, self.width), -1, dtype=torch.long, device=device),
                              torch.zeros((batch_size, self.kv_heads, self.width), dtype=torch.float32, device=device),
                              torch.zeros((batch_size, self.kv_heads), dtype=torch.long, device=device))
                      for layer in scored}
        self.scored = scored
        max_new = max(r.max_new_tokens for r in self.runner.requests)
        self.evicted = torch.full((max_new + 1, len(scored), batch_size, self.kv_heads), -1, dtype=torch.long,
                                  device=device)
        # Per-row budgets, filled in place for each batch: the captured graph reads these tensors.
        self.heavy = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.recent = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.cap = torch.zeros((batch_size, 1, 1), dtype=torch.long, device=device)

    def new_cache(self, batch: Batch) -> Any:
        cache = super().new_cache(batch)
        budgets = [self.budget.for_request(n, r.max_new_tokens) for n, r in zip(batch.prompt_lens, batch.requests)]
        self.heavy.copy_(torch.tensor([h for h, _ in budgets]))
        self.recent.copy_(torch.tensor([r for _, r in budgets]))
        self.budgets = [h + r for h, r in budgets]
        self.cap.copy_((self.heavy + self.recent + 1)[:, None, None])  # usable slots per row
        for positions, scores, free in self.books.values():
            positions.fill_(-1)
            scores.zero_()
            free.zero_()
        self.evicted.fill_(-1)
        self.held = [0] * batch.size     # tokens kept per (row, head) in a budgeted layer
        self.prefill_dropped: dict[int, torch.Tensor] = {}
        self.prefill_spans: dict[int, tuple[Any, Any]] = {}
        self.prefill_reports: dict[int, tuple[dict[int, Any], dict[int, torch.Tensor], int]] = {}
        return cache

    def new_cache_for_capture(self) -> None:
        super().new_cache_for_capture()
        self.cap.fill_(self.width)
        self.recent.fill_(1)

    def attention_mask(self, batch: Batch, cache: Any) -> torch.Tensor | None:
        """Before each prefill chunk: the true positions of its tokens (-1: padding)."""
        real = batch.attention_mask[:, self.filled:].bool()
        first = batch.next_positions[:, None] if self.filled else 0
        self.query_positions = torch.where(real, first + real.long().cumsum(-1) - 1, -1)
        self.chunk_tokens = real.sum(-1).tolist()  # once per chunk: no host sync in each layer
        return None

    # --- attention ------------------------------------------------------------------------------

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        if layer in self.exempt:
            return super().attend(layer, query, keys, values, scaling)
        if self.decoding:
            return self._decode(layer, query, keys, values, scaling)
        if self.filled == 0:
            return self._prefill(layer, query, keys, values, scaling)
        return self._followup(layer, query, keys, values, scaling)

    def _prefill(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 scaling: float) -> torch.Tensor:
        fused = attention_with_lse(query, keys, values, scaling) if self.key_valid is None else None
        output = fused[0] if fused else prefill_attention(query, keys, values, scaling, self.key_valid, 0)
        start = self.runner.clock.mark()
        mass = prefill_mass(query, keys, self.query_positions, scaling, lse=fused[1] if fused else None)
        if fused and fused[2] not in _LSE["checked"]:
            _LSE["checked"].add(fused[2])
            if not _mass_is_conserved(mass, self.query_positions, query.shape[1] // keys.shape[1]):
                _drop_lse_kernel(fused[2], "is not what the mass kernel expects")
                mass = prefill_mass(query, keys, self.query_positions, scaling)
        batch, kv_heads, length = mass.shape
        key_pos = self.query_positions[:, None, :].expand(batch, kv_heads, length)
        self._compress(layer, keys, values, key_pos, mass, held=self.chunk_tokens)
        self.prefill_spans[layer] = (start, self.runner.clock.mark())
        return output

    def _followup(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  scaling: float) -> torch.Tensor:
        positions, scores, _ = self.books[layer]
        chunk_pos = self.query_positions  # set by after_chunk for the follow-up
        batch, kv_heads, length = keys.shape[0], keys.shape[1], keys.shape[-2]
        all_keys = torch.cat([self.kv.keys[layer], keys], dim=2)
        all_values = torch.cat([self.kv.values[layer], values], dim=2)
        all_pos = torch.cat([positions, chunk_pos[:, None, :].expand(batch, kv_heads, length)], dim=-1)
        output, mass = attention.attend(query, all_keys, all_values, all_pos, chunk_pos, scaling)
        start = self.runner.clock.mark()
        mass[:, :, :self.width] += scores
        self._compress(layer, all_keys, all_values, all_pos, mass, held=self._followup_held())
        self.prefill_spans[layer] = (start, self.runner.clock.mark())
        return output

    def _compress(self, layer: int, keys: torch.Tensor, values: torch.Tensor, key_pos: torch.Tensor,
                  mass: torch.Tensor, held: list[int]) -> None:
        """Keep each (row, head)'s heavy hitters and recent tokens in slots [0, kept); the rest
        empty; the first free slot chosen; the dropped positions kept for the events."""
        kept = [min(h, b) for h, b in zip(held, self.budgets)]
        new_len = max(kept)
        slots, keep = select_slots(key_pos, mass, self.heavy, self.recent, new_len)
        most = max(h - k for h, k in zip(held, kept))
        if most > 0:
            self.prefill_dropped[layer] = dropped_positions(key_pos, slots, keep, most)
        positions, scores, free = self.books[layer]
        index = slots.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        self.kv.keys[layer][:, :, :new_len].copy_(keys.gather(2, index))
        self.kv.values[layer][:, :, :new_len].copy_(values.gather(2, index))
        positions.fill_(-1)
        scores.zero_()
        positions[:, :, :new_len].copy_(key_pos.gather(-1, slots).masked_fill(~keep, -1))
        scores[:, :, :new_len].copy_(mass.gather(-1, slots).masked_fill(~keep, 0.0))
        free.copy_(next_free(positions, scores, None, self.recent, self.cap))
        self.held = kept

    def _decode(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                scaling: float) -> torch.Tensor:
        positions, scores, free = self.books[layer]
        args = (query, keys, values, self.kv.keys[layer], self.kv.values[layer], positions, scores, free,
                self.runner.state.positions, self.recent, self.cap, self.evicted[:, self.scored.index(layer)],
                self.runner.state.step, scaling)
        if (query.is_cuda or _TRITON_DECODE["cpu"]) and _TRITON_DECODE["usable"]:
            try:
                return fused_decode(*args)
            except Exception as exc:  # noqa: BLE001 - no Triton or no compiler here: the torch step
                _TRITON_DECODE["usable"] = False
                warnings.warn(f"h2o: the Triton decode kernels failed ({exc!r}); using the torch step",
                              stacklevel=2)
        return torch_decode(*args)

    def _followup_held(self) -> list[int]:
        return [kept + n for kept, n in zip(self.held, self.chunk_tokens)]

    # --- the runner's hooks ---------------------------------------------------------------------

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        followup = self.filled > 0
        super().after_chunk(batch, cache, tokens)
        if followup:
            self._keep_prefill_report(chunk=1)

    def after_prefill(self, batch: Batch, cache: Any) -> None:
        self._keep_prefill_report(chunk=0)

    def kv_bytes(self, cache: Any) -> KVBytes:
        kv = self.kv
        per_slot = 2 * self.kv_heads * self.head_dim * self.runner.loaded.dtype.itemsize
        rows = kv.batch
        exempt = len(self.exempt) * per_slot * rows * self.runner.filled_slots
        decoded = max(0, self.runner.filled_slots - self.filled)
        kept = sum(min(h + decoded, b) for h, b in zip(self.held, self.budgets))
        budgeted = len(self.scored) * per_slot * kept
        books = len(self.scored) * rows * self.kv_heads * self.width * (8 + 4)
        return KVBytes(device=exempt + budgeted, aux_device=books)

    # --- events ---------------------------------------------------------------------------------

    def _keep_prefill_report(self, chunk: int) -> None:
        """The chunk's compression, kept as device tensors and clock marks for `drain_prefill`."""
        if self.runner.profiler.enabled and self.prefill_spans:
            dropped = {layer: d.flip(-1).to(torch.int32) for layer, d in self.prefill_dropped.items()}
            self.prefill_reports[chunk] = (dict(self.prefill_spans), dropped, self.kv_bytes(None).device)
        self.prefill_dropped.clear()
        self.prefill_spans.clear()

    def drain_prefill(self, batch: Batch, chunk: int) -> None:
        if chunk not in self.prefill_reports:
            return
        spans, dropped, device_bytes = self.prefill_reports.pop(chunk)
        clock = self.runner.clock
        times = {layer: (clock.resolve(s), clock.resolve(e)) for layer, (s, e) in spans.items()}
        if self.runner.detail != "step":
            for layer, (start, end) in sorted(times.items()):
                self.runner.profiler.emit_phase(Phase.EVICTION.value, start, end, layer=layer)
        if not dropped:
            return
        layers = sorted(dropped)
        width = max(d.shape[-1] for d in dropped.values())
        with self.runner.drain_stream():
            stacked = torch.stack([torch.nn.functional.pad(dropped[layer], (width - dropped[layer].shape[-1], 0),
                                                           value=-1) for layer in layers])
        start, end = min(s for s, _ in times.values()), max(e for _, e in times.values())
        self._emit(batch, None, start, end, layers, stacked, device_bytes)

    def drain(self, batch: Batch, step: int, start_ns: int, end_ns: int) -> None:
        self._emit(batch, step, start_ns, end_ns, self.scored, self.evicted[step][..., None],
                   self.kv_bytes(None).device)

    def _emit(self, batch: Batch, step: int | None, start: int, end: int, layers: list[int],
              dropped: torch.Tensor, device_bytes: int) -> None:
        """Evict events at the run's detail, as one batch. `dropped` (len(layers), B, H, n) on the
        device: each (layer, row, KV head)'s dropped positions in ascending order after its -1 padding."""
        detail = self.runner.detail
        active = [row for row, ns in enumerate(batch.finished_ns) if ns is None]
        if not active:
            return
        with self.runner.drain_stream():
            if detail == "step":  # every layer, exempt ones empty: positions are layers x KV heads, layer-major
                full = dropped.new_full((self.num_layers, *dropped.shape[1:]), -1)
                full[layers] = dropped
                dropped, layers = full, list(range(self.num_layers))
            counts, values = self._to_host(dropped, active)  # (A, L, H) counts; the positions, in order
        lists_per_event = {"head": 1, "layer": self.kv_heads}.get(detail, self.num_layers * self.kv_heads)
        grouped = counts.reshape(len(active), -1, lists_per_event)  # (A, events per row, lists per event)
        picked, which = np.nonzero(grouped.sum(-1) > 0)            # events that drop something
        if not len(picked):
            return
        rows = np.asarray(active)[picked]
        list_counts = grouped[picked, which].reshape(-1)
        tokens = grouped[picked, which].sum(-1)
        entry = 2 * self.head_dim * self.runner.loaded.dtype.itemsize
        ids = [request.request_id for request in batch.requests]
        ext: dict[str, Any] = {"budget_tokens": np.asarray(self.budgets, dtype=float)[rows]}
        columns: dict[str, Any] = {"request_id": [ids[row] for row in rows.tolist()],
                                   "tokens": tokens, "bytes": tokens * entry, "ext": ext}
        if detail == "head":
            columns["layer"] = np.asarray(layers)[which // self.kv_heads]
            columns["kv_head"] = which % self.kv_heads
        elif detail != "step":
            columns["layer"] = np.asarray(layers)[which]
        else:
            ext["layers"] = np.full(len(rows), float(self.num_layers))
            ext["kv_heads"] = np.full(len(rows), float(self.kv_heads))
        # Events that drop nothing hold no values, so the values are exactly the picked events' lists.
        positions = Positions(values=values,
                              list_offsets=np.concatenate([[0], np.cumsum(list_counts)]).astype(np.int32),
                              event_offsets=np.arange(0, len(rows) * lists_per_event + 1, lists_per_event,
                                                      dtype=np.int32))
        self.runner.profiler.emit_batch(EventBatch(
            Kind.EVICT, start, end, columns=columns, positions=positions,
            shared={"reason": "h2o", "step": step, "src_medium": Medium.DEVICE.value,
                    "kv_device_bytes": device_bytes}))

    @staticmethod
    def _to_host(dropped: torch.Tensor, active: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per (active row, layer, KV head) how many positions `dropped` (L, B, H, n) holds, and
        those positions in row, layer, head order. A step's victims (n = 1) are copied whole, in
        one wait; a prefill cut (25M positions at batch 16) is compacted on the device first."""
        by_row = dropped.permute(1, 0, 2, 3)
        if len(active) < by_row.shape[0]:
            by_row = by_row[active]
        if by_row.shape[-1] == 1:
            host = by_row.cpu().numpy()
            held = host >= 0
            return held.sum(-1), host[held].astype(np.int32)
        held = by_row >= 0
        return held.sum(-1).cpu().numpy(), by_row[held].to(torch.int32).cpu().numpy()


def check_supported(model: Any) -> None:
    """The fast path attends by slot with one mask per row; sliding windows need the eager path."""
    from kvprof_transformers.static_cache import require_attention_interface, uninstall

    previous = require_attention_interface(model)
    uninstall(model, previous)
    text = model.config.get_text_config()
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise UsageError("h2o: the fast engine does not implement sliding-window attention; "
                         "run --opt engine=eager")
