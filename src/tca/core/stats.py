"""RunStats: what a TCA run kept, what it computed, and what it dropped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .selection import Selection
from .transfer import to_device


def pair_counts(
    selection: Selection, key_start: torch.Tensor, local_window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-key pairs a TCA prefill computes, and those dense causal attention computes.

    Query ``j`` computes its window ``min(w, j + 1)`` plus the kept keys ``k <= j - w``; so kept
    key ``k`` is computed by ``max(0, n - (k - start) - w)`` queries of a row of n valid tokens.

    Returns:
        tca_pairs: (B, G) int64; dense_pairs: (B,) int64 (``n (n + 1) / 2``).
    """
    n = selection.context_len - key_start  # (B,) valid tokens per row
    kept_pairs = _kept_key_pairs(selection.indices, key_start, selection.context_len, local_window).sum(-1)
    window_pairs, dense_pairs = _window_and_dense_pairs(n, local_window)
    return kept_pairs + window_pairs.view(-1, 1), dense_pairs


def _kept_key_pairs(
    indices: torch.Tensor, key_start: torch.Tensor, context_len: int, window: int
) -> torch.Tensor:
    """(B, G, K) int64: the queries that compute each kept key (padding entries, ``context_len``: 0)."""
    n = (context_len - key_start).view(-1, 1, 1)
    return (n - (indices - key_start.view(-1, 1, 1)) - window).clamp_min(0) * (indices < context_len)


