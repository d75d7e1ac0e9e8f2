"""A compressed KV cache (DESIGN 2.3-2.4): each KV head stores only what it keeps, at its true length.

Per layer, all KV heads share one ragged buffer (``LayerStore``): head ``g``'s entries of row
``b`` lie at slots ``[offset_g, offset_g + lengths[b, g])`` of (B, S, d) keys and values, each
head with its own capacity, so a head keeping 5% takes 5% of the memory whatever its neighbours
keep (nothing is padded to the longest head). After prefill a head holds its selected tokens plus
the window, at their true positions (keys are stored after RoPE). Decode appends one token per
head with a fixed handful of device ops; each time ``block_size`` tokens have left the window,
that block is cut to the head's budget by the current query's importance (``policy``).

Lengths live on the device (for the kernels) and, exactly mirrored, on the host: every change is
known in advance (a decode step adds one entry per head; a cut removes ``block - keep``), so
the host never waits for the GPU to know how much room a head needs.

Multi-turn: with ``keep_history=True`` (default) every token's K/V is also copied to the host
(``HostHistory``), off the critical path: into pinned memory on a side stream, a layer's prompt
once, decode tokens a block at a time, so a new turn can select again from the whole
conversation. The cost is host memory (dense); ``host_kv_bytes`` reports it.

The attention itself is done by ``TCARun`` (``run.py``) and ``CachePolicy`` (``policy.py``):
``update`` only hands the new states over.

On a model that mixes sliding-window and full-attention layers (Gemma 3) only the full layers are
TCA layers; each sliding layer is transformers' own ``DynamicSlidingWindowLayer``, the very layer a
dense ``generate`` would use, so those layers cache and attend exactly as without TCA.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ... import ops
from ...core.budgets import rank_fractions
from ...core.profile import model_fingerprint, text_config
from ...core.stats import BYTE_COUNTS


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

    def __init__(self, keys, values, positions, offsets, capacity, bound_host, lengths=None):
        self.keys, self.values, self.positions = keys, values, positions
        self.offsets, self.capacity = offsets, capacity
        self.bound_host = np.array(bound_host, dtype=np.int64)  # (B, G), a copy
        if lengths is None:
            lengths = torch.tensor(self.bound_host, device=keys.device)
        self.lengths = lengths.to(device=keys.device, dtype=torch.int32)
        self.offsets_device = torch.tensor(offsets, dtype=torch.int64, device=keys.device)
        self.rows = torch.arange(keys.shape[0], device=keys.device).view(-1, 1, 1)
        self._measure_room()

    def _measure_room(self) -> None:
        """``spare``: the entries every (row, head) can still take (host); ``widest``: max capacity."""
        self.spare = int((np.asarray(self.capacity) - self.bound_host.max(0, initial=0)).min())
        self.widest = max(self.capacity)

    @classmethod
    def gather(cls, key, value, indices, bound_host, reserve: int, lengths=None) -> LayerStore:
        """Store ``key[b, g, indices[g][b, :lengths[b, g]]]`` for every head.

        Args:
            key, value: (B, G, L, d); indices: G tensors (B, N_g) ascending (padding past the length
                may hold any index < L); bound_host: (B, G) numpy upper bound of the lengths (the
                lengths themselves when ``lengths``, a (B, G) device tensor, is None); reserve:
                extra slots per head.
        """
        batch, n_kv, _, dim = key.shape
        capacity = [int(bound_host[:, g].max(initial=0)) + reserve for g in range(n_kv)]
        offsets = np.concatenate([[0], np.cumsum(capacity)[:-1]]).tolist()
        total = sum(capacity)
        keys = key.new_zeros(batch, total, dim)
        values = value.new_zeros(batch, total, dim)
        positions = torch.full((batch, total), -1, dtype=torch.int64, device=key.device)
        for g, index in enumerate(indices):
            width = min(index.shape[1], capacity[g])
            index = index[:, :width]
            expand = index.unsqueeze(-1).expand(-1, -1, dim)
            lo = offsets[g]
            keys[:, lo : lo + width] = torch.gather(key[:, g], 1, expand)
            values[:, lo : lo + width] = torch.gather(value[:, g], 1, expand)
            positions[:, lo : lo + width] = index
        return cls(keys, values, positions, offsets, capacity, bound_host, lengths)

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

    def _make_room(self, n: int) -> None:
        """Grow first if some head cannot take ``n`` more entries (known on the host: no sync)."""
        if n > self.spare:
            self._grow(self.bound_host.max(0) + n)

    def decode_step(self, query, key, value, position: int, scale: float) -> torch.Tensor:
        """Append one token per (row, head) (key, value (B, G, 1, d)) and attend over every head's
        entries with ``query`` (B, H, 1, d): the two launches of ``ops.decode_ragged_append``."""
        self._make_room(1)
        self.bound_host += 1
        self.spare -= 1  # every (row, head) took one entry
        return ops.decode_ragged_append(
            query, key, value, self.keys, self.values, self.positions, self.lengths, self.offsets_device,
            self.widest, position, scale,
        )  # fmt: skip

    def append(self, key: torch.Tensor, value: torch.Tensor, first_position: int) -> None:
        """Write n tokens per (row, head) after each one's last entry: key, value (B, G, n, d).

        A fixed number of device ops and no synchronisation (the room needed is known on the host).
        """
        n = key.shape[2]
        self._make_room(n)
        steps = torch.arange(n, device=key.device)
        slots = (self.offsets_device.view(1, -1, 1) + self.lengths.unsqueeze(-1)) + steps  # (B, G, n)
        self.keys.index_put_((self.rows, slots), key)
        self.values.index_put_((self.rows, slots), value)
        self.positions.index_put_((self.rows, slots), (steps + first_position).expand_as(slots))
        self.lengths += n
        self.bound_host += n
        self.spare -= n

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


class HostHistory:
    """Every token's K/V of one layer on the host, copied off the critical path.

    On CUDA each copy goes to pinned host memory with ``non_blocking`` on a side stream that waits
    for the data with an event: the model's stream and the Python thread never wait for it. Decode
    tokens gather in a device staging block and go over ``block`` at a time. ``tensors()`` waits
    for the copies (a new turn, or a caller reading the history).
    """

    def __init__(self, block: int):
        self.block = block
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done: torch.cuda.Event | None = None  # the last copy's completion
        self.staging: tuple[torch.Tensor, torch.Tensor] | None = None
        self.staged = 0
        self.nbytes = 0

    def add(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append (B, G, n, d) states: a prompt goes over at once, single tokens through the staging block."""
        self.nbytes += 2 * key.numel() * key.element_size()
        if key.shape[2] > 1 or key.device.type != "cuda":
            self._flush()
            self._copy(key, value)
            return
        if self.staging is None:
            shape = (*key.shape[:2], self.block, key.shape[-1])
            self.staging = (key.new_empty(shape), value.new_empty(shape))
        self.staging[0][:, :, self.staged : self.staged + 1] = key
        self.staging[1][:, :, self.staged : self.staged + 1] = value
        self.staged += 1
        if self.staged == self.block:
            self._flush()

    def _flush(self) -> None:
        if self.staged:
            key, value = self.staging
            self._copy(key[:, :, : self.staged], value[:, :, : self.staged])
            self.staging, self.staged = None, 0  # the copy reads the block; the next one is new

    def _copy(self, key: torch.Tensor, value: torch.Tensor) -> None:
        if key.device.type != "cuda":
            self.chunks.append((key.to("cpu", copy=True), value.to("cpu", copy=True)))
            return
        stream = _side_stream(key.device)
        stream.wait_stream(torch.cuda.current_stream(key.device))
        with torch.cuda.stream(stream):
            host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (key, value))
            for target, source in zip(host, (key, value), strict=True):
                target.copy_(source, non_blocking=True)
                source.record_stream(stream)  # its memory is not reused before the copy is done
            self.done = torch.cuda.Event()
            self.done.record(stream)
        self.chunks.append(host)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The history as host (B, G, length, d) keys and values (waits for the copies)."""
        self._flush()
        if self.done is not None:
            self.done.synchronize()
        if len(self.chunks) > 1:
            self.chunks = [tuple(torch.cat(parts, 2) for parts in zip(*self.chunks, strict=True))]
        return self.chunks[0]


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class TCACacheLayer(CacheLayerMixin):
    """One layer of the compressed cache. ``update`` only passes the new states through."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keep_history: bool = True, block_size: int = 128):
        super().__init__()
        self.keep_history, self.block_size = keep_history, block_size
        self.store: LayerStore | None = None
        self.seen = 0  # tokens processed (index space, padding included)
        # per row: positions >= boundary[row] are not compressed yet (the window and what just left it)
        self.boundary: list[int] = []
        self.pending = 0  # length of the states handed over by the last update
        self._history: HostHistory | None = None

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
        self.store, self.seen, self.boundary, self.pending, self._history = None, 0, [], 0, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the TCA cache cannot be cropped (assisted decoding is not supported).")

    @property
    def heads(self) -> list[HeadView]:
        """Per KV head, views of its stored entries (empty before the first prefill)."""
        return [] if self.store is None else [self.store.head(g) for g in range(self.store.n_kv)]

    @property
    def nbytes(self) -> int:
        """Bytes the device cache of this layer holds."""
        return 0 if self.store is None else self.store.nbytes

    @property
    def history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Host (B, G, seen, d) keys and values of every token so far (None when not kept)."""
        return None if self._history is None else self._history.tensors()

    @property
    def host_nbytes(self) -> int:
        """Bytes of the host history of this layer."""
        return 0 if self._history is None else self._history.nbytes

    def remember(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append (B, G, n, d) states to the host history (when kept)."""
        if self.keep_history:
            if self._history is None:
                self._history = HostHistory(self.block_size)
            self._history.add(key, value)


