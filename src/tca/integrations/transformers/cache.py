"""A compressed KV cache (DESIGN 2.3-2.4): each KV head stores only what it keeps, at its true length.

Per layer and KV head, the cache holds (B, capacity, d) keys and values and a (B,) length: after
prefill the selected tokens plus the window, with their true positions (keys are stored after
RoPE, so positions stay right). Decode appends; each time ``block_size`` tokens have left the
window, that block is cut to the head's budget by the current query's importance. Heads of one
layer have different lengths; nothing is padded to the longest head.

Multi-turn: with ``keep_history=True`` (default) every token's K/V is also kept on the host, and
a new turn (a prefill onto a non-empty cache) selects again from the whole history with the new
turn's last query, so a needle that turn 1 dropped can come back for turn 2. The cost is host
memory (dense) and one gather per layer per turn; ``host_kv_bytes`` reports it.

The attention itself is done by ``TCARun`` (``hf.py``): ``update`` only hands the new states
over; the run reads and writes the per-head storage through this class's methods.
"""

from __future__ import annotations

import math

import torch

from transformers.cache_utils import Cache, CacheLayerMixin

from ...core.budgets import rank_fractions


def valid_first(valid: torch.Tensor) -> torch.Tensor:
    """Per row, the column order that puts the ``valid`` (B, N) columns first, each part in order."""
    return torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)


