"""``vertical_slash``: vertical and slash lines estimated from the last queries (MInference)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import RowMethod, require_int
from .scoring import observation_probs, top_indices


@dataclass(frozen=True)
class VerticalSlash(RowMethod):
    """MInference's vertical-slash pattern (Jiang et al. 2024, "MInference 1.0: Accelerating
    Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", arXiv 2407.02490).

    The last ``observation`` queries' causal softmax over all keys (summed over the KV head's
    query heads) gives a vertical score per column (its mass) and a slash score per diagonal
    offset ``o = query position - key position`` (the mass along that diagonal).

    Adapted: MInference computes attention on whole diagonals; a selection here can only keep
    columns, so a slash becomes the one column its diagonal hits for the last query (offset o ->
    column n - 1 - o). The slashes inside the local window (offsets < window) are the window
    itself, which MInference also always keeps; its forced first 30 columns are not forced here
    (the sinks win on vertical mass anyway). The budget is shared: ``round(vertical_fraction *
    budget)`` top verticals, then the slash columns by diagonal mass, skipping columns already
    kept, until the budget is met.

    Options:
        observation: queries estimating the pattern (paper: the last 64).
        vertical_fraction: share of the budget given to vertical lines, in [0, 1].
    """

    name: ClassVar[str] = "vertical_slash"
    observation: int = 64
    vertical_fraction: float = 0.5

    def __post_init__(self) -> None:
        require_int("observation", self.observation, 1)
        if not (isinstance(self.vertical_fraction, (int, float)) and 0.0 <= self.vertical_fraction <= 1.0):
            raise ValueError(f"vertical_fraction must be in [0, 1], got {self.vertical_fraction!r}.")

    def select_row(
        self, queries: torch.Tensor, keys: torch.Tensor, count: int, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, count): top verticals, then slash columns by diagonal mass."""
        probs = observation_probs(queries, keys, scale, self.observation).sum(1)  # (G, m_obs, n)
        vertical = probs[..., :n_candidates].sum(1)  # (G, n_candidates)
        slash = diagonal_mass(probs).flip(-1)[:, :n_candidates]  # column c <- offset n - 1 - c
        n_vertical = min(count, math.floor(count * self.vertical_fraction + 0.5))
        verticals = top_indices(vertical, n_vertical)
        taken = torch.zeros_like(slash, dtype=torch.bool).scatter_(1, verticals, True)
        slashes = top_indices(slash.masked_fill(taken, -math.inf), count - n_vertical)
        return torch.cat([verticals, slashes], dim=1).sort(dim=1).values


def diagonal_mass(probs: torch.Tensor) -> torch.Tensor:
    """Attention mass along each diagonal offset.

    Args:
        probs: (G, m, n) causal attention of the last m of n positions (zero above the diagonal).
    Returns:
        (G, n): entry o sums ``probs[:, i, p_i - o]`` over the queries, p_i = n - m + i.
    """
    n_kv, m, n = probs.shape
    positions = torch.arange(n - m, n, device=probs.device).view(-1, 1)
    offsets = (positions - torch.arange(n, device=probs.device).view(1, -1)).clamp_min(0)  # (m, n)
    mass = torch.zeros(n_kv, n, device=probs.device)
    # entries above the diagonal are exact zeros, so clamping their offsets to 0 adds nothing
    return mass.scatter_add_(1, offsets.reshape(1, -1).expand(n_kv, -1), probs.reshape(n_kv, -1))