class TCACache(Cache):
    """The compressed cache for ``model.generate`` under ``tca.apply``: a ``TCACacheLayer`` for each
    layer TCA manages, and transformers' own ``DynamicSlidingWindowLayer`` for each sliding-window
    layer it leaves alone.

    Args:
        n_layers: the model's layers.
        managed: the layers TCA manages (None: all).
        sliding_window: the window of the other layers (needed when some are not managed).
    """

    def __init__(
        self,
        n_layers: int,
        keep_history: bool = True,
        block_size: int = 128,
        managed: Collection[int] | None = None,
        sliding_window: int | None = None,
    ):
        managed = range(n_layers) if managed is None else managed
        if len(managed) < n_layers and sliding_window is None:
            raise ValueError("a TCACache with layers TCA does not manage needs their sliding_window.")
        super().__init__(
            layers=[
                TCACacheLayer(keep_history, block_size)
                if layer in managed
                else DynamicSlidingWindowLayer(sliding_window=sliding_window)
                for layer in range(n_layers)
            ]
        )
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

    def byte_counts(self) -> dict[str, int]:
        """One pass over the layers (it runs every decode step), in bytes of keys and values:
        ``kv_bytes``: what the device cache holds (allocated; a sliding layer's window included);
        ``dense_kv_bytes``: what transformers' own cache would hold for the same tokens (every token
        of every head of a managed layer, the batch's padding included, and a sliding layer's window
        as it is); ``host_kv_bytes``: the host history kept for multi-turn re-selection;
        ``managed_kv_bytes`` and ``managed_dense_kv_bytes``: the first two over the managed layers."""
        counts = dict.fromkeys(BYTE_COUNTS, 0)
        for layer in self.layers:
            if not isinstance(layer, TCACacheLayer):
                own = _device_bytes(layer)
                counts["kv_bytes"] += own
                counts["dense_kv_bytes"] += own
                continue
            counts["host_kv_bytes"] += layer.host_nbytes
            if layer.store is None:
                continue
            batch, _, dim = layer.store.keys.shape
            dense = 2 * batch * layer.store.n_kv * layer.seen * dim * layer.store.keys.element_size()
            for kind in ("", "managed_"):
                counts[f"{kind}kv_bytes"] += layer.nbytes
                counts[f"{kind}dense_kv_bytes"] += dense
        return counts

    @property
    def kv_bytes(self) -> int:
        """Bytes the device cache holds over all layers (``byte_counts``)."""
        return self.byte_counts()["kv_bytes"]

    @property
    def host_kv_bytes(self) -> int:
        """Bytes of host history kept for multi-turn re-selection (``byte_counts``)."""
        return self.byte_counts()["host_kv_bytes"]

    def dense_kv_bytes(self) -> int:
        """Bytes transformers' own cache would hold for the same tokens (``byte_counts``)."""
        return self.byte_counts()["dense_kv_bytes"]


