"""The Triton backend: fused kernels (``kernels.py``) behind launchers (``launchers.py``).

Its tuning lives here: the measured crossover past which dense causal attention beats the
sparse prefill kernel. Shapes the kernels do not take (head dim not a power of two >= 16, other
dtypes, pooled importance) are answered by the reference; a new turn's queries over a longer
history go through SDPA over the rows they see. Triton itself is imported on first use, so this
module imports without it.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from ...core.selection import nothing_kept
from ...core.transfer import host_ints, is_pinned
from .. import reference
from ..registry import register

# Sparse pays only when it skips enough pairs: the kernel runs at about `efficiency` of dense
# SDPA's pair rate, so it wins when pairs_fraction < efficiency. Per head dim, the lowest
# efficiency measured on the H100 (benchmarks/NOTES-kernels.md); past it dense causal attention
# runs instead.
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


def dense_prefill(query, key, value, selection, local_window, scale, key_start=None):
    """TCA prefill answered by dense causal attention (SDPA; left padding by slicing each row):
    exact when the selection keeps every candidate, else the dense answer TCA approximates.
    Used past the crossover, where the kernel would compute nearly the whole causal triangle."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if key_start is None:
        return sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    out = torch.zeros_like(query)
    for row, start in enumerate(host_ints(key_start)):
        q, k, v = (x[row : row + 1, :, start:] for x in (query, key, value))
        if q.shape[2]:
            out[row : row + 1, :, start:] = sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out


