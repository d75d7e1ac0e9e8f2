"""The compressed KV cache (DESIGN 2.3-2.4): transformers' ``Cache`` whose TCA layers keep each KV
head's entries at their true length (``store.LayerStore``) and, for multi-turn, a host copy of
every token (``history.HostHistory``).

The attention itself is done by ``TCARun`` (``run.py``) and ``CachePolicy`` (``policy.py``):
``update`` only hands the new states over.

On a model that mixes sliding-window and full-attention layers (Gemma 3) only the full layers are
TCA layers; each sliding layer is transformers' own ``DynamicSlidingWindowLayer``, the very layer a
dense ``generate`` would use, so those layers cache and attend exactly as without TCA.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ...core.budgets import rank_fractions
from ...core.profile import model_fingerprint, text_config
from ...core.stats import BYTE_COUNTS
from .history import HostHistory
from .store import HeadView, LayerStore


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
    def host_history(self) -> HostHistory | None:
        """The host history itself (None when not kept): a new turn reads it on the device."""
        return self._history

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
