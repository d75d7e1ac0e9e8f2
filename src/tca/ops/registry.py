"""The registry of attention backends: each registers one object with the same entry points.

A backend answers ``select`` (online selection, DESIGN 2.1), ``sparse_prefill`` (DESIGN 2.3),
``window_prefill`` (the same with nothing kept outside the window: a sliding-window layer),
``decode`` / ``decode_ragged`` (one query over a compressed per-head cache, DESIGN 2.4; the ragged
form has every head of a layer in one buffer), ``attend_after_cache`` (a new turn's tokens over
the cache and, causally, each other), ``gather_entries`` (a prefill's cache entries of every
head, DESIGN 2.3), ``read_host_rows`` (rows of a host-held history into a device buffer: a
new turn's values) and ``dropped_mass`` (the last query's mass outside what it keeps: the error
bound's statistic), with the contracts documented in ``tca.ops.reference``. ``available(device)``
says whether it can serve tensors on a device; a backend that cannot take a particular shape
answers it with the reference itself.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Backend(Protocol):
    """The entry points every backend provides (see ``tca.ops.reference`` for the contracts)."""

    name: str

    def available(self, device: torch.device) -> bool: ...

    def select(self, query, key, mu, sigma, config, scale, key_start=None) -> Any: ...

    def sparse_prefill(
        self, query, key, value, selection, local_window, scale, key_start=None, query_chunk=256
    ) -> torch.Tensor: ...

    def window_prefill(self, query, key, value, window, scale, key_start=None) -> torch.Tensor: ...

    def decode(self, query, key, value, lengths, scale=None) -> torch.Tensor: ...

    def decode_ragged(self, query, key, value, lengths, offsets, max_len, scale=None) -> torch.Tensor: ...

    def decode_ragged_append(
        self,
        query,
        new_key,
        new_value,
        key,
        value,
        positions,
        lengths,
        offsets,
        max_len,
        position,
        scale=None,
    ) -> torch.Tensor: ...

    def attend_after_cache(
        self, query, cached_key, cached_value, lengths, key, value, scale
    ) -> torch.Tensor: ...

    def gather_entries(self, key, value, kept, counts, window_start, slot_heads, slot_columns) -> tuple: ...

    def read_host_rows(self, pieces, rows, out) -> None: ...

    def dropped_mass(self, query, key, selection, local_window, scale, key_start=None) -> torch.Tensor: ...


BACKENDS: dict[str, Backend] = {}
AUTO: dict[torch.device, str] = {}  # the backend "auto" picked per device (every registration clears it)


def register(backend: Backend) -> Backend:
    """Add ``backend`` under its ``name`` (a later registration of the same name replaces it)."""
    BACKENDS[backend.name] = backend
    AUTO.clear()
    return backend