def attend_after_cache_sdpa(query, cached_key, cached_value, lengths, key, value, scale):
    """``reference.attend_after_cache`` through SDPA, every head at once (fused attention in the
    inputs' dtype with fp32 accumulation; no per-head loop, no fp32 copy of the cache), in steps of
    ``reference.attention.AFTER_CACHE_STEP`` new tokens."""
    batch, n_heads, n, dim = query.shape
    n_kv = cached_key.shape[1]
    keys, values, cached = reference.after_cache_keys(cached_key, cached_value, lengths, key, value)
    grouped = query.reshape(batch, n_kv, n_heads // n_kv, n, dim)
    out = torch.empty(grouped.shape, dtype=query.dtype, device=query.device)
    for first, last in reference.attention.after_cache_steps(n):
        seen = cached.shape[-1] + last
        visible = reference.after_cache_visible(cached, first, last)[:, :, 0]  # (B, G, rows, seen)
        out[:, :, :, first:last] = _grouped_sdpa(
            grouped[:, :, :, first:last], keys[:, :, :seen], values[:, :, :seen], visible, scale
        )
    return out.view(batch, n_heads, n, dim)


def sparse_prefill_tail_sdpa(query, key, value, selection, local_window, scale, key_start=None):
    """``reference.sparse_prefill`` for a new turn's queries (Lq < L) through SDPA in the inputs'
    dtype, every head at once: each KV head's kept keys and the queries' windows are gathered, and no
    other key or value is read (a new turn's values hold only those rows, ``HostHistory.values_then``).
    In steps of ``reference.attention.AFTER_CACHE_STEP`` queries. (B, H, Lq, d)."""
    batch, n_heads, q_len, dim = query.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    offset = context_len - q_len
    kept = selection.indices.to(key.device)  # (B, G, K), padded with L
    rows = kept.clamp_max(context_len - 1).unsqueeze(-1).expand(-1, -1, -1, dim)
    first_window = max(0, offset - local_window + 1)  # the first key any of these queries' windows holds
    keys = torch.cat([torch.gather(key, 2, rows), key[:, :, first_window:]], 2)  # (B, G, K + Wc, d)
    values = torch.cat([torch.gather(value, 2, rows), value[:, :, first_window:]], 2)
    columns = torch.arange(first_window, context_len, device=key.device)  # (Wc,)
    # left padding: no key before its row's first; (B, 1, 1, Wc), or None without padding
    after_start = None if key_start is None else columns >= key_start.to(key.device).view(-1, 1, 1, 1)
    grouped = query.reshape(batch, n_kv, n_heads // n_kv, q_len, dim)
    out = torch.empty(grouped.shape, dtype=query.dtype, device=query.device)
    for lo, hi in reference.attention.after_cache_steps(q_len):
        position = torch.arange(offset + lo, offset + hi, device=key.device)  # (n,)
        kept_visible = kept.unsqueeze(2) <= (position - local_window).view(1, 1, -1, 1)  # (B, G, n, K)
        in_window = (columns <= position.view(-1, 1)) & (columns > position.view(-1, 1) - local_window)
        window_visible = in_window.view(1, 1, *in_window.shape)  # (1, 1, n, Wc)
        if after_start is not None:
            window_visible = window_visible & after_start
        visible = torch.cat([kept_visible, window_visible.expand(batch, n_kv, -1, -1)], -1)
        out[:, :, :, lo:hi] = _grouped_sdpa(grouped[:, :, :, lo:hi], keys, values, visible, scale)
    return out.view(batch, n_heads, q_len, dim)


def _grouped_sdpa(queries, keys, values, visible, scale):
    """(B, G, group, n, d) queries over (B, G, S, d) keys and values in one SDPA call, each KV head's
    group of query heads as rows (head, token); ``visible`` (B, G, n, S) is shared by the group."""
    batch, n_kv, group, n, dim = queries.shape
    mask = visible.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(batch, n_kv, group * n, -1)
    rows = queries.reshape(batch, n_kv, group * n, dim)
    out = torch.nn.functional.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)
    return out.view(batch, n_kv, group, n, dim)


def _launchers():
    from . import launchers

    return launchers


# Kernel shapes that did not fit the GPU's shared memory (or did not compile for it), answered by
# the reference from then on: ("select", dtype, head dim, query rows per KV head, block size), and
# (kernel name, dtype, head dim) for the prefill's bookkeeping ops. Seen: the selection at fp32, head
# dim 256, 64 observation queries on 4 heads (Gemma 3 in float32) needs 384 KB of an H200's 227 KB.
_REFUSED: set[tuple] = set()
_ZERO_COPY = True  # False once a device has refused to read pinned host memory in place


def _fitting(kernel, fallback, args: tuple, shape: tuple, what: str):
    """``kernel(*args)``, or ``fallback(*args)`` (the reference: the same result, slower) where the
    kernel does not fit the GPU's shared memory at this ``shape``, or does not compile for it: warned
    once per shape (``what`` says which kernel and shape), never a failed prefill."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    if shape not in _REFUSED:
        try:
            return kernel(*args)
        except (OutOfResources, CompilationError, PTXASError) as error:
            _REFUSED.add(shape)
            warnings.warn(
                f"TCA's {what} does not fit this GPU (or does not compile for it) ({str(error)[:200]}); "
                "using PyTorch instead (slower, the same result).",
                RuntimeWarning,
                stacklevel=3,
            )
    return fallback(*args)


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _bookkeeping(kernel, fallback, args: tuple, key: torch.Tensor):
    """A prefill bookkeeping op's kernel through ``_fitting``, shapes told apart by dtype and head dim."""
    shape = (kernel.__name__, key.dtype, key.shape[-1])
    what = f"{kernel.__name__} kernel at {_dtype(key)}, head dim {key.shape[-1]}"
    return _fitting(kernel, fallback, args, shape, what)


class TritonBackend:
    """Triton kernels on CUDA devices (and on the CPU under ``TRITON_INTERPRET=1``, for tests)."""

    name = "triton"

    def available(self, device: torch.device) -> bool:
        """On a CUDA device, when Triton imports."""
        return device.type == "cuda" and importlib.util.find_spec("triton") is not None

    def select(self, query, key, mu, sigma, config, scale, key_start=None):
        """Fused selection: the reference's indices and counts (the index tensor may be wider,
        the extra columns being padding). With an importance option the importance is computed in
        PyTorch and the ranking and top-t by the kernels (``select_launcher``)."""
        args = (query, key, mu, sigma, config, scale, key_start)
        if not _launchers().supported(query, key):
            return reference.BACKEND.select(*args)
        rows = query.shape[1] // key.shape[1] * query.shape[2]
        shape = ("select", query.dtype, query.shape[-1], rows, config.block_size)
        what = (
            f"selection kernel at {_dtype(query)}, head dim {query.shape[-1]}, {rows} query rows per KV head "
            "(bfloat16 or fewer observation_queries keep the kernel)"
        )
        return _fitting(_launchers().select, reference.BACKEND.select, args, shape, what)

    def sparse_prefill(
        self, query, key, value, selection, local_window, scale, key_start=None, query_chunk=256
    ):
        """The sparse kernel, or dense SDPA past the crossover (``sparse_pays`` on the widest kept row);
        a new turn's queries over a longer history through SDPA over the rows they see."""
        if query.shape[2] < key.shape[2]:  # a new turn's queries over the history
            return sparse_prefill_tail_sdpa(query, key, value, selection, local_window, scale, key_start)
        launchers = _launchers()
        if launchers.supported(query, key) and query.shape[2] == key.shape[2]:
            if not sparse_pays(query.shape[2], local_window, selection.indices.shape[-1], query.shape[-1]):
                return dense_prefill(query, key, value, selection, local_window, scale, key_start)
            return launchers.sparse_prefill(query, key, value, selection, local_window, scale, key_start)
        return reference.sparse_prefill(
            query, key, value, selection, local_window, scale, key_start, query_chunk
        )

    def window_prefill(self, query, key, value, window, scale, key_start=None):
        """The sparse kernel with nothing kept outside the window (never the dense answer: a
        sliding-window layer's attention is not the causal square's)."""
        launchers = _launchers()
        if launchers.supported(query, key) and query.shape[2] == key.shape[2]:
            kept = nothing_kept(key.shape[0], key.shape[1], key.shape[2], key.device)
            return launchers.sparse_prefill(query, key, value, kept, window, scale, key_start)
        return reference.window_prefill(query, key, value, window, scale, key_start)

    def decode(self, query, key, value, lengths, scale=None):
        """Split-K decode over the per-head cache."""
        launchers = _launchers()
        if launchers.supported(query, key):
            return launchers.decode(query, key, value, lengths, scale)
        return reference.decode_reference(query, key, value, lengths, scale)

    def decode_ragged(self, query, key, value, lengths, offsets, max_len, scale=None):
        """Split-K decode over a ragged layer store (every head in one buffer, one launch)."""
        launchers = _launchers()
        if launchers.supported(query, key.unsqueeze(1)):
            return launchers.decode_ragged(query, key, value, lengths, offsets, max_len, scale)
        return reference.decode_ragged(query, key, value, lengths, offsets, max_len, scale)

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
    ):
        """Append and decode in two launches (the append folded into the decode kernels)."""
        launchers = _launchers()
        if launchers.supported(query, key.unsqueeze(1)) and lengths.dtype == torch.int32:
            return launchers.decode_ragged_append(
                query, new_key, new_value, key, value, positions, lengths, offsets, max_len, position, scale
            )
        return reference.decode_ragged_append(
            query, new_key, new_value, key, value, positions, lengths, offsets, max_len, position, scale
        )

    attend_after_cache = staticmethod(attend_after_cache_sdpa)

    def read_host_rows(self, pieces, rows, out):
        """The rows asked for, read by the device straight from pinned host memory (``host_rows``);
        the reference (every piece copied over whole) where the pieces are not pinned or the device
        cannot read them in place (warned once)."""
        global _ZERO_COPY
        pinned = out.device.type == "cuda" and all(is_pinned(piece) for piece in pieces)
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and out.device.type == "cpu"
        if _ZERO_COPY and (pinned or interpreted):
            from . import host_rows

            try:
                return host_rows.read_rows(pieces, rows, out)
            except (ValueError, RuntimeError, OSError) as error:  # the pointer check, or no driver
                _ZERO_COPY = False
                warnings.warn(
                    f"TCA cannot read the host history in place on this machine ({str(error)[:200]}); "
                    "a new turn copies the whole history back instead (slower, the same result).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return reference.read_rows(pieces, rows, out)

    def dropped_mass(self, query, key, selection, local_window, scale, key_start=None):
        """The last query's dropped mass in two launches (``reference.dropped_mass``'s contract)."""
        args = (query, key, selection, local_window, scale, key_start)
        if not _launchers().supported(query.unsqueeze(2), key):
            return reference.dropped_mass(*args)
        return _bookkeeping(_launchers().dropped_mass, reference.dropped_mass, args, key)

    def gather_entries(self, key, value, kept, counts, window_start, slot_heads, slot_columns):
        """A layer's cache entries in one launch (``reference.gather_entries``'s contract)."""
        args = (key, value, kept, counts, window_start, slot_heads, slot_columns)
        if not _launchers().supported(key, key):
            return reference.gather_entries(*args)
        return _bookkeeping(_launchers().gather_entries, reference.gather_entries, args, key)


BACKEND = register(TritonBackend())