class HeadStore:
    """Keys/values of one (layer, KV head): (B, capacity, d) with a (B,) valid length.

    ``max_length`` mirrors ``lengths.max()`` on the host, so appending a decode token needs no
    device synchronisation.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
    ):
        self.keys, self.values, self.positions, self.lengths = keys, values, positions, lengths
        self.max_length = int(lengths.max()) if lengths.numel() else 0

    @classmethod
    def gather(cls, key: torch.Tensor, value: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor):
        """Store ``key[b, indices[b, :lengths[b]]]`` (key, value: (B, L, d); indices (B, N) ascending)."""
        safe = indices.clamp_max(key.shape[1] - 1)
        expand = safe.unsqueeze(-1).expand(-1, -1, key.shape[-1])
        return cls(torch.gather(key, 1, expand), torch.gather(value, 1, expand), indices, lengths)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def extend(self, key: torch.Tensor, value: torch.Tensor, first_position: int) -> None:
        """Write n tokens per row (key, value: (B, n, d)) after each row's last entry."""
        batch, n, _ = key.shape
        needed = self.max_length + n - self.keys.shape[1]
        if needed > 0:
            self._grow(max(needed, 16, self.keys.shape[1] // 8))
        slots = self.lengths.view(-1, 1) + torch.arange(n, device=key.device).view(1, -1)  # (B, n)
        rows = torch.arange(batch, device=key.device).view(-1, 1)
        self.keys[rows, slots] = key
        self.values[rows, slots] = value
        self.positions[rows, slots] = first_position + torch.arange(n, device=key.device).view(1, -1)
        self.lengths += n
        self.max_length += n

    def _grow(self, extra: int) -> None:
        pad = (0, 0, 0, extra)
        self.keys = torch.nn.functional.pad(self.keys, pad)
        self.values = torch.nn.functional.pad(self.values, pad)
        self.positions = torch.nn.functional.pad(self.positions, (0, extra), value=-1)

    def compress_block(
        self, block_start: int, block: int, keep: int, query: torch.Tensor, scale: float, rows=None
    ) -> None:
        """Cut each row's entries at positions [block_start, block_start + block) to their ``keep``
        most important for ``query`` (B, group, d) (softmax within the block, averaged over the group;
        ties: the lower position). ``rows``: the rows to cut (None: all).

        All rows at once, with one device synchronisation; only the slots from the first row's block
        onwards (about a window's worth) are scored and moved, not the whole store."""
        batch, capacity = self.positions.shape
        device = self.keys.device
        valid = torch.arange(capacity, device=device).view(1, -1) < self.lengths.view(-1, 1)  # (B, capacity)
        chosen = torch.ones(batch, dtype=torch.bool, device=device)
        if rows is not None:
            chosen = torch.zeros_like(chosen)
            chosen[list(rows)] = True
        before = (valid & (self.positions < block_start)).sum(-1)  # (B,) entries ahead of the block
        in_block = ((valid & (self.positions < block_start + block)).sum(-1) - before) * chosen  # (B,)
        lengths = self.lengths - (in_block - keep).clamp_min(0)
        lo, new_max = torch.stack([before.min(), lengths.max()]).tolist()  # the one synchronisation
        hi, self.max_length = self.max_length, new_max
        if lo >= hi:
            return
        # the tail [lo, hi): slots before lo are ahead of the block in every row
        positions = self.positions[:, lo:hi]
        tail_valid = valid[:, lo:hi]
        tail_in = tail_valid & (positions >= block_start) & (positions < block_start + block)
        tail_in &= chosen.view(-1, 1)  # (B, T)
        logits = torch.einsum("bgd,btd->bgt", query.float(), self.keys[:, lo:hi].float()) * scale
        logits = logits.masked_fill(~tail_in.unsqueeze(1), float("-inf"))  # (B, group, T)
        importance = torch.softmax(logits, -1).mean(1).nan_to_num(0.0)  # (B, T); rows with no block: 0
        importance = importance.masked_fill(~tail_in, -1.0)  # out-of-block entries rank last
        order = torch.argsort(importance, dim=-1, descending=True, stable=True)
        slots = torch.arange(hi - lo, device=device).expand(batch, -1)
        rank = torch.empty_like(order).scatter_(1, order, slots)
        compact = valid_first(tail_valid & (~tail_in | (rank < keep)))  # (B, T)
        for tensor in (self.keys, self.values):
            tensor[:, lo:hi] = torch.gather(
                tensor[:, lo:hi], 1, compact.unsqueeze(-1).expand(-1, -1, tensor.shape[-1])
            )
        self.positions[:, lo:hi] = torch.gather(positions, 1, compact)
        self.lengths = lengths


class TCACacheLayer(CacheLayerMixin):
    """One layer of the compressed cache. ``update`` only passes the new states through."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keep_history: bool = True):
        super().__init__()
        self.keep_history = keep_history
        self.heads: list[HeadStore] = []
        self.seen = 0  # tokens processed (index space, padding included)
        # per row: positions >= boundary[row] are not compressed yet (the window and what just left it)
        self.boundary: list[int] = []
        self.pending = 0  # length of the states handed over by the last update
        self.history: tuple[torch.Tensor, torch.Tensor] | None = None  # host (B, G, seen, d) keys, values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Hand the new (B, G, n, d) states to the attention call unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.heads, self.seen, self.boundary, self.pending, self.history = [], 0, [], 0, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the TCA cache cannot be cropped (assisted decoding is not supported).")

    @property
    def nbytes(self) -> int:
        """Bytes the device cache of this layer holds."""
        return sum(head.nbytes for head in self.heads)

    @property
    def host_nbytes(self) -> int:
        """Bytes of the host history of this layer."""
        if self.history is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.history)

    def remember(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append (B, G, n, d) states to the host history (when kept)."""
        if not self.keep_history:
            return
        key, value = key.to("cpu", copy=True), value.to("cpu", copy=True)
        if self.history is None:
            self.history = (key, value)
        else:
            self.history = (torch.cat([self.history[0], key], 2), torch.cat([self.history[1], value], 2))


class TCACache(Cache):
    """The compressed cache for ``model.generate`` under ``tca.apply`` (one ``TCACacheLayer`` per layer)."""

    def __init__(self, n_layers: int, keep_history: bool = True):
        super().__init__(layers=[TCACacheLayer(keep_history) for _ in range(n_layers)])
        self.in_use = False  # True while it is the current cache of a live tca.apply run (TCARun.set_cache)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hand the new states to the TCA run; outside its run (dense attention would read only the
        new tokens) a clear error instead."""
        if not self.in_use:
            raise RuntimeError(
                "this TCACache is not in use by a tca.apply block (the block has ended, or another cache "
                "became the run's current one): pass it to model.generate inside `with tca.apply(model, "
                "profile):`, which makes it current, or start a new conversation without it."
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def kv_bytes(self) -> int:
        """Bytes the device cache holds over all layers (keys and values, allocated)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def host_kv_bytes(self) -> int:
        """Bytes of host history kept for multi-turn re-selection."""
        return sum(layer.host_nbytes for layer in self.layers)

    def dense_kv_bytes(self) -> int:
        """Bytes a dense cache would hold for the same tokens (every head, the batch's padding included)."""
        total = 0
        for layer in self.layers:
            if layer.heads:
                head = layer.heads[0]
                n_kv = len(layer.heads)
                total += (
                    2
                    * head.keys.shape[0]
                    * n_kv
                    * layer.seen
                    * head.keys.shape[-1]
                    * head.keys.element_size()
                )
        return total


def mean_keep_fraction(mu: float, sigma: float) -> float:
    """Fraction of a block a head keeps on average: E[min(X, 1)], X ~ LogNormal(ln mu, sigma)."""
    if math.isinf(mu):
        return 1.0
    return float(rank_fractions(torch.tensor(mu), torch.tensor(sigma), 1)[0])
