"""``streaming``: attention sinks plus a longer recent window (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod, require_int


@dataclass(frozen=True)
class Streaming(ScoreMethod):
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453): keep the first ``sinks`` tokens (attention sinks) and the most recent ones.

    Adapted: the paper's cache is sinks + a rolling window; here the local window is given, so the
    budget buys the sinks (the first ``sinks`` candidates of the row) and the rest of it the
    candidates right before the window, i.e. a longer recent window. A budget below ``sinks`` keeps
    only the first ``budget`` tokens. Content-independent: the same for every KV head.

    Options:
        sinks: attention-sink tokens at the start of the row (paper: 4).
    """

    name: ClassVar[str] = "streaming"
    sinks: int = 4

    def __post_init__(self) -> None:
        require_int("sinks", self.sinks, 0)

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates): the sinks first (the first one highest), then the most recent."""
        position = torch.arange(n_candidates, device=keys.device, dtype=torch.float64)
        sink = position < self.sinks
        return torch.where(sink, 2.0 * n_candidates - position, position).expand(keys.shape[0], -1)
