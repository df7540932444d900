"""InfiniGen on the fast engine: speculation a layer ahead, no host wait, the step graph-captured.

`StaticInfiniGenPolicy` is `StaticOffloadPolicy` (every layer's KV in pinned, mapped host
memory) with layers 2+ fetched by speculation. Per decode step, inside one CUDA graph on a GPU:

* Layers 0 and 1 fetch their whole KV (authors' code), by DMA on the copy stream: layer 0 when
  the step starts, layer 1 when layer 0 starts.
* When layer t starts (its attention module's pre-hook: the input is layer t's attention input
  after its layernorm), layer t+1 (>= 2) is speculated on a high-priority side stream: its
  query (full W_q and RoPE, skewed, cut to the partial columns) against its partial key cache
  over every slot (slots not held yet score -inf), then `select_within_cap`: the authors' count
  rule and each head's top-`count` tokens, by a threshold and a prefix-sum compaction into a
  fixed buffer of `max_num_kv` positions. The count stays on the device.
* Right behind it on the copy stream, a Triton kernel reads only the first `count` selected
  rows of every head from the mapped host store into a fixed device buffer (`gather_rows`).
* Layer t+1's attention waits on the gather's event (the compute stream, not the host), writes
  the new token after the cap (always attended) and attends with a mask built on the device
  from the count; the new K/V go to the host store and the new partial key to the partial key
  cache.

Buffers alternate by layer parity; the order of the pre-hook (layer t+1 starts after layer t's
attention was queued) makes that safe without further events. Phases come from GPU-timer
stamps into a per-step row of pinned memory (`StepLog`): speculation (side stream; its PHASE
events say `ext overlapped=1`, so analyses report them beside the step's critical-path split),
the gather (copy stream) and the compute stream's wait for it (KV_TRANSFER when it had to wait);
the count goes there too. The host turns finished steps into events (`drain`).

The selection and the tokens are those of the eager implementation (`policy.InfiniGenPolicy`, the
transliteration of the authors' rule), which stays as the reference (`--opt engine=eager`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvprof import Phase, UsageError
from kvprof_infinigen.attention import AttentionAccess
from kvprof_infinigen.policy import (
    FULL_LAYERS,
    InfiniGenSettings,
    calibration_partial_skew,
    prefill_partial_skew,
    require_room,
)
from kvprof_infinigen.selection import (
    fused_selection_available,
    partial_query,
    rotate_query,
    select_fused,
    select_within_cap,
    speculative_scores,
)
from kvprof_infinigen.skewing import Skew
from kvprof_transformers.host_store import _on, _record, gather_rows
from kvprof_transformers.offload import StaticOffloadPolicy
from kvprof_transformers.runner import Batch, KVBytes, Runner, free_memory_bytes
from kvprof_transformers.static_cache import PassThroughCache, decode_attention

SPEC_START, SPEC_END, COUNT = 3, 4, 5  # step-log columns of a speculated layer (see StaticOffloadPolicy)


@dataclass
class SpeculationSwitches:
    """Ways to run the decode step that only benchmarks/infinigen_spec.py sets (through the class
    attribute `StaticInfiniGenPolicy.switches`), to split speculation's cost; not strategy options.

    on_main_stream: speculate on the compute stream, right where layer t starts, instead of the
        high-priority side stream (its kernels then run alone, but on the critical path).
    fixed_selection: the ablation. Each layer's selection is speculated once, when decoding starts,
        from the prompt's last token (that layer's attention input in the prefill), and every step
        fetches it again: the same fetches and counts (about), no speculation work in the step.
        The tokens are then not InfiniGen's.
    fused_query: on a GPU, the speculative query's RoPE as one kernel and its partial skew as the
        one bmm (`rotate_query`, `partial_query`); False: torch's ops (RoPE's five, einsum's).
    probe: called with the policy at the end of every batch, before anything is freed.
    """

    on_main_stream: bool = False
    fixed_selection: bool = False
    fused_query: bool = True
    probe: Callable[[Any], None] | None = None


class StaticInfiniGenPolicy(StaticOffloadPolicy):
    name = "infinigen"
    FULL_FETCH_LAYERS = FULL_LAYERS
    switches = SpeculationSwitches()

    def __init__(self, access: AttentionAccess, skew: Skew, settings: InfiniGenSettings,
                 graphs: bool = True) -> None:
        super().__init__(overlap=True, graphs=graphs)
        self.access = access
        self.skew_data = skew
        self.settings = settings

    # --- setup -------------------------------------------------------------------------------------

    def bind(self, runner: Runner) -> None:
        super().bind(runner)
        device, dtype = runner.device, runner.loaded.dtype
        self.skew = self.skew_data.matrices.to(device, dtype)
        self.partial_width = max(1, int(self.head_dim * self.settings.partial_weight_ratio))
        self.calibrated: dict[int, torch.Tensor] = {}
        if self.settings.partial_columns == "calibration":
            self.calibrated, self.partial_width = calibration_partial_skew(
                self.skew, self.skew_data, self.partial_width, range(FULL_LAYERS, self.num_layers))
        self.speculated = list(range(FULL_LAYERS, self.num_layers))
        self.partial_skew: torch.Tensor | None = None
        self.fused = fused_selection_available(device)  # GPU: scores and selection in three Triton kernels
        self.switches = type(self).switches
        self.fused_query = self.fused and self.switches.fused_query
        self.fused_query_error: str | None = None
        self.query_checked = False
        if self.switches.fixed_selection:
            self.prompt_inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            self.hooks += [module.register_forward_pre_hook(self._prompt_input_hook(i), with_kwargs=True)
                           for i, module in enumerate(self.layer_modules)]

    def cap_for(self, slots: int) -> int:
        settings = self.settings
        return min(slots, settings.max_num_kv or max(1, int(settings.budget * slots)))

    def device_bytes_needed(self, batch_size: int, slots: int) -> int:
        element = self.runner.loaded.dtype.itemsize
        cap = self.cap_for(slots)
        rows = 2 * 2 * batch_size * self.kv_heads * (cap + 1) * self.head_dim * element
        partial = len(self.speculated) * batch_size * self.kv_heads * slots * self.partial_width * element
        return super().device_bytes_needed(batch_size, slots) + rows + partial

    def prepare(self, batch_size: int, slots: int) -> None:
        if self.runner.device.type == "cuda":
            require_room(self.device_bytes_needed(batch_size, slots), free_memory_bytes(self.runner.device))
        super().prepare(batch_size, slots)

    def _allocate(self, batch_size: int, slots: int) -> None:
        fresh = self.host is None or self.host.shape[:3] != (batch_size, self.kv_heads, slots)
        super()._allocate(batch_size, slots)
        if not fresh:
            return
        dtype, device = self.runner.loaded.dtype, self.runner.device
        self.cap = cap = self.cap_for(slots)
        shape = (batch_size, self.kv_heads, cap + 1, self.head_dim)
        self.rows = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                     for _ in range(2)]
        self.partial_keys = torch.zeros((self.num_layers, batch_size, self.kv_heads, slots, self.partial_width),
                                        dtype=dtype, device=device)
        self.partial_skew = torch.zeros((self.num_layers, self.kv_heads, self.head_dim, self.partial_width),
                                        dtype=dtype, device=device)
        for layer, partial in self.calibrated.items():
            self.partial_skew[layer].copy_(partial)
        self.held_mask = torch.full((batch_size, 1, 1, slots), float("-inf"), dtype=torch.float32, device=device)
        self.positions = [torch.zeros((batch_size, self.kv_heads, cap), dtype=torch.long, device=device)
                          for _ in range(2)]
        self.counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(2)]
        if self.switches.fixed_selection:
            self.fixed_positions = torch.zeros((self.num_layers, batch_size, self.kv_heads, cap), dtype=torch.long,
                                               device=device)
            self.fixed_counts = torch.zeros((self.num_layers, 1), dtype=torch.long, device=device)
        query_heads, dim = self.access.query_heads, self.head_dim
        self.rotated = torch.zeros((self.kv_heads, batch_size * query_heads // self.kv_heads, dim), dtype=dtype,
                                   device=device)
        self.partial_queries = torch.zeros((self.kv_heads, batch_size * query_heads // self.kv_heads,
                                            self.partial_width), dtype=dtype, device=device)
        self.scratch = torch.zeros((batch_size * self.kv_heads, slots), dtype=torch.float32, device=device)
        self.row_counts = torch.zeros(batch_size * self.kv_heads, dtype=torch.int32, device=device)
        # Rows of the gathered buffer: the first `count` are the selection, row `cap` the new token.
        row_ids = torch.arange(cap + 1, device=device)
        row_ids[cap] = -1
        self.row_ids = row_ids
        self.inputs: dict[str, torch.Tensor] = {}
        self.positions_log: torch.Tensor | None = None

    def new_cache_for_capture(self) -> None:
        super().new_cache_for_capture()
        self._ensure_positions_log()

    def _ensure_positions_log(self) -> None:
        """Detail "head": every step's selected positions, per speculated layer (host memory)."""
        if self.runner.detail != "head":
            return
        steps = self.log.rows.shape[0]
        shape = (steps, self.num_layers, self.batch_size, self.kv_heads, self.cap)
        if self.positions_log is None or tuple(self.positions_log.shape) != shape:
            from kvprof_transformers.host_store import _mapped

            self.positions_log = torch.zeros(shape, dtype=torch.long, pin_memory=self.cuda)
            self.positions_log_device = (_mapped(self.positions_log, self.runner.device) if self.cuda
                                         else self.positions_log)

    # --- per batch ---------------------------------------------------------------------------------

    def new_cache(self, batch: Batch) -> PassThroughCache:
        if any(batch.pad_lens):
            raise UsageError("infinigen needs equal-length prompts in a batch (the speculation scores every "
                             "held slot alike); use --batch-size 1 or the synthetic workload")
        cache = super().new_cache(batch)
        self._ensure_positions_log()
        self.held_mask.fill_(float("-inf"))
        return cache

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        if self.decoding or layer < FULL_LAYERS:
            return super().attend(layer, query, keys, values, scaling)
        if self.settings.partial_columns == "prefill" and self.filled == 0:
            # From the prompt's queries only: a follow-up turn (the question) is scored with the
            # columns chosen before it was seen.
            self.partial_skew[layer].copy_(prefill_partial_skew(self.skew[layer], query, self.partial_width))
        partial = torch.einsum("bknd,kdc->bknc", keys, self.partial_skew[layer])
        self.partial_keys[layer][:, :, self.filled:self.filled + keys.shape[-2]].copy_(partial)
        return super().attend(layer, query, keys, values, scaling)

    def after_chunk(self, batch: Batch, cache: Any, tokens: int) -> None:
        self.held_mask[..., self.filled:self.filled + tokens] = 0.0
        super().after_chunk(batch, cache, tokens)

    # --- the decode step (inside the graph) ---------------------------------------------------------

    def after_decode_step(self) -> None:
        self.held_mask.index_fill_(-1, self.slot, 0.0)  # this step's token is held from now on
        super().after_decode_step()

    def layer_start(self, layer: int, kwargs: dict[str, Any]) -> None:
        super().layer_start(layer, kwargs)  # whole-layer prefetch of layer 1 at layer 0
        target = layer + 1
        if not FULL_LAYERS <= target < self.num_layers:
            return
        if self.switches.fixed_selection:
            self._gather(target, self.fixed_positions[target], self.fixed_counts[target], _record(self._compute()))
        elif self.switches.on_main_stream:
            self._speculate_and_gather(target, kwargs["hidden_states"], *kwargs["position_embeddings"], None)
        else:
            # The side stream reads copies: what the compute stream allocates it may reuse. The
            # hidden state alternates by parity (layer t+2 overwrites it once layer t+1's
            # attention waited for this speculation); cos and sin are the same in every layer.
            hidden = self._input(f"hidden{target % 2}", kwargs["hidden_states"])
            if target == FULL_LAYERS or "cos" not in self.inputs:
                self._input("cos", kwargs["position_embeddings"][0])
                self._input("sin", kwargs["position_embeddings"][1])
            self._speculate_and_gather(target, hidden, self.inputs["cos"], self.inputs["sin"], self.spec_stream)

    def _compute(self) -> Any:
        return torch.cuda.current_stream(self.runner.device) if self.cuda else None

    def _input(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` copied (on the compute stream) into a fixed buffer the side stream reads."""
        buffer = self.inputs.get(name)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = self.inputs[name] = torch.empty_like(value)
        buffer.copy_(value)
        return buffer

    def _speculate_and_gather(self, target: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              stream: Any) -> None:
        """Speculation on `stream` (None: the compute stream), stamped and logged, then the gather."""
        step, parity = self._step(), target % 2
        ready = _record(self._compute()) if stream is not None else None
        with _on(stream):
            if ready is not None:
                stream.wait_event(ready)
            self.log.stamp(step, self._column(target, SPEC_START))
            self.speculate(target, hidden, cos, sin)
            self.log.value(step, self._column(target, COUNT), self.counts[parity])
            if self.positions_log is not None:
                self.positions_log_device[:, target].index_copy_(0, step, self.positions[parity].unsqueeze(0))
            self.log.stamp(step, self._column(target, SPEC_END))
            selected = _record(stream if stream is not None else self._compute())
        self._gather(target, self.positions[parity], self.counts[parity], selected)

    def _gather(self, target: int, positions: torch.Tensor, count: torch.Tensor, after: Any) -> None:
        """The first `count` selected rows of every head into the layer's buffer, on the copy stream."""
        step = self._step()
        keys, values = self.rows[target % 2]
        with _on(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            self.log.stamp(step, self._column(target, 0))
            gather_rows(self.host.device_keys[target], self.host.device_values[target], positions, count, keys, values)
            self.log.stamp(step, self._column(target, 1))
            self._fetched[target] = _record(self.copy_stream)
            if self.switches.fixed_selection:  # the count, for the events (after the event: not waited for)
                self.log.value(step, self._column(target, COUNT), count)

    def speculate(self, target: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Layer `target`'s selection from the previous layer's attention input `hidden` (the new
        token's, ``[batch, 1, hidden]``) into `positions` and `counts` of the target's parity, on the
        current stream: its query (W_q, RoPE; skewed, cut to the partial columns), scored against
        its partial key cache, and `select_within_cap`'s rule."""
        parity = target % 2
        if self.fused:
            partial = self._partial_query(target, hidden, cos, sin)
            try:
                select_fused(partial, self.partial_keys[target], self.access.scaling(target), self.settings.alpha,
                             self.cap, self.slot, self.scratch, self.row_counts, self.positions[parity],
                             self.counts[parity])
                return
            except Exception:  # noqa: BLE001 - not buildable here (found in the eager warm-up): the torch path
                if torch.cuda.is_current_stream_capturing():
                    raise
                self.fused = self.fused_query = False
        query = self.access.query(target, hidden, (cos, sin))[:, :, -1]
        scores = speculative_scores(query, self.partial_skew[target], self.partial_keys[target],
                                    self.access.scaling(target))
        scores += self.held_mask
        positions, count = select_within_cap(scores, self.settings.alpha, self.cap, self.slot)
        self.positions[parity].copy_(positions)
        self.counts[parity].copy_(count)

    def _partial_query(self, target: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``[batch, kv_heads, group, partial]``: with `fused_query`, RoPE in one kernel and the skew
        as one bmm (checked bit for bit against torch's ops at the first eager call; a difference
        or a failure turns it off); else the query's torch ops and `speculative_scores`' einsum."""
        if self.fused_query:
            try:
                attention = self.access.modules[target]
                fused = partial_query(rotate_query(attention.q_proj(hidden), cos, sin, self.kv_heads, self.rotated),
                                      self.partial_skew[target], self.partial_queries, hidden.shape[0])
                if self.query_checked or torch.cuda.is_current_stream_capturing():
                    return fused
                self.query_checked = True
                reference = self._torch_partial_query(target, hidden, cos, sin)
                if torch.equal(fused, reference):
                    return fused
                self.fused_query_error = "differs from torch's RoPE and einsum"
            except Exception as exc:  # noqa: BLE001
                if torch.cuda.is_current_stream_capturing():
                    raise
                self.fused_query_error = f"{type(exc).__name__}: {exc}"
            self.fused_query = False
        return self._torch_partial_query(target, hidden, cos, sin)

    def _torch_partial_query(self, target: int, hidden: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor) -> torch.Tensor:
        query = self.access.query(target, hidden, (cos, sin))[:, :, -1]
        batch, query_heads, dim = query.shape
        grouped = query.view(batch, self.kv_heads, query_heads // self.kv_heads, dim)
        return torch.einsum("bkgd,kdc->bkgc", grouped, self.partial_skew[target]).contiguous()

    # --- the ablation: a selection fixed once ---------------------------------------------------------

    def _prompt_input_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not self.decoding:  # the prompt's last token (the last chunk's is the prompt's)
                cos, sin = kwargs["position_embeddings"]
                self.prompt_inputs[layer] = tuple(t[:, -1:].clone() for t in (kwargs["hidden_states"], cos, sin))
        return hook

    def start_decode(self, batch: Batch) -> None:
        super().start_decode(batch)
        if not self.switches.fixed_selection:
            return
        for target in self.speculated:
            self.speculate(target, *self.prompt_inputs[target - 1])
            self.fixed_positions[target].copy_(self.positions[target % 2])
            self.fixed_counts[target].copy_(self.counts[target % 2])

    def finish_batch(self, batch: Batch, cache: Any) -> None:
        if self.switches.probe is not None:
            self.switches.probe(self)
        super().finish_batch(batch, cache)

    def attend_decode(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scaling: float) -> torch.Tensor:
        if layer < FULL_LAYERS:
            return super().attend_decode(layer, query, keys, values, scaling)
        parity = layer % 2
        count = self.fixed_counts[layer] if self.switches.fixed_selection else self.counts[parity]
        self._wait_fetched(layer)
        rows_keys, rows_values = self.rows[parity]
        rows_keys[:, :, self.cap:].copy_(keys)
        rows_values[:, :, self.cap:].copy_(values)
        self.host.store_at(layer, self.slot, keys, values)
        partial = torch.einsum("bknd,kdc->bknc", keys, self.partial_skew[layer])
        self.partial_keys[layer].index_copy_(2, self.slot, partial)
        visible = self.row_ids < count                         # selected rows and the new token
        mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
        return decode_attention(query, rows_keys, rows_values, mask.view(1, 1, 1, -1), scaling)

    # --- events ------------------------------------------------------------------------------------

    def layer_fetch(self, layer: int, row: list[int], at: Any, held: int) -> dict[str, Any]:
        if layer < FULL_LAYERS:
            return super().layer_fetch(layer, row, at, held)
        count = row[self._column(layer, COUNT)]
        start, end = at(row[self._column(layer, 0)]), at(row[self._column(layer, 1)])
        positions = None
        if self.positions_log is not None:
            positions = self.positions_log[self._current_step, layer][..., :count]
        return {"layer": layer, "start": start, "end": end, "tokens": count, "bytes": count * self.host.token_bytes,
                "ext": {"copy_ns": float(end - start), "speculated": 1.0, "selected_tokens": float(count),
                        "stored_tokens": float(held), "max_num_kv": float(self.cap)},
                "positions": positions}

    def emit_step(self, batch: Batch, step: int, row: list[int], at: Any, held: int, start_ns: int,
                  end_ns: int) -> None:
        self._current_step = step
        super().emit_step(batch, step, row, at, held, start_ns, end_ns)
        profiler, detail = self.runner.profiler, self.runner.detail
        spans = []
        for layer in self.speculated:
            count = row[self._column(layer, COUNT)]
            spans.append((at(row[self._column(layer, SPEC_START)]), at(row[self._column(layer, SPEC_END)]), layer,
                          count))
        # On the side stream the spans overlap the step's own work: they are reported beside its
        # split (what speculation costs the step shows as the wait for its gather, kv_transfer).
        beside = {"overlapped": 1.0} if self.speculates_beside else {}
        if detail != "step":
            for start, end, layer, count in spans:
                profiler.emit_phase(Phase.SPECULATION.value, start, end, step=step, layer=layer, batch_size=batch.size,
                                    tokens=count, ext={"selected_tokens": float(count), **beside})
            return
        first = min(s for s, _, _, _ in spans)
        total = sum(e - s for s, e, _, _ in spans)
        profiler.emit_phase(Phase.SPECULATION.value, first, first + total, step=step, batch_size=batch.size,
                            tokens=sum(c for _, _, _, c in spans), ext={"spans": float(len(spans)), **beside})

    @property
    def speculates_beside(self) -> bool:
        """Whether speculation runs on the side stream, overlapped with the compute stream (CUDA)."""
        return self.spec_stream is not None and not (self.switches.on_main_stream or self.switches.fixed_selection)

    # --- memory ------------------------------------------------------------------------------------

    def device_kv_bytes(self) -> int:
        return super().device_kv_bytes() + sum(k.nbytes + v.nbytes for k, v in self.rows)

    def kv_bytes(self, cache: Any) -> KVBytes:
        """Aux: the partial key cache (slots filled, speculated layers) and the partial skews."""
        result = super().kv_bytes(cache)
        element = self.partial_keys.element_size()
        per_slot = self.batch_size * self.kv_heads * self.partial_width * element
        result.aux_device = len(self.speculated) * (self.runner.filled_slots * per_slot
                                                    + self.kv_heads * self.head_dim * self.partial_width * element)
        return result
