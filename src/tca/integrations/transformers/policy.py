"""The cache policy (DESIGN 2.3-2.4): what a compressed-cache layer stores after a prefill, how a
decode step appends and attends, how a new turn without history attends, and when a block that has
left the window is cut to its head's budget. Storage itself is ``cache.HeadStore``.
"""

from __future__ import annotations

import torch

from ... import ops
from ...core.config import TCAConfig
from .cache import HeadStore, TCACacheLayer, valid_first
from .registration import row_starts


class CachePolicy:
    """Store, decode, new turn and compress for one run (``decode_keep[layer][kv_head]``: tokens
    a block keeps when it leaves the window)."""

    def __init__(self, config: TCAConfig, group: int, decode_keep: list[list[int]]):
        self.config, self.group, self.decode_keep = config, group, decode_keep

    def store(self, layer: TCACacheLayer, key, value, selection, key_start) -> None:
        """Fill the layer's cache with each head's kept tokens plus the window (true positions)."""
        batch, n_kv, context_len, _ = key.shape
        window = self.config.effective_window
        first = row_starts(key_start, batch, key.device)
        recent = torch.arange(max(context_len - window, 0), context_len, device=key.device)  # (W,)
        recent_valid = recent.view(1, -1) >= first.view(-1, 1)  # (B, W): not left padding
        columns = torch.arange(selection.indices.shape[-1], device=key.device).view(1, -1)
        layer.heads = []
        for g in range(n_kv):
            kept_valid = columns < selection.counts[:, g].view(-1, 1).to(key.device)  # (B, K)
            indices = torch.cat([selection.indices[:, g].to(key.device), recent.expand(batch, -1)], 1)
            valid = torch.cat([kept_valid, recent_valid], 1)  # (B, K + W)
            compact = valid_first(valid)
            indices = torch.gather(indices, 1, compact).masked_fill(
                ~torch.gather(valid, 1, compact), context_len
            )
            lengths = valid.sum(-1)
            indices = indices[:, : int(lengths.max())]
            layer.heads.append(HeadStore.gather(key[:, g], value[:, g], indices, lengths))
        # per row: a left-padded row's blocks start at its own first valid token, as when it runs alone
        layer.boundary = first.clamp_min(max(context_len - window, 0)).tolist()

    def decode(self, layer: TCACacheLayer, query, key, value, scale) -> torch.Tensor:
        """One new token: append it to every head, attend over each head's entries. (B, H, 1, d)."""
        outs = []
        for g, head in enumerate(layer.heads):
            head.extend(key[:, g], value[:, g], layer.seen)
            q = query[:, g * self.group : (g + 1) * self.group]
            outs.append(ops.decode(q, head.keys[:, None], head.values[:, None], head.lengths[:, None], scale))
        layer.remember(key, value)
        return torch.cat(outs, dim=1)

    def attend_new_turn(self, layer: TCACacheLayer, query, key, value, scale) -> torch.Tensor:
        """New tokens (no history kept): attend to each head's stored entries plus, causally, each
        other, then append them. (B, H, n, d)."""
        outs = []
        for g, head in enumerate(layer.heads):
            q = query[:, g * self.group : (g + 1) * self.group]
            outs.append(
                ops.attend_after_cache(q, head.keys, head.values, head.lengths, key[:, g], value[:, g], scale)
            )
            head.extend(key[:, g], value[:, g], layer.seen)
        return torch.cat(outs, dim=1)

    def compress(self, layer: TCACacheLayer, layer_idx: int, query, scale) -> None:
        """Cut every block that has left the window to its head's budget (DESIGN 2.4); rows whose
        next block starts at the same position are cut together."""
        block, window = self.config.block_size, self.config.effective_window
        while True:
            due = [row for row, start in enumerate(layer.boundary) if layer.seen - window - start >= block]
            if not due:
                return
            start = min(layer.boundary[row] for row in due)
            rows = [row for row in due if layer.boundary[row] == start]
            for g, head in enumerate(layer.heads):
                keep = self.decode_keep[layer_idx][g]
                if keep < block:
                    q = query[:, g * self.group : (g + 1) * self.group, -1]
                    head.compress_block(
                        start, block, keep, q, scale, rows=None if len(rows) == len(layer.boundary) else rows
                    )
            for row in rows:
                layer.boundary[row] = start + block
