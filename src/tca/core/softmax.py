"""The masked causal softmax every dense-attention measurement shares, with GQA grouping.

Calibration (retained mass), the error bound (dropped mass), retrieval scores, the baselines'
observation scores and the reference attention all need the same thing: the float32 softmax of
``q k^T * scale`` over the keys a query may see. Query heads are grouped by KV head (head ``h``
uses KV head ``h // group``) so keys are never repeated, and long inputs are streamed over query
chunks so no L x L matrix is formed.

Positions: keys are positions ``0 .. S-1``; a query at position ``p`` sees keys ``<= p`` (and,
with ``key_start``, only keys ``>= key_start``: left padding). A row that sees no key is all
zeros, not NaN.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores`` over the ``visible`` entries of the last dimension.

    Args:
        scores: (..., S) float logits; visible: bool, broadcastable to ``scores``.
    Returns:
        Same shape as ``scores``: each row sums to 1 over its visible entries, hidden entries
        are 0, and a row with nothing visible is all zeros.
    """
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs.masked_fill_(~visible.any(-1, keepdim=True), 0.0)


def grouped_logits(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``q k^T * scale`` in float32, query heads grouped by KV head.

    Args:
        query: (..., H, C, d); key: (..., G, S, d), H a multiple of G, same leading dimensions.
    Returns:
        (..., G, H // G, C, S) float32.
    """
    *lead, n_heads, q_len, head_dim = query.shape
    n_kv, k_len = key.shape[-3], key.shape[-2]
    group = n_heads // n_kv
    # a group's queries stacked along the rows: one (group * C, d) x (d, S) product per KV head, so the
    # keys are read as they are (a broadcast over the group would copy them group times)
    q = query.float().reshape(*lead, n_kv, group * q_len, head_dim)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scale
    return logits.view(*lead, n_kv, group, q_len, k_len)


def causal_visible(
    first_row: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may see: ``first_row <= p`` rows, key ``k`` visible when ``k <= p``.

    Returns:
        (q_len, k_len) bool; with ``key_start`` (B,), (B, 1, 1, q_len, k_len) with keys before
        each row's ``key_start`` hidden too.
    """
    rows = torch.arange(first_row, first_row + q_len, device=device).view(-1, 1)
    cols = torch.arange(k_len, device=device).view(1, -1)
    visible = cols <= rows
    if key_start is not None:
        visible = visible & (cols >= key_start.to(device).view(-1, 1, 1, 1, 1))
    return visible


def causal_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    first_row: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax of the queries at positions ``first_row ..`` over the keys ``0 .. S-1``.

    Args:
        query: (..., H, C, d); key: (..., G, S, d), H a multiple of G.
        first_row: position of the first query; None means the queries are the last C positions
            (``S - C``).
        key_start: (B,) first valid key of each row (left padding); only for (B, H, C, d) input.
    Returns:
        (..., G, H // G, C, S) float32; a query's row sums to 1 over the keys it sees.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    first_row = k_len - q_len if first_row is None else first_row
    visible = causal_visible(first_row, q_len, k_len, query.device, key_start)
    return masked_softmax(grouped_logits(query, key, scale), visible)


def causal_prob_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    chunk: int,
    start: int | None = None,
    key_start: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Stream ``causal_probs`` over chunks of ``chunk`` queries; memory O(chunk * S).

    The queries are the last Lq positions of the Lk keys (Lq = Lk: queries and keys of one
    sequence). Only the queries at positions ``>= start`` (None: all of them) are computed.

    Args:
        query: (..., H, Lq, d); key: (..., G, Lk, d).
    Yields:
        ``(lo, hi, probs)``: the positions ``[lo, hi)`` of the chunk's queries and their
        (..., G, H // G, hi - lo, hi) probabilities over the keys ``0 .. hi-1`` (the later keys
        are invisible to them).
    """
    query, key = query.float(), key.float()  # once, not per chunk
    q_len, k_len = query.shape[-2], key.shape[-2]
    offset = k_len - q_len
    start = offset if start is None else max(start, offset)
    for lo in range(start, k_len, chunk):
        hi = min(lo + chunk, k_len)
        rows = query[..., lo - offset : hi - offset, :]
        yield lo, hi, causal_probs(rows, key[..., :hi, :], scale, lo, key_start)
