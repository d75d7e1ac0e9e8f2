"""Ragged storage of one compressed-cache layer (DESIGN 2.3): each KV head stores only what it
keeps, at its true length.

All KV heads of a layer share one buffer (``LayerStore``): head ``g``'s entries of row ``b`` lie
at slots ``[offset_g, offset_g + lengths[b, g])`` of (B, S, d) keys and values, each head with its
own capacity, so a head keeping 5% takes 5% of the memory whatever its neighbours keep (nothing is
padded to the longest head). After prefill a head holds its selected tokens plus the window, at
their true positions (keys are stored after RoPE). Decode appends one token per head with a fixed
handful of device ops; each time ``block_size`` tokens have left the window, that block is cut to
the head's budget by the current query's importance (``policy``).

Lengths live on the device (for the kernels) and, exactly mirrored, on the host: every change is
known in advance (a decode step adds one entry per head; a cut removes ``block - keep``), so
the host never waits for the GPU to know how much room a head needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import ops
from ...core.transfer import to_device


def valid_first(valid: torch.Tensor) -> torch.Tensor:
    """Per row, the column order that puts the ``valid`` (..., N) columns first, each part in order."""
    return torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)


@dataclass
class HeadView:
    """One KV head's part of a ``LayerStore`` (views, no copy): keys/values (B, capacity, d),
    positions (B, capacity), lengths (B,): row b's entries are the first ``lengths[b]``."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor


class LayerStore:
    """Keys/values of every KV head of one layer in one ragged buffer (see the module docstring).

    Attributes:
        keys, values: (B, S, d); positions: (B, S) int64 (a slot past a head's length is garbage).
        offsets: G host ints, head g's first slot; capacity: G host ints, its slots.
        lengths: (B, G) int32 on the device (the decode kernels update it in place);
        bound_host: (B, G) numpy, an upper bound of ``lengths`` kept on the host (exact when the
            store was made from host lengths; every later change is applied to both).
    """

    def __init__(
        self, keys, values, positions, offsets, capacity, bound_host, lengths=None, offsets_device=None
    ):
        self.keys, self.values, self.positions = keys, values, positions
        self.offsets, self.capacity = offsets, capacity
        self.bound_host = np.array(bound_host, dtype=np.int64)  # (B, G), a copy
        if lengths is None:
            lengths = to_device(self.bound_host, torch.int32, keys.device)
        self.lengths = lengths.to(device=keys.device, dtype=torch.int32)
        if offsets_device is None:
            offsets_device = to_device(offsets, torch.int64, keys.device)
        self.offsets_device = offsets_device  # (G,) int64: ``offsets`` on the device
        self.rows = torch.arange(keys.shape[0], device=keys.device).view(-1, 1, 1)
        self._measure_room()

    def _measure_room(self) -> None:
        """``spare``: the entries every (row, head) can still take (host); ``widest``: max capacity."""
        self.spare = int((np.asarray(self.capacity) - self.bound_host.max(0, initial=0)).min())
        self.widest = max(self.capacity)

    @classmethod
    def from_entries(
        cls, key, value, kept, counts, window_start, bound_host, reserve: int, lengths=None
    ) -> LayerStore:
        """Each (row, head)'s kept tokens, then the window from ``window_start`` to the end, every head
        in one gather (``ops.gather_entries``: one launch with the Triton kernels).

        Args:
            key, value: (B, G, L, d); kept: (B, G, K) ascending kept positions (past a head's count:
                any); counts: (B, G); window_start: an int or a (B,) tensor; bound_host: (B, G) numpy
                upper bound of the lengths (the lengths themselves when ``lengths``, a (B, G) device
                tensor, is None); reserve: extra slots per head.
        """
        n_kv = key.shape[1]
        capacity = [int(bound_host[:, g].max(initial=0)) + reserve for g in range(n_kv)]
        offsets = np.concatenate([[0], np.cumsum(capacity)[:-1]]).tolist()
        layout = to_device(np.array([capacity, offsets]), torch.int64, key.device)  # (2, G)
        heads = torch.repeat_interleave(  # (S,): each slot's head, and its column there
            torch.arange(n_kv, device=key.device), layout[0], output_size=sum(capacity)
        )
        columns = torch.arange(len(heads), device=key.device) - layout[1, heads]
        keys, values, positions = ops.gather_entries(key, value, kept, counts, window_start, heads, columns)
        return cls(keys, values, positions, offsets, capacity, bound_host, lengths, offsets_device=layout[1])

    @property
    def n_kv(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def head(self, g: int) -> HeadView:
        """Views of head ``g``'s slots."""
        lo, hi = self.offsets[g], self.offsets[g] + self.capacity[g]
        return HeadView(
            self.keys[:, lo:hi], self.values[:, lo:hi], self.positions[:, lo:hi], self.lengths[:, g]
        )

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's slots side by side: (B, G, widest, d) keys and values (copies), head g's valid
        up to ``lengths[:, g]``; past its capacity a head's columns hold whatever follows it."""
        columns = torch.arange(self.widest, device=self.keys.device)
        slots = (self.offsets_device.view(-1, 1) + columns).clamp_max(self.keys.shape[1] - 1)  # (G, widest)
        return self.keys[:, slots], self.values[:, slots]

    def _make_room(self, n: int) -> bool:
        """Grow first if some head cannot take ``n`` more entries (known on the host: no sync).
        Whether it grew (new buffers)."""
        if n <= self.spare:
            return False
        self._grow(self.bound_host.max(0) + n)
        return True

    def decode_step(self, query, key, value, position: int, scale: float) -> torch.Tensor:
        """Append one token per (row, head) (key, value (B, G, 1, d)) and attend over every head's
        entries with ``query`` (B, H, 1, d): ``reserve`` then ``attend_appending``."""
        self.reserve(1)
        return self.attend_appending(query, key, value, position, scale)

    def reserve(self, n: int) -> bool:
        """The host side of appending ``n`` entries to every (row, head): room (growing first when
        some head has too little) and the host bound. Whether the store grew (new buffers: a CUDA
        graph's step, which calls this before replaying, must be captured again)."""
        grew = self._make_room(n)
        self.bound_host += n
        self.spare -= n
        return grew

    def attend_appending(self, query, key, value, position, scale: float) -> torch.Tensor:
        """The device side of a decode step (``reserve`` done): the two launches of
        ``ops.decode_ragged_append``. ``position``: a host int, or a one-element int64 device tensor
        (a CUDA graph replays the step with each position). (B, H, 1, d)."""
        return ops.decode_ragged_append(
            query, key, value, self.keys, self.values, self.positions, self.lengths, self.offsets_device,
            self.widest, position, scale,
        )  # fmt: skip

    def append(self, key: torch.Tensor, value: torch.Tensor, first_position: int) -> None:
        """Write n tokens per (row, head) after each one's last entry: key, value (B, G, n, d).

        A fixed number of device ops and no synchronisation (the room needed is known on the host).
        """
        n = key.shape[2]
        self.reserve(n)
        steps = torch.arange(n, device=key.device)
        slots = (self.offsets_device.view(1, -1, 1) + self.lengths.unsqueeze(-1)) + steps  # (B, G, n)
        self.keys.index_put_((self.rows, slots), key)
        self.values.index_put_((self.rows, slots), value)
        self.positions.index_put_((self.rows, slots), (steps + first_position).expand_as(slots))
        self.lengths += n

    def _grow(self, needed: np.ndarray) -> None:
        """Reallocate with room for ``needed`` (G,) entries per head and an eighth more (amortised)."""
        capacity = [
            max(cap, int(need) + max(16, int(need) // 8))
            for cap, need in zip(self.capacity, needed, strict=True)
        ]
        grown = LayerStore.empty_like(self, capacity)
        for g in range(self.n_kv):
            old, new = self.head(g), grown.head(g)
            width = self.capacity[g]
            new.keys[:, :width] = old.keys
            new.values[:, :width] = old.values
            new.positions[:, :width] = old.positions
        self.keys, self.values, self.positions = grown.keys, grown.values, grown.positions
        self.offsets, self.capacity, self.offsets_device = grown.offsets, grown.capacity, grown.offsets_device
        self._measure_room()

    @staticmethod
    def empty_like(store: LayerStore, capacity: list[int]) -> LayerStore:
        batch, _, dim = store.keys.shape
        offsets = np.concatenate([[0], np.cumsum(capacity)[:-1]]).tolist()
        total = sum(capacity)
        keys = store.keys.new_zeros(batch, total, dim)
        positions = torch.full((batch, total), -1, dtype=torch.int64, device=store.keys.device)
        return LayerStore(
            keys, torch.zeros_like(keys), positions, offsets, capacity, store.bound_host, store.lengths
        )

    def region(self, tail: int) -> torch.Tensor:
        """(B, G, tail) slots of each (row, head)'s last ``tail`` entries (device arithmetic only)."""
        steps = torch.arange(tail, device=self.keys.device)
        base = self.offsets_device.view(1, -1) + self.lengths - tail  # (B, G)
        return base.unsqueeze(-1) + steps

    def cut_block(
        self, tail: int, block: int, keep: torch.Tensor, keep_host: np.ndarray, query, scale
    ) -> None:
        """Cut the first ``block`` of each (row, head)'s last ``tail`` entries to its ``keep`` most
        important for ``query`` (B, G, group, d) (softmax within the block, averaged over the group;
        ties: the lower position), moving the rest of the tail down. No synchronisation.

        Args:
            keep: (B, G) int64 device, entries kept per (row, head) (``block``: uncut);
            keep_host: the same on the host.
        """
        batch, _, dim = self.keys.shape
        slots = self.region(tail).clamp_min(0)  # (B, G, T); a row with no such block is masked by keep
        flat = slots.flatten(1)  # (B, G*T)
        keys = torch.gather(self.keys, 1, flat.unsqueeze(-1).expand(-1, -1, dim)).view(
            batch, self.n_kv, tail, dim
        )
        logits = torch.einsum("bgqd,bgtd->bgqt", query.float(), keys[:, :, :block].float()) * scale
        importance = torch.softmax(logits, -1).mean(2)  # (B, G, block)
        order = torch.argsort(importance, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(block, device=order.device).expand_as(order)
        )
        kept = torch.cat(
            [rank < keep.unsqueeze(-1), rank.new_ones(batch, self.n_kv, tail - block, dtype=torch.bool)], -1
        )
        source = torch.gather(slots, -1, valid_first(kept)).flatten(1)  # the survivors, in order, first
        for tensor in (self.keys, self.values):
            moved = torch.gather(tensor, 1, source.unsqueeze(-1).expand(-1, -1, dim))
            tensor.scatter_(1, flat.unsqueeze(-1).expand(-1, -1, dim), moved)
        self.positions.scatter_(1, flat, torch.gather(self.positions, 1, source))
        self.lengths -= block - keep
        self.bound_host -= block - keep_host
        self._measure_room()
