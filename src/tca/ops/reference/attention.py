"""PyTorch reference of TCA sparse prefill attention (DESIGN 2.3): the specification the kernels meet.

Every query ``j`` attends to the kept columns it can see (``k <= j - w``, so they never overlap
its window) plus its own causal window ``(j - w, j]``, where ``w`` is the effective window.
Work is streamed over query chunks: memory is O(chunk * (kept + chunk + w)), and the compute is
the sparse pairs, not L^2. GQA: K/V are never repeated; query heads are grouped by KV head.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...core.selection import Selection, nothing_kept
from ...core.softmax import causal_prob_chunks, grouped_logits, masked_softmax


def _fused_masked_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(query keys^T * scale | visible) @ values, fused (SDPA); rows with nothing visible give zeros.

    query (B, G, group, C, d); keys, values (B, G, 1, S, d); visible (B, G, 1, C, S) bool.
    """
    batch, n_kv, group, chunk, head_dim = query.shape
    q = query.reshape(batch * n_kv, group, chunk, head_dim)
    k = keys.reshape(batch * n_kv, 1, -1, head_dim).expand(-1, group, -1, -1)
    v = values.reshape(batch * n_kv, 1, -1, head_dim).expand(-1, group, -1, -1)
    mask = visible.reshape(batch * n_kv, 1, chunk, -1)
    # on CUDA the math kernel: the memory-efficient one answered a 129-query chunk's last row wrongly
    # (H200, torch 2.11, float32, these broadcast keys and masks; seen against brute force)
    with sdpa_kernel(SDPBackend.MATH) if query.device.type == "cuda" else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = out.view(batch, n_kv, group, chunk, head_dim)
    return torch.where(
        visible.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device)
    )


def sparse_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: Selection,
    local_window: int,
    scale: float,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 256,
) -> torch.Tensor:
    """TCA prefill attention.

    Args:
        query: (B, H, Lq, d), the last Lq positions of the context (Lq = L for a whole prefill,
            fewer for a new turn over a history); key, value: (B, G, L, d), H a multiple of G.
        selection: kept indices (B, G, K), padded with L.
        local_window: effective window w >= 1 (each query sees keys ``(j - w, j]``).
        key_start: (B,) first valid key per row (left padding); queries before it output 0.
    Returns:
        (B, H, Lq, d) in the query's dtype; computed in float32.
    """
    batch, n_heads, q_len, head_dim = query.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    offset = context_len - q_len
    group = n_heads // n_kv
    start = torch.zeros(batch, dtype=torch.int64, device=query.device) if key_start is None else key_start
    q = query.float().view(batch, n_kv, group, q_len, head_dim)
    k, v = key.float(), value.float()
    kept = selection.indices.clamp_max(context_len - 1)
    gather = kept.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    k_kept = torch.gather(k, 2, gather).unsqueeze(2)  # (B, G, 1, K, d)
    v_kept = torch.gather(v, 2, gather).unsqueeze(2)
    kept_pos = selection.indices.view(batch, n_kv, 1, 1, -1)  # (B, G, 1, 1, K)
    out = torch.empty(batch, n_kv, group, q_len, head_dim, device=query.device)
    for q_lo in range(0, q_len, query_chunk):
        q_hi = min(q_lo + query_chunk, q_len)
        lo, hi = q_lo + offset, q_hi + offset  # key positions of this chunk's queries
        rows = torch.arange(lo, hi, device=query.device).view(1, 1, 1, -1, 1)  # (1,1,1,C,1)
        kept_visible = kept_pos <= rows - local_window  # (B, G, 1, C, K)
        w_lo = max(0, lo - local_window + 1)
        cols = torch.arange(w_lo, hi, device=query.device).view(1, 1, 1, 1, -1)
        window_visible = (cols <= rows) & (cols > rows - local_window)
        window_visible = window_visible & (cols >= start.view(-1, 1, 1, 1, 1))  # (B, 1, 1, C, Wc)
        keys = torch.cat([k_kept, k[:, :, None, w_lo:hi]], dim=3)  # (B, G, 1, K + Wc, d)
        values = torch.cat([v_kept, v[:, :, None, w_lo:hi]], dim=3)
        visible = torch.cat(
            [
                kept_visible.expand(batch, n_kv, 1, hi - lo, -1),
                window_visible.expand(batch, n_kv, 1, hi - lo, -1),
            ],
            -1,
        )
        out[:, :, :, q_lo:q_hi] = _fused_masked_attention(q[:, :, :, q_lo:q_hi], keys, values, visible, scale)
    return out.view(batch, n_heads, q_len, head_dim).to(query.dtype)


