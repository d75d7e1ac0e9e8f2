"""``flexprefill``: query-aware key blocks by attention mass (FlexPrefill)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod, require_int
from .scoring import observation_probs


@dataclass(frozen=True)
class FlexPrefill(ScoreMethod):
    """FlexPrefill's query-aware block selection (Lai et al. 2025, "FlexPrefill: A Context-Aware
    Sparse Attention Mechanism for Efficient Long-Sequence Inference", arXiv 2502.20766).

    The last ``block`` queries estimate each key block's attention mass: their causal softmax over
    the candidates, averaged over those queries and the KV head's query heads, summed per key block
    (blocks of ``block`` tokens laid from the row's first candidate). Blocks are taken in decreasing
    mass; the one that overflows the budget is cut to its top tokens by the same scores.

    Adapted: the paper stops at a cumulative-mass threshold gamma; here the budget stops it, for an
    equal-budget comparison. The paper estimates block mass from mean-pooled queries and keys; here
    it is the exact mean of the block's queries' softmax, summed per block (the quantity the pooled
    estimate approximates). The paper's per-head switch to a vertical-slash pattern (by a
    Jensen-Shannon test) is not made: every head uses the query-aware pattern
    (``vertical_slash`` is measured separately).

    Options:
        block: block size, and the number of last queries estimating the mass (paper: 64... 128).
    """

    name: ClassVar[str] = "flexprefill"
    keep_blocks: ClassVar[bool] = True
    block: int = 64

    def __post_init__(self) -> None:
        require_int("block", self.block, 1)

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates) the last ``block`` queries' mean causal softmax (blocks rank by its sum)."""
        probs = observation_probs(queries, keys, scale, self.block, n_candidates)  # (G, group, m_obs, n_cand)
        return probs.mean(dim=(1, 2))
