"""``snapkv``: pooled attention of an observation window (SnapKV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod, require_int
from .scoring import observation_probs


@dataclass(frozen=True)
class SnapKV(ScoreMethod):
    """SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
    arXiv 2404.14469): the last ``observation`` queries vote for the prefix keys; votes are
    average-pooled so a kept token brings its neighbours; the top-``budget`` voted keys are kept.

    As in the paper, each observation query's softmax runs over all keys it can see (causal), and
    the candidate columns are then read off; votes are summed over the observation queries and,
    adapted to GQA, over the KV head's query heads (the paper selects per attention head). Pooling
    is 1-D averaging with stride 1 and zero padding counted in the average (the paper's
    ``avg_pool1d``). Adapted: the paper's observation window is also the kept recent window; here
    the two are separate (``observation`` queries vote; ``window`` is the given local window).

    Options:
        observation: observation queries (paper: 32 in its main runs).
        pool_kernel: odd pooling width (paper: 7).
    """

    name: ClassVar[str] = "snapkv"
    observation: int = 32
    pool_kernel: int = 7

    def __post_init__(self) -> None:
        require_int("observation", self.observation, 1)
        require_int("pool_kernel", self.pool_kernel, 1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}.")

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates) pooled votes."""
        probs = observation_probs(queries, keys, scale, self.observation)  # (G, group, m_obs, n)
        votes = probs[..., :n_candidates].sum(dim=(1, 2))  # (G, n_candidates)
        half = self.pool_kernel // 2
        pooled = torch.nn.functional.avg_pool1d(votes.unsqueeze(1), self.pool_kernel, 1, half)[:, 0]
        return pooled
