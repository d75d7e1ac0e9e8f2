"""Attention ops: one dispatcher choosing the Triton kernels or the PyTorch reference.

``TCA_BACKEND`` (``auto`` | ``reference`` | ``triton``) or ``use_backend(...)`` overrides the
choice; ``auto`` takes the kernels on a CUDA device when Triton imports, the reference elsewhere.
Entries: ``select`` (online selection), ``sparse_prefill`` (with the measured crossover to dense
attention on the Triton backend), ``decode`` (one query over a compressed per-head cache).
Shapes the kernels do not take (head dim not a power of two >= 16, other dtypes) fall back to
the reference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import reference

_BACKENDS = ("auto", "reference", "triton")
_override: str | None = None


def backend_for(device: torch.device) -> str:
    """The backend used for tensors on ``device``: 'triton' or 'reference'."""
    choice = _override or os.environ.get("TCA_BACKEND", "auto")
    if choice not in _BACKENDS:
        raise ValueError(f"TCA_BACKEND={choice!r} is not one of {_BACKENDS}.")
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "reference"
    return choice


def _triton_available() -> bool:
    try:
        from .triton import launchers  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests flip this)."""
    global _override
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}.")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


# Sparse pays only when it skips enough pairs: the kernel runs at about `efficiency` of dense
# SDPA's pair rate, so it wins when pairs_fraction < efficiency. Per head dim, the lowest
# efficiency measured on the H100 (benchmarks/NOTES-kernels.md); past it the dispatcher runs
# dense causal attention instead.
DENSE_CROSSOVER = {128: 0.55, 64: 0.45}
DEFAULT_CROSSOVER = 0.45


def pairs_fraction(context_len: int, local_window: int, kept: int) -> float:
    """Estimated TCA pairs over dense causal pairs for one head keeping ``kept`` candidates
    (spread evenly over the candidates ``[0, L - w)``). Host-only arithmetic, no GPU sync."""
    window = max(local_window, 1)
    dense = context_len * (context_len + 1) / 2
    inside = min(window, context_len)
    window_pairs = inside * (inside + 1) / 2 + (context_len - inside) * window
    candidates = max(context_len - window, 0)
    kept_pairs = kept * (candidates + 1) / 2  # a kept key is seen by the queries >= its position + w
    return min(1.0, (window_pairs + kept_pairs) / dense)


def sparse_pays(context_len: int, local_window: int, kept: int, head_dim: int = 128) -> bool:
    """Whether the sparse kernel beats dense attention for this shape (the measured crossover)."""
    threshold = DENSE_CROSSOVER.get(head_dim, DEFAULT_CROSSOVER)
    return pairs_fraction(context_len, local_window, kept) < threshold


def sparse_prefill(query, key, value, selection, local_window, scale, key_start=None, query_chunk=256):
    """TCA prefill attention; see ``reference.sparse_prefill`` for shapes.

    On the Triton backend a shape where sparse would not pay (``sparse_pays`` on the widest
    kept row) runs exact causal attention through ``dense_prefill``: the kept set plus window
    is then so close to the whole causal past that the dense kernel is faster.
    """
    if backend_for(query.device) == "triton":
        from .triton import launchers

        if launchers.supported(query, key):
            if not sparse_pays(query.shape[2], local_window, selection.indices.shape[-1], query.shape[-1]):
                return dense_prefill(query, key, value, selection, local_window, scale, key_start)
            return launchers.sparse_prefill(query, key, value, selection, local_window, scale, key_start)
    return reference.sparse_prefill(query, key, value, selection, local_window, scale, key_start, query_chunk)


def dense_prefill(query, key, value, selection, local_window, scale, key_start=None):
    """TCA prefill answered by dense causal attention (SDPA; left padding by slicing each row):
    exact when the selection keeps every candidate, else the dense answer TCA approximates.
    Used past the crossover, where the kernel would compute nearly the whole causal triangle."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if key_start is None:
        return sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    out = torch.zeros_like(query)
    for row, start in enumerate(key_start.tolist()):
        q, k, v = (x[row : row + 1, :, start:] for x in (query, key, value))
        if q.shape[2]:
            out[row : row + 1, :, start:] = sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out


def decode(query, key, value, lengths, scale=None):
    """Decode attention over a compressed cache; see ``reference.decode_reference`` for shapes."""
    if backend_for(query.device) == "triton":
        from .triton import launchers

        if launchers.supported(query, key):
            return launchers.decode(query, key, value, lengths, scale)
    return reference.decode_reference(query, key, value, lengths, scale)


def select(query, key, mu, sigma, config, scale, key_start=None):
    """Online selection; see ``tca.select.select``. The kernel gives the same indices and counts
    (its index tensor may be wider, the extra columns being padding)."""
    if backend_for(key.device) == "triton":
        from .triton import launchers

        if launchers.supported(query, key) and config.pool_kernel == 1:
            return launchers.select(query, key, mu, sigma, config, scale, key_start)
    from ..select import select as reference_select

    return reference_select(query, key, mu, sigma, config, scale, key_start)