def dense_causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    key_start: torch.Tensor | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Dense causal attention with GQA and left padding; (B, H, Lq, d), float32 math.

    The queries are the last Lq positions of the Lk keys. ``query_chunk`` streams the queries so
    memory is O(chunk * Lk) rather than O(Lq * Lk).
    """
    batch, n_heads, q_len, head_dim = query.shape
    values = value.float().unsqueeze(2)  # (B, G, 1, Lk, d)
    chunks = causal_prob_chunks(query, key, scale, max(query_chunk or q_len, 1), key_start=key_start)
    parts = [torch.matmul(probs, values[..., :hi, :]) for _, hi, probs in chunks]  # (B, G, group, C, d)
    out = torch.cat(parts, dim=3) if parts else query.new_zeros(batch, n_heads, 0, head_dim)
    return out.reshape(batch, n_heads, q_len, head_dim).to(query.dtype)


def decode_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new query per head over a compressed cache (DESIGN 2.4).

    Args:
        query: (B, H, 1, d); key, value: (B, G, Kmax, d) with H a multiple of G; the cache of
            (batch b, KV head g) is ``key[b, g, :lengths[b, g]]``, keys beyond are invalid.
        lengths: (B, G) int, valid keys per (batch, KV head), each in [0, Kmax].
        scale: logit scale; None means ``d ** -0.5``.
    Returns:
        (B, H, 1, d) in the query's dtype, computed in float32; a head with no valid key gives 0.
    """
    batch, n_heads, _, head_dim = query.shape
    n_kv, max_len = key.shape[1], key.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    scores = grouped_logits(query, key, scale)  # (B, G, group, 1, Kmax)
    cols = torch.arange(max_len, device=query.device).view(1, 1, 1, 1, -1)
    visible = cols < lengths.to(query.device).view(batch, n_kv, 1, 1, 1)
    out = torch.matmul(masked_softmax(scores, visible), value.float().unsqueeze(2))  # (B, G, group, 1, d)
    return out.view(batch, n_heads, 1, head_dim).to(query.dtype)


