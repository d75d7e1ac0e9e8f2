"""The PyTorch reference backend: the specification every other backend meets, on any device."""

from __future__ import annotations

import torch

from ...core.error_bound import last_query_dropped_mass as dropped_mass
from ...core.selection import select as _select
from ..registry import register
from .attention import (
    after_cache_keys,
    after_cache_visible,
    attend_after_cache,
    decode_ragged,
    decode_ragged_append,
    decode_reference,
    dense_causal,
    sparse_prefill,
    window_prefill,
)
from .entries import gather_entries
from .host_rows import read_rows


class ReferenceBackend:
    """Plain PyTorch (float32 math) on every device."""

    name = "reference"

    def available(self, device: torch.device) -> bool:
        """Always: the reference runs wherever PyTorch does."""
        return True

    select = staticmethod(_select)
    sparse_prefill = staticmethod(sparse_prefill)
    window_prefill = staticmethod(window_prefill)
    decode = staticmethod(decode_reference)
    decode_ragged = staticmethod(decode_ragged)
    decode_ragged_append = staticmethod(decode_ragged_append)
    attend_after_cache = staticmethod(attend_after_cache)
    gather_entries = staticmethod(gather_entries)
    dropped_mass = staticmethod(dropped_mass)
    read_host_rows = staticmethod(read_rows)


BACKEND = register(ReferenceBackend())

__all__ = [
    "BACKEND",
    "after_cache_keys",
    "after_cache_visible",
    "attend_after_cache",
    "decode_ragged",
    "decode_ragged_append",
    "decode_reference",
    "dense_causal",
    "dropped_mass",
    "gather_entries",
    "read_rows",
    "sparse_prefill",
    "window_prefill",
]
