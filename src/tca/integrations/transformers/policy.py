"""The cache policy (DESIGN 2.3-2.4): what a compressed-cache layer stores after a prefill, how a
decode step appends and attends, how a new turn without history attends, and when a block that has
left the window is cut to its head's budget. Storage itself is ``store.LayerStore``.

Decode and compression run on the device with no host synchronisation: lengths are mirrored on
the host exactly (``LayerStore``), so every shape is known without asking the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import ops
from ...core.config import TCAConfig
from ...core.transfer import host_ints, to_device
from .cache import TCACacheLayer
from .registration import row_starts
from .store import LayerStore


class CachePolicy:
    """Store, decode, new turn and compress for one run (``decode_keep[layer][kv_head]``: tokens
    a block keeps when it leaves the window)."""

    def __init__(self, config: TCAConfig, group: int, decode_keep: list[list[int]]):
        self.config, self.group = config, group
        self.decode_keep = np.minimum(
            np.asarray(decode_keep, dtype=np.int64), config.block_size
        )  # (layers, G)
        self._keep_device: dict[tuple, torch.Tensor] = {}
        self._never_cut = (self.decode_keep >= config.block_size).all(1)  # (layers,): every head keeps all

    def store(self, layer: TCACacheLayer, key, value, selection, key_start) -> None:
        """Fill the layer's cache with each head's kept tokens plus the window (true positions).

        key, value: (B, G, L, d); no synchronisation when the selection bounds its heads and no row
        is padded (otherwise the host reads the kept counts or the padding once).
        """
        batch, context_len = key.shape[0], key.shape[2]
        window = self.config.effective_window
        counts = selection.counts.to(key.device)  # (B, G)
        first = max(context_len - window, 0)  # each row's first window position (left padding: later)
        if key_start is not None:
            first = row_starts(key_start, batch, key.device).clamp_min(first)  # (B,)
        lengths = counts + (context_len - (first if isinstance(first, int) else first.view(-1, 1)))
        bound = self._host_bound(selection, lengths, key_start, context_len)
        kept = selection.indices.to(key.device)
        reserve = self.config.block_size + 16
        layer.store = LayerStore.from_entries(key, value, kept, counts, first, bound, reserve, lengths)
        # per row: a left-padded row's blocks start at its own first valid token, as when it runs alone
        layer.boundary = [max(start, context_len - window, 0) for start in _host_starts(key_start, batch)]

    def _host_bound(self, selection, lengths, key_start, context_len: int) -> np.ndarray:
        """(B, G) host upper bound of the stored lengths: from the selection's per-head bounds and
        the window, with no synchronisation when those bounds are known and there is no padding."""
        if selection.head_bounds is None:
            return lengths.cpu().numpy()
        window = min(self.config.effective_window, context_len)
        starts = _host_starts(key_start, lengths.shape[0])
        recent = np.array([min(window, context_len - start) for start in starts]).reshape(-1, 1)
        return np.asarray(selection.head_bounds).reshape(1, -1) + recent

    def decode(self, layer: TCACacheLayer, query, key, value, scale) -> torch.Tensor:
        """One new token: append it to every head, attend over each head's entries. (B, H, 1, d)."""
        layer.remember(key, value)
        return layer.store.decode_step(query, key, value, layer.seen, scale)

    def attend_new_turn(self, layer: TCACacheLayer, query, key, value, scale) -> torch.Tensor:
        """New tokens (no history kept): attend to each head's stored entries plus, causally, each
        other, then append them: every head in one call. (B, H, n, d)."""
        keys, values = layer.store.padded()  # (B, G, widest, d) each
        out = ops.attend_after_cache(query, keys, values, layer.store.lengths, key, value, scale)
        layer.store.append(key, value, layer.seen)
        return out

    def compress(self, layer: TCACacheLayer, layer_idx: int, query, scale) -> None:
        """Cut every block that has left the window to its head's budget (DESIGN 2.4); rows whose
        next block starts at the same position are cut together. No synchronisation."""
        block, window = self.config.block_size, self.config.effective_window
        if layer.store is None or self._never_cut[layer_idx]:  # nothing to cut in this layer
            return
        if layer.seen - window - min(layer.boundary) < block:  # no row has a block due (most steps)
            return
        keep = self.decode_keep[layer_idx]  # (G,)
        batch = len(layer.boundary)
        observed = query[:, :, -1].reshape(batch, len(keep), self.group, -1)  # (B, G, group, d)
        while True:
            due = [row for row, start in enumerate(layer.boundary) if layer.seen - window - start >= block]
            if not due:
                return
            start = min(layer.boundary[row] for row in due)
            rows = np.array([row in due and layer.boundary[row] == start for row in range(batch)])
            keep_host = np.where(rows[:, None], keep[None, :], block)  # (B, G)
            layer.store.cut_block(layer.seen - start, block, self._device(keep_host, query.device), keep_host,
                                  observed, scale)  # fmt: skip
            for row in np.flatnonzero(rows):
                layer.boundary[row] = start + block

    def _device(self, keep_host: np.ndarray, device: torch.device) -> torch.Tensor:
        """``keep_host`` on the device, made once per distinct table (no copy per compression)."""
        key = (keep_host.tobytes(), keep_host.shape, device)
        if key not in self._keep_device:
            self._keep_device[key] = to_device(keep_host, torch.int32, device)
        return self._keep_device[key]


def _host_starts(key_start: torch.Tensor | None, batch: int) -> tuple[int, ...]:
    """Each row's first valid key as host ints (no padding: zeros, and no synchronisation; padding:
    read once per prefill, ``host_ints``)."""
    return (0,) * batch if key_start is None else host_ints(key_start)