def decode_ragged(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``decode_reference`` over a ragged layer store: every KV head in one buffer.

    Args:
        query: (B, H, 1, d); key, value: (B, S, d), head g's keys of row b at slots
            ``offsets[g] + [0, lengths[b, g])``; offsets: (G,) int64; max_len: a bound of the lengths.
    Returns:
        (B, H, 1, d) in the query's dtype.
    """
    batch, _, dim = key.shape
    slots = (offsets.view(-1, 1) + torch.arange(max_len, device=key.device)).clamp_max(
        key.shape[1] - 1
    )  # (G, M)
    index = slots.view(1, -1, 1).expand(batch, -1, dim)
    padded_key = torch.gather(key, 1, index).view(batch, len(offsets), max_len, dim)  # (B, G, M, d)
    padded_value = torch.gather(value, 1, index).view(batch, len(offsets), max_len, dim)
    return decode_reference(query, padded_key, padded_value, lengths, scale)


def decode_ragged_append(
    query: torch.Tensor,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    position: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Write one new token per (row, KV head) after its last entry of a ragged layer store, add 1 to
    ``lengths`` (in place), and attend over the result (``decode_ragged``).

    Args:
        new_key, new_value: (B, G, 1, d); key, value: (B, S, d); positions: (B, S) int64 (the
            token's slot gets ``position``, a host int or a one-element int64 tensor on the device);
            lengths: (B, G); max_len: a bound of the new lengths.
    Returns:
        (B, H, 1, d) in the query's dtype.
    """
    slots = offsets.view(1, -1) + lengths  # (B, G)
    rows = torch.arange(key.shape[0], device=key.device).view(-1, 1)
    key[rows, slots] = new_key[:, :, 0]
    value[rows, slots] = new_value[:, :, 0]
    positions[rows, slots] = position
    lengths += 1
    return decode_ragged(query, key, value, lengths, offsets, max_len, scale)


# New tokens per step of ``attend_after_cache``: a step holds (B, H, step, C + n) scores, so a long
# new turn (a pasted document) costs memory per step, not per token squared.
AFTER_CACHE_STEP = 256


def attend_after_cache(
    query: torch.Tensor,
    cached_key: torch.Tensor,
    cached_value: torch.Tensor,
    lengths: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """New tokens attending to each KV head's cached entries (all earlier) and, causally, to each other.

    Args:
        query: (B, H, n, d); cached_key, cached_value: (B, G, C, d), head g of row b valid up to
            ``lengths[b, g]`` (the slots past it are ignored, whatever they hold); lengths: (B, G);
            key, value: (B, G, n, d) the new tokens' states.
    Returns:
        (B, H, n, d) in the query's dtype.
    """
    batch, n_heads, n, dim = query.shape
    n_kv = cached_key.shape[1]
    keys, values, cached = after_cache_keys(cached_key, cached_value, lengths, key.float(), value.float())
    grouped = query.float().reshape(batch, n_kv, n_heads // n_kv, n, dim)  # (B, G, group, n, d)
    out = torch.empty(grouped.shape, device=query.device)
    for first, last in after_cache_steps(n):
        seen = cached.shape[-1] + last  # the cache and the new tokens up to the step's last
        scores = torch.matmul(grouped[:, :, :, first:last], keys[:, :, None, :seen].transpose(-1, -2)) * scale
        probs = masked_softmax(scores, after_cache_visible(cached, first, last))  # (B, G, group, step, seen)
        out[:, :, :, first:last] = torch.matmul(probs, values[:, :, None, :seen])
    return out.view(batch, n_heads, n, dim).to(query.dtype)


def after_cache_steps(n: int) -> list[tuple[int, int]]:
    """[first, last) ranges of at most ``AFTER_CACHE_STEP`` of ``n`` new tokens."""
    return [(first, min(first + AFTER_CACHE_STEP, n)) for first in range(0, n, AFTER_CACHE_STEP)]


def after_cache_keys(cached_key, cached_value, lengths, key, value) -> tuple:
    """(keys, values, cached): each head's cached entries then the new tokens, (B, G, C + n, d), in
    the new tokens' dtype, the slots past a head's length zeroed (NaN there must not reach the
    output through a zero weight); cached (B, G, C) bool: the valid slots."""
    batch, n_kv, capacity = cached_key.shape[:3]
    cached = torch.arange(capacity, device=key.device) < lengths.view(batch, n_kv, 1)  # (B, G, C)
    joined = [
        torch.cat([old.to(new.dtype), new], dim=2) for old, new in ((cached_key, key), (cached_value, value))
    ]
    for states in joined:  # in the joined copy: no second copy of the cache
        states[:, :, :capacity].masked_fill_(~cached[..., None], 0.0)
    return joined[0], joined[1], cached


def after_cache_visible(cached: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """(B, G, 1, last - first, C + last) bool: which keys the new tokens ``first .. last - 1`` see,
    given the valid cached slots ``cached`` (B, G, C): those, then the new tokens up to each itself."""
    batch, n_kv, capacity = cached.shape
    rows = last - first
    causal = torch.ones(rows, last, dtype=torch.bool, device=cached.device).tril(first)  # (rows, last)
    old = cached.view(batch, n_kv, 1, 1, capacity).expand(batch, n_kv, 1, rows, capacity)
    return torch.cat([old, causal.expand(batch, n_kv, 1, rows, last)], dim=-1)


def window_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    scale: float,
    key_start: torch.Tensor | None = None,
    query_chunk: int = 256,
) -> torch.Tensor:
    """Causal attention within each query's last ``window`` keys ``(j - window, j]`` (a
    sliding-window layer's prefill): ``sparse_prefill`` with nothing kept outside the window.
    Shapes as ``sparse_prefill``'s; returns (B, H, L, d)."""
    batch, n_kv, context_len, _ = key.shape
    kept = nothing_kept(batch, n_kv, context_len, key.device)
    return sparse_prefill(query, key, value, kept, window, scale, key_start, query_chunk)
