"""``streaming``: attention sinks plus a longer recent window (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import RowMethod, require_int


@dataclass(frozen=True)
class Streaming(RowMethod):
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

    def select_row(
        self, queries: torch.Tensor, keys: torch.Tensor, count: int, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, count): ``0 .. sinks - 1`` then the last ``count - sinks`` candidates."""
        sinks = min(self.sinks, count)
        recent = count - sinks
        sink_columns = torch.arange(sinks, device=keys.device)
        recent_columns = torch.arange(n_candidates - recent, n_candidates, device=keys.device)
        return torch.cat([sink_columns, recent_columns]).expand(keys.shape[0], -1)