def dense_cache_bytes(model: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    """Bytes transformers' own cache holds for ``tokens`` tokens (keys and values, every layer): a
    full-attention layer keeps every token, a sliding-window layer its last ``window - 1``."""
    shape = model_fingerprint(model)
    element = next(model.parameters()).element_size()
    window = text_config(model).sliding_window if len(shape["managed_layers"]) < shape["n_layers"] else None
    held = [
        tokens if layer in shape["managed_layers"] else min(tokens, window - 1)
        for layer in range(shape["n_layers"])
    ]
    return 2 * batch * shape["n_kv_heads"] * shape["head_dim"] * element * sum(held)


def _device_bytes(layer: CacheLayerMixin) -> int:
    """Bytes of keys and values one cache layer holds (a TCA layer's allocated store)."""
    if isinstance(layer, TCACacheLayer):
        return layer.nbytes
    if not layer.is_initialized or layer.keys is None:
        return 0
    return layer.keys.nbytes + layer.values.nbytes


def mean_keep_fraction(mu: float, sigma: float) -> float:
    """Fraction of a block a head keeps on average: E[min(X, 1)], X ~ LogNormal(ln mu, sigma)."""
    if math.isinf(mu):
        return 1.0
    return float(rank_fractions(torch.tensor(mu), torch.tensor(sigma), 1)[0])
