"""An independent timing of kvprof's fast engine: the same model and static cache, driven by a
plain loop that imports nothing of kvprof's profiler, runner or clock, timed only with CUDA events.

`benchmarks/engine_gpu.py` runs it beside `kvprof`'s own figures for the same settings, in one
process; kvprof's ITL and TTFT should agree with it within 3 %. What it shares with kvprof is
only the cache and attention code under test (`kvprof_transformers.static_cache`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from kvprof_transformers.static_cache import StaticKV, decode_attention, install, prefill_attention, uninstall


class _PlainStaticCache:
    """The least a loop needs to drive the model over a `StaticKV`: the attention call."""

    def __init__(self, kv: StaticKV) -> None:
        self.kv = kv
        self.decoding = False
        self.filled = 0
        self.slot = torch.zeros(1, dtype=torch.long, device=kv.mask.device)

    def attend(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> torch.Tensor:
        kv = self.kv
        if self.decoding:
            kv.write_at(layer, self.slot, keys, values)
            return decode_attention(query, kv.keys[layer], kv.values[layer], kv.mask, scaling)
        end = keys.shape[-2]
        kv.write(layer, 0, keys, values)
        return prefill_attention(query, kv.keys[layer][:, :, :end], kv.values[layer][:, :, :end], scaling, None, 0)


class _Passthrough:
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # noqa: ANN001
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


@dataclass
class HarnessResult:
    ttft_ms: list[float]
    step_ms: list[float]       # every decode step of every round after the first

    @property
    def ttft_median_ms(self) -> float:
        return statistics.median(self.ttft_ms)

    @property
    def step_median_ms(self) -> float:
        return statistics.median(self.step_ms)


def run_harness(model, prompts: torch.Tensor, new_tokens: int, rounds: int = 3) -> HarnessResult:  # noqa: ANN001
    """Greedy generation of `new_tokens` for `prompts` (B, L) of equal length, `rounds` times.

    Prefill: CUDA events around the forward and the argmax (TTFT, no queueing). Decode: one
    CUDA graph of a step, each replay between two CUDA events. Round 1 is a warm-up.
    """
    batch, length = prompts.shape
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = StaticKV(text.num_hidden_layers, batch, text.num_key_value_heads, length + new_tokens, head_dim,
                  next(model.parameters()).dtype, prompts.device)
    cache = _PlainStaticCache(kv)
    previous = install(model, cache)
    ids = torch.zeros((batch, 1), dtype=torch.long, device=prompts.device)
    positions = torch.zeros((batch, 1), dtype=torch.long, device=prompts.device)

    def step() -> None:
        kv.open_slot(cache.slot)
        logits = model(input_ids=ids, position_ids=positions, past_key_values=_Passthrough(),
                       use_cache=True, logits_to_keep=1).logits
        ids.copy_(logits[:, -1].argmax(-1)[:, None])
        positions.add_(1)
        cache.slot.add_(1)

    graph = torch.cuda.CUDAGraph()
    ttft: list[float] = []
    steps: list[float] = []
    try:
        with torch.inference_mode():
            for round_index in range(rounds + 1):
                kv.reset()
                cache.decoding, cache.filled = False, 0
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                prompt_positions = torch.arange(length, device=prompts.device)[None].expand(batch, -1)
                logits = model(input_ids=prompts, position_ids=prompt_positions,
                               past_key_values=_Passthrough(), use_cache=True, logits_to_keep=1).logits
                ids.copy_(logits[:, -1].argmax(-1)[:, None])
                end.record()
                kv.mask[:, :, :, :length] = 0
                cache.decoding = True
                cache.slot.fill_(length)
                positions.fill_(length)
                if round_index == 0:  # capture once, after an eager warm-up step
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        step()
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(graph):
                        step()
                    cache.slot.fill_(length)
                    positions.fill_(length)
                    kv.mask[:, :, :, length:] = float("-inf")
                events = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens)]
                events[0].record()
                for i in range(1, new_tokens):
                    graph.replay()
                    events[i].record()
                torch.cuda.synchronize()
                if round_index > 0:
                    ttft.append(start.elapsed_time(end))
                    steps.extend(events[i - 1].elapsed_time(events[i]) for i in range(1, new_tokens))
    finally:
        uninstall(model, previous)
    return HarnessResult(ttft, steps)
