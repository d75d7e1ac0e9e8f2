"""Scoring pieces the baselines share: causal softmax of observation queries, stable top-k, block filling.

All math is float32 whatever the input dtype; ties go to the lower index (stable sorts).
"""

from __future__ import annotations

import math

import torch

from ..core.selection import keep_mask
from ..core.softmax import causal_probs


def observation_probs(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, n_obs: int, n_columns: int | None = None
) -> torch.Tensor:
    """Causal softmax of the last ``n_obs`` queries over the first ``n_columns`` keys.

    Args:
        queries: (H, m, d), the last m positions of a sequence of n = keys.shape[1] positions.
        keys: (G, n, d), H a multiple of G.
        n_columns: keys the softmax runs over (None: all n); query at position p sees keys <= p.
    Returns:
        (G, group, m_obs, n_columns) float32 with m_obs = min(n_obs, m); each row sums to 1.
    """
    m, n = queries.shape[1], keys.shape[1]
    n_columns = n if n_columns is None else n_columns
    m_obs = min(n_obs, m)
    # each query sees column 0, so every row sums to 1
    return causal_probs(queries[:, m - m_obs :], keys[:, :n_columns], scale, first_row=n - m_obs)


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring columns of each row, ties to the lower index.

    Args:
        scores: (G, n) float.
    Returns:
        (G, count) int64, ascending in each row.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[:, :count].sort(dim=-1).values


def fill_blocks(token_scores: torch.Tensor, block: int, count: int) -> torch.Tensor:
    """Whole blocks in decreasing total score until ``count`` tokens; the block that overflows is cut.

    Blocks of ``block`` tokens are laid from the first candidate (the last may be shorter). Blocks
    are ranked by the sum of their tokens' scores; each is taken whole while it fits, then the next
    one contributes its top remaining tokens by score, and the rest none.

    Args:
        token_scores: (G, n) float32 non-negative; count: 1 <= count <= n.
    Returns:
        (G, count) int64, ascending in each row.
    """
    n_kv, n = token_scores.shape
    n_blocks = math.ceil(n / block)
    padded = torch.nn.functional.pad(token_scores, (0, n_blocks * block - n))
    mass = padded.view(n_kv, n_blocks, block).sum(-1)  # (G, n_blocks)
    order = torch.argsort(mass, dim=-1, descending=True, stable=True)
    lengths = torch.full((n_blocks,), block, dtype=torch.int64, device=token_scores.device)
    lengths[-1] = n - block * (n_blocks - 1)
    ranked = lengths[order]  # (G, n_blocks) length of the block at each rank
    before = ranked.cumsum(-1) - ranked  # tokens taken by the better-ranked blocks
    taken = (count - before).clamp_min(0).minimum(ranked)  # tokens taken at each rank
    kept = keep_mask(token_scores, order, taken, block)  # (G, n) bool
    return kept.nonzero()[:, 1].view(n_kv, count)