def _window_and_dense_pairs(n: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``n`` valid tokens: the window's pairs (``sum_j min(w, j + 1)``) and dense causal pairs."""
    w = torch.clamp(n, max=window)
    return w * n - w * (w - 1) // 2, n * (n + 1) // 2


BYTE_COUNTS = ("kv_bytes", "dense_kv_bytes", "host_kv_bytes", "managed_kv_bytes", "managed_dense_kv_bytes")


@dataclass
class RunStats:
    """Statistics of the prefills run under ``tca.apply`` (the most recent prefill per layer).

    The prefill figures cover the layers TCA manages, ``layers`` (every layer but on models that mix
    sliding-window and full-attention layers, whose sliding layers TCA leaves alone): one row per
    managed layer, in that order. Per row, arrays are over KV heads (batch-averaged):
    ``kept_counts`` kept global tokens, ``kept_entries`` KV entries kept (global + window),
    ``context_tokens`` valid tokens; ``tca_pairs`` (n_managed, n_kv_heads) the query-key pairs each
    KV head's prefill computed (per query head, summed over the batch), ``dense_pairs``
    (n_managed,) dense causal pairs; ``gamma`` (n_managed, n_heads) the last query's dropped
    attention mass and ``error_bound`` the Theorem 1 bound ``2 * gamma * max|V|`` per output
    element. After a generation with the compressed cache, over every layer (a sliding layer's
    window cache included): ``kv_bytes`` (what the device cache holds), ``dense_kv_bytes`` (what
    transformers' own cache holds for the same tokens) and ``host_kv_bytes`` (history kept on the
    host for multi-turn re-selection); ``managed_kv_bytes`` and ``managed_dense_kv_bytes`` are the
    first two over the managed layers alone (``managed_kv_fraction``: their ratio).

    The head counts are those of the heads one process holds; under tensor parallelism each rank
    records its own heads and ``gather_from`` assembles the whole model's statistics.
    """

    n_layers: int
    n_kv_heads: int
    n_heads: int
    layers: tuple[int, ...] | None = None  # the managed layers (None: all of them)
    kept_counts: np.ndarray = field(init=False)
    kept_entries: np.ndarray = field(init=False)
    context_tokens: np.ndarray = field(init=False)
    tca_pairs: np.ndarray = field(init=False)
    dense_pairs: np.ndarray = field(init=False)
    gamma: np.ndarray = field(init=False)
    error_bound: np.ndarray = field(init=False)
    prefills: int = 0
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    host_kv_bytes: int = 0
    managed_kv_bytes: int = 0
    managed_dense_kv_bytes: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(range(self.n_layers)) if self.layers is None else tuple(self.layers)
        rows = len(self.layers)
        per_kv = (rows, self.n_kv_heads)
        self.kept_counts = np.zeros(per_kv)
        self.kept_entries = np.zeros(per_kv)
        self.context_tokens = np.zeros(rows)
        self.tca_pairs = np.zeros(per_kv)
        self.dense_pairs = np.zeros(rows)
        self.gamma = np.zeros((rows, self.n_heads))
        self.error_bound = np.zeros((rows, self.n_heads))
        self._pending: list[tuple[int, torch.Tensor]] = []  # rows recorded, not yet on the host

    def record_prefill(
        self,
        layer: int,
        selection: Selection,
        key_start: torch.Tensor | None,
        local_window: int,
        gamma: torch.Tensor,
        bound: torch.Tensor,
    ) -> None:
        """Queue one layer's prefill (``key_start``: (B,) first valid key per row, None without
        padding; ``gamma``, ``bound``: (B, H)). Nothing runs on the device here: ``flush`` computes
        the figures of every queued layer together (a few launches per prefill, not per layer)
        and brings them to the host with one synchronisation."""
        row = self.layers.index(layer)
        self._pending.append(_Queued(row, selection, key_start, local_window, gamma, bound))
        if row == 0:
            self.prefills += 1

    def flush(self) -> None:
        """Store the queued layers' figures in the arrays (one device-to-host copy)."""
        if not self._pending:
            return
        groups: dict[tuple, list[_Queued]] = {}  # layers of one prefill share these
        for queued in self._pending:
            groups.setdefault(queued.shares(), []).append(queued)
        self._pending = []
        rows = [queued.row for group in groups.values() for queued in group]
        with torch.no_grad():  # a forward with autograd on (a plain ``model(ids)``) records figures too
            values = torch.cat([_figures(group) for group in groups.values()]).cpu().numpy()
        g, h = self.n_kv_heads, self.n_heads
        for layer, row in zip(rows, values, strict=True):
            parts = np.split(row, np.cumsum([g, g, 1, g, 1, h]))
            self.kept_counts[layer], self.kept_entries[layer] = parts[0], parts[1]
            self.context_tokens[layer], self.tca_pairs[layer] = parts[2][0], parts[3]
            self.dense_pairs[layer], self.gamma[layer], self.error_bound[layer] = (
                parts[4][0],
                parts[5],
                parts[6],
            )

    def record_cache(self, cache) -> None:
        """Store the compressed cache's sizes (``BYTE_COUNTS``, from ``cache.byte_counts()``)."""
        for name, value in cache.byte_counts().items():
            setattr(self, name, value)

    @property
    def kept_fraction(self) -> float:
        """KV entries kept after prefill / context tokens (window included), mean over managed layers
        and KV heads."""
        self.flush()
        return float((self.kept_entries / self.context_tokens[:, None].clip(min=1)).mean())

    @property
    def managed_kv_fraction(self) -> float:
        """Device KV bytes over what a dense cache would hold, on the managed layers alone (1.0
        before a generation with the compressed cache has recorded them)."""
        return self.managed_kv_bytes / self.managed_dense_kv_bytes if self.managed_dense_kv_bytes else 1.0

    @property
    def pairs_fraction(self) -> float:
        """Query-key pairs computed over dense causal pairs (the prefill's attention cost), managed layers."""
        self.flush()
        return float(self.tca_pairs.mean(1).sum() / max(self.dense_pairs.sum(), 1.0))

    @property
    def gamma_per_kv_head(self) -> np.ndarray:
        """(n_managed, n_kv_heads): the largest dropped mass among each KV head's query heads."""
        self.flush()
        return self.gamma.reshape(len(self.layers), self.n_kv_heads, -1).max(-1)

    def gather_from(self, parts: Sequence[tuple[Sequence[int], RunStats]]) -> None:
        """Fill these whole-model statistics from per-process ones, each with the global KV heads
        it holds (``HeadLayout.gather``): per-head arrays go to their heads, byte counts add up, and
        per-layer figures (identical on every process) are taken from the first."""
        group = self.n_heads // self.n_kv_heads
        covered = sorted(g for kv_heads, _ in parts for g in kv_heads)
        if covered != list(range(self.n_kv_heads)):
            raise ValueError(f"the parts cover KV heads {covered}, not each of {self.n_kv_heads} once.")
        for kv_heads, part in parts:
            kv = list(kv_heads)
            query = [g * group + i for g in kv for i in range(group)]
            for name in ("kept_counts", "kept_entries", "tca_pairs"):
                getattr(self, name)[:, kv] = getattr(part, name)
            self.gamma[:, query] = part.gamma
            self.error_bound[:, query] = part.error_bound
        first = parts[0][1]
        self.context_tokens[:] = first.context_tokens
        self.dense_pairs[:] = first.dense_pairs
        self.prefills = first.prefills
        for name in BYTE_COUNTS:
            setattr(self, name, sum(getattr(part, name) for _, part in parts))


@dataclass
class _Queued:
    """One layer's prefill as ``record_prefill`` received it (device tensors, nothing computed)."""

    row: int
    selection: Selection
    key_start: torch.Tensor | None
    local_window: int
    gamma: torch.Tensor
    bound: torch.Tensor

    def shares(self) -> tuple:
        """What the layers of one prefill have in common (their figures are computed together)."""
        start = None if self.key_start is None else id(self.key_start)
        return self.selection.context_len, self.selection.counts.shape[0], self.local_window, start


def _figures(group: list[_Queued]) -> torch.Tensor:
    """(layers, F) float64 figures of layers that share context, batch, window and padding: per row
    kept counts (G), kept entries (G), context tokens (1), TCA pairs (G), dense pairs (1), gamma
    (H), error bound (H); batch-averaged as ``RunStats`` documents (pairs summed over the batch)."""
    first = group[0]
    counts = torch.stack([q.selection.counts for q in group]).to(first.gamma.device)  # (n, B, G)
    device, (n_layers, batch, _) = counts.device, counts.shape
    start = torch.zeros(batch, dtype=torch.int64, device=device)
    if first.key_start is not None:
        start = first.key_start.to(device, torch.int64)
    tca_pairs, dense_pairs = _pairs(group, start, device)  # (n, G), scalar
    valid = first.selection.context_len - start  # (B,) valid tokens per row
    window = valid.clamp(max=first.local_window).double()
    counts = counts.double()
    per_layer = torch.ones(n_layers, 1, dtype=torch.float64, device=device)
    return torch.cat(
        [
            counts.mean(1),
            (counts + window.view(1, -1, 1)).mean(1),
            per_layer * valid.double().mean(),
            tca_pairs,
            per_layer * dense_pairs,
            torch.stack([q.gamma for q in group]).to(device).double().mean(1),
            torch.stack([q.bound for q in group]).to(device).double().mean(1),
        ],
        1,
    )


def _pairs(group: list[_Queued], start: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_counts`` of every layer of ``group`` at once: the kept indices of all layers side by
    side, each one's pairs added into its layer. Returns (n, G) TCA pairs summed over the batch, and
    the dense pairs summed over the batch (a scalar tensor); int64 arithmetic, exact."""
    first = group[0]
    context_len, window = first.selection.context_len, first.local_window
    indices = torch.cat([q.selection.indices.to(device) for q in group], -1)  # (B, G, sum K)
    widths = [q.selection.indices.shape[-1] for q in group]
    layer_of = to_device(np.repeat(np.arange(len(group)), widths), torch.int64, device)  # (sum K,)
    per_key = _kept_key_pairs(indices, start, context_len, window)
    batch, n_kv, _ = indices.shape
    kept_pairs = per_key.new_zeros(batch, n_kv, len(group)).index_add_(2, layer_of, per_key)  # (B, G, n)
    window_pairs, dense_pairs = _window_and_dense_pairs(context_len - start, window)  # (B,) each
    tca_pairs = (kept_pairs + window_pairs.view(-1, 1, 1)).double().sum(0).T  # (n, G)
    return tca_pairs, dense_pairs.double().sum()
