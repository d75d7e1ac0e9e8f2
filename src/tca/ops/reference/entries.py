"""What a compressed-cache layer stores after a prefill, gathered for every head at once (DESIGN 2.3).

Each (row, KV head) stores its kept tokens, then the window: ``entries(b, g)`` is
``kept[b, g, :counts[b, g]]`` followed by ``window_start[b] .. L-1``. The layer's buffer is one
ragged array of slots (``LayerStore``); slot ``s`` holds entry ``slot_columns[s]`` of head
``slot_heads[s]``, or nothing when that head has fewer entries (the room kept for decode).
"""

from __future__ import annotations

import torch


def entry_positions(kept, counts, window_start, context_len: int, slot_heads, slot_columns) -> torch.Tensor:
    """(B, S) int64: the token position of every slot's entry, -1 where the slot holds none.

    Args:
        kept: (B, G, K) int64, each head's kept positions ascending (columns past its count: any);
        counts: (B, G) int64; window_start: an int or a (B,) int64 tensor, each row's first window
        position (the window runs to ``context_len - 1``); slot_heads, slot_columns: (S,) int64.
    """
    batch = kept.shape[0]
    column = slot_columns.view(1, -1)  # (1, S)
    count = counts[:, slot_heads]  # (B, S)
    start = window_start if isinstance(window_start, int) else window_start.view(-1, 1)
    window = start + (column - count)  # (B, S): the window's part
    positions = torch.where(window < context_len, window, -1)
    if kept.shape[-1]:
        rows = torch.arange(batch, device=kept.device).view(-1, 1)
        from_kept = kept[rows, slot_heads, column.clamp_max(kept.shape[-1] - 1)]  # (B, S)
        positions = torch.where(column < count, from_kept, positions)
    return positions


def gather_entries(key, value, kept, counts, window_start, slot_heads, slot_columns):
    """Every slot's keys, values and position (the module docstring).

    Args:
        key, value: (B, G, L, d); the rest as ``entry_positions``.
    Returns:
        keys, values: (B, S, d) (zeros where a slot holds no entry); positions: (B, S) int64 (-1 there).
    """
    positions = entry_positions(kept, counts, window_start, key.shape[2], slot_heads, slot_columns)
    empty = (positions < 0).unsqueeze(-1)  # (B, S, 1)
    rows = torch.arange(key.shape[0], device=key.device).view(-1, 1)
    source = positions.clamp_min(0)
    keys = key[rows, slot_heads, source].masked_fill_(empty, 0)
    values = value[rows, slot_heads, source].masked_fill_(empty, 0)
    return keys, values, positions
