"""Attention ops: the entry points TCA calls, answered by a registered backend (``registry``).

``TCA_BACKEND`` (``auto`` or a backend's name) or ``use_backend(...)`` overrides the choice;
``auto`` takes the first registered backend other than the reference that is available on the
tensors' device (the Triton kernels on a CUDA device), the reference elsewhere. Each entry point
is a table lookup; tuning and shape fallbacks live inside each backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import reference, triton  # noqa: F401  (registers the backends)
from .reference import dense_causal  # noqa: F401  (a public reference op)
from .registry import AUTO, BACKENDS, Backend
from .triton import dense_prefill, pairs_fraction, sparse_pays  # noqa: F401  (the Triton backend's tuning)

_override: str | None = None


def _choices() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def backend_for(device: torch.device) -> str:
    """The name of the backend used for tensors on ``device``."""
    choice = _override or os.environ.get("TCA_BACKEND", "auto")
    if choice == "auto" and device in AUTO:  # every attention call of every layer comes here
        return AUTO[device]
    if choice not in _choices():
        raise ValueError(f"TCA_BACKEND={choice!r} is not one of {_choices()}.")
    if choice != "auto":
        return choice
    fast = [name for name, found in BACKENDS.items() if name != "reference" and found.available(device)]
    AUTO[device] = fast[0] if fast else "reference"
    return AUTO[device]


def backend(device: torch.device) -> Backend:
    """The backend object serving tensors on ``device``."""
    return BACKENDS[backend_for(device)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests flip this)."""
    global _override
    if name not in _choices():
        raise ValueError(f"backend must be one of {_choices()}, got {name!r}.")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def window_prefill(query, key, value, window, scale, key_start=None):
    """Causal attention within each query's last ``window`` keys, (B, H, L, d): a sliding-window
    layer's prefill at O(L x window) (``tca.ops.reference.window_prefill``'s contract)."""
    return backend(query.device).window_prefill(query, key, value, window, scale, key_start)


def select(query, key, mu, sigma, config, scale, key_start=None):
    """Online selection (``tca.core.selection.select``'s contract) -> Selection."""
    return backend(key.device).select(query, key, mu, sigma, config, scale, key_start)


def sparse_prefill(query, key, value, selection, local_window, scale, key_start=None, query_chunk=256):
    """TCA prefill attention; see ``tca.ops.reference.sparse_prefill`` for shapes."""
    return backend(query.device).sparse_prefill(
        query, key, value, selection, local_window, scale, key_start, query_chunk
    )


def decode(query, key, value, lengths, scale=None):
    """Decode attention over a compressed cache; see ``tca.ops.reference.decode_reference``."""
    return backend(query.device).decode(query, key, value, lengths, scale)


def decode_ragged(query, key, value, lengths, offsets, max_len, scale=None):
    """Decode over a ragged layer store; see ``tca.ops.reference.decode_ragged``."""
    return backend(query.device).decode_ragged(query, key, value, lengths, offsets, max_len, scale)


def decode_ragged_append(
    query, new_key, new_value, key, value, positions, lengths, offsets, max_len, position, scale=None
):
    """Append one token per head to a ragged layer store and decode; see ``tca.ops.reference``."""
    return backend(query.device).decode_ragged_append(
        query, new_key, new_value, key, value, positions, lengths, offsets, max_len, position, scale
    )


def attend_after_cache(query, cached_key, cached_value, lengths, key, value, scale):
    """New tokens over a head's cache and, causally, each other; see ``tca.ops.reference``."""
    return backend(query.device).attend_after_cache(
        query, cached_key, cached_value, lengths, key, value, scale
    )


def gather_entries(key, value, kept, counts, window_start, slot_heads, slot_columns):
    """A prefill's cache entries of every head in one buffer; see ``tca.ops.reference.gather_entries``."""
    return backend(key.device).gather_entries(
        key, value, kept, counts, window_start, slot_heads, slot_columns
    )


def read_host_rows(pieces, rows, out):
    """Rows of a history held in host pieces, written into ``out`` on the device; see
    ``tca.ops.reference.read_rows``."""
    return backend(out.device).read_host_rows(pieces, rows, out)


def dropped_mass(query, key, selection, local_window, scale, key_start=None):
    """The last query's dropped mass (B, H); see ``tca.core.error_bound.last_query_dropped_mass``."""
    return backend(key.device).dropped_mass(query, key, selection, local_window, scale, key_start)
