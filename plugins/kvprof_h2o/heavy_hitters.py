"""H2O's eviction rule on tensors: which cache slots each (sequence, KV head) keeps.

A layer's cache is a dense (B, H, S, D) tensor. Beside it the policy keeps, per slot, the true
position of the token in it (-1: an empty slot) and the attention the token accumulated. The rule
is the authors' real-drop code (FMInference/H2O `H2OKVCache_LayerWise.__call__`): keep the
`recent` most recent tokens and, among the others, the `heavy` ones with the largest score.

Every (sequence, KV head) chooses its own tokens, so heads differ, but each keeps the same number
of them; sequences of a batch may have different budgets, and the dense tensor is as long as the
largest: the other sequences' extra slots are empty (and masked by position). Slots are not kept
in position order: attention masks by position, so order does not matter, and not sorting saves
work on every decode step.
"""

from __future__ import annotations

import torch


def select_slots(positions: torch.Tensor, scores: torch.Tensor, heavy: torch.Tensor, recent: torch.Tensor,
                 new_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots to keep, per (sequence, KV head).

    positions, scores: (B, H, S). heavy, recent: (B,) budgets in tokens. `new_len` >= every
    row's kept count, min(valid slots, heavy + recent). Returns `slots` (B, H, new_len), the
    slot indices to gather, and `kept` (B, H, new_len), False where the gathered slot is filler
    and becomes empty. Slot order carries no meaning (attention masks by position), so the
    kept slots come in rank order: recent first, then by score.
    """
    valid = positions >= 0
    # The newest `recent` positions are always cached (a token is never evicted while it is
    # recent), so "recent" is a position threshold; it holds whatever order the slots are in.
    newest = positions.amax(dim=-1, keepdim=True)
    is_recent = valid & (positions > newest - recent[:, None, None])
    priority = scores.float().masked_fill(~valid, float("-inf")).masked_fill(is_recent, float("inf"))
    slots = priority.topk(new_len, dim=-1).indices  # recent first, then by score, empty last
    kept_count = torch.minimum(valid.sum(-1, keepdim=True), (heavy + recent)[:, None, None])
    kept = torch.arange(new_len, device=positions.device) < kept_count
    return slots, kept


def gather_slots(tensor: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`tensor` (B, H, S, D) reduced to `slots` (B, H, S'): a new, smaller tensor."""
    return tensor.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def dropped_positions(positions: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor, most: int) -> torch.Tensor:
    """Positions of the tokens that `select_slots` dropped: (B, H, most), -1 padded.

    `most` is the largest number of tokens any (sequence, head) dropped; computing it on the host
    keeps the shapes static (no device-to-host sync here).
    """
    valid = positions >= 0
    kept_mask = torch.zeros_like(valid).scatter_(-1, slots, kept)
    dropped = torch.where(valid & ~kept_mask, positions, torch.full_like(positions, -1))
    return dropped.topk(most, dim=-1).values
