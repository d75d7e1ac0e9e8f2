"""``full``: every candidate kept, the dense reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod


@dataclass(frozen=True)
class Full(ScoreMethod):
    """Dense attention expressed as a selection: every candidate column is kept.

    No paper: this is the dense reference the sparse methods are measured against. It ignores
    the budget (``counts = n_candidates``), so with the local window every query sees every
    earlier key, exactly causal attention.
    """

    name: ClassVar[str] = "full"

    def row_count(self, budget: int, n_candidates: int) -> int:
        """Every candidate, whatever the budget."""
        return n_candidates

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates) zeros: every candidate is kept anyway."""
        return torch.zeros(keys.shape[0], n_candidates, device=keys.device)
