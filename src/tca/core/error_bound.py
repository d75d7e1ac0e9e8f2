"""Dropped attention mass and the Theorem 1 error bound (DESIGN 2.5).

For a query whose dense softmax puts mass ``gamma`` on the keys TCA drops, renormalising over the
kept keys changes each output element by at most ``2 * gamma * max|V|`` (per element, the
max over the values of that KV head): sum_k |p_k - p~_k| = 2 * gamma.
"""

from __future__ import annotations

import torch

from .selection import Selection
from .softmax import causal_probs


def last_query_dropped_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    selection: Selection,
    local_window: int,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """gamma for the last query of each head: dense attention mass outside kept keys and window.

    Args:
        query: (B, H, d) the last query; key: (B, G, L, d).
    Returns:
        (B, H) float32 in [0, 1].
    """
    batch, n_heads, _ = query.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    probs = causal_probs(query.unsqueeze(2), key, scale, key_start=key_start).squeeze(3)  # (B, G, group, L)
    attended = torch.zeros(batch, n_kv, context_len, dtype=torch.bool, device=key.device)  # (B, G, L)
    attended[..., max(context_len - local_window, 0) :] = True
    if local_window >= 1:  # padding indices (context_len) land on the last key, inside the window
        attended.scatter_(-1, selection.indices.clamp_max(context_len - 1), True)
    else:
        in_range = (selection.indices < context_len).long()
        attended = attended.long().scatter_add(-1, selection.indices.clamp_max(context_len - 1), in_range) > 0
    kept_mass = (probs * attended.unsqueeze(2)).sum(-1)
    return (1.0 - kept_mass).clamp_min(0.0).view(batch, n_heads)


def theorem1_bound(gamma: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per-element bound ``2 * gamma * max|V|`` on the last query's output error.

    Args:
        gamma: (B, H); value: (B, G, L, d).
    Returns:
        (B, H) float32.
    """
    v_max = torch.linalg.vector_norm(value, float("inf"), dim=(-1, -2)).float()  # (B, G): max |V|, one pass
    return bound_from_value_max(gamma, v_max)


def bound_from_value_max(gamma: torch.Tensor, value_max: torch.Tensor) -> torch.Tensor:
    """``theorem1_bound`` from the context's max |V| per KV head, ``value_max`` (B, G), known
    beforehand (a new turn, whose values hold only the rows it reads). (B, H) float32."""
    n_heads, n_kv = gamma.shape[1], value_max.shape[1]
    return 2.0 * gamma * value_max.float().repeat_interleave(n_heads // n_kv, dim=1)
