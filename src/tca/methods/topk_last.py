"""``topk_last``: exact top-k by the last query's attention, the single-query oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod
from .scoring import observation_probs


@dataclass(frozen=True)
class TopKLast(ScoreMethod):
    """Exact top-k of the last query's attention over the candidates.

    RetrievalAttention (Liu et al. 2024, "RetrievalAttention: Accelerating Long-Context LLM
    Inference via Vector Retrieval", arXiv 2409.10516) finds a query's most-attended keys by
    approximate nearest-neighbour search; this is the exact version, the accuracy oracle of any
    selection made from one query: the kept set maximises the last query's dense attention mass
    on the kept candidates.

    The softmax runs over all keys (the last query sees every key), not over the candidates only,
    and is summed over the KV head's query heads: that sum is exactly the retained dense mass, so
    the top-``budget`` columns are optimal for it (softmax over the candidates alone would weigh
    the group's heads differently and lose that optimality when a KV head serves several heads).
    """

    name: ClassVar[str] = "topk_last"

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates) the last query's attention, summed over the KV head's query heads."""
        probs = observation_probs(queries, keys, scale, 1)  # (G, group, 1, n)
        return probs[..., :n_candidates].sum(dim=(1, 2))
