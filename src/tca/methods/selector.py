"""Running a baseline method inside ``tca.apply``: the same run, ops, cache and statistics as TCA.

``MethodSelector(model, "snapkv", kept_fraction=0.3)`` is passed to ``tca.apply`` in place of a
profile. Every KV head of every layer keeps ``kept_fraction`` of each sequence's tokens, local
window included (``budget_for``), so methods compare at equal KV bytes; during decode each block
that leaves the window keeps the same fraction.

Decided here: the baselines' local window is the model's block size (64 tokens for SmolLM2, 128
for 128K-context models) rather than TCA's window (512 / 4096), so at small kept fractions the
budget is spent by each method's own rule instead of by the window.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.config import TCAConfig
from ..core.selection import Selection, pack_selection
from ..integrations.transformers.layout import head_layout
from . import get_method
from .base import SelectionMethod
from .budget import budget_for


class MethodSelector:
    """A baseline's selection at a fixed kept fraction, for ``tca.apply(model, selector)``."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str | SelectionMethod,
        kept_fraction: float,
        window: int | None = None,
        **options: Any,
    ):
        budget_for(kept_fraction, 1, 1)  # validates the fraction, naming it
        self.method = get_method(method, **options) if isinstance(method, str) else method
        self.kept_fraction = kept_fraction
        base = TCAConfig.for_model(model)
        self.config = base.replace(local_window=base.block_size if window is None else window)
        self.layout = head_layout(model)  # the KV heads this process holds (tensor parallel: a slice)
        keep = max(1, round(self.config.block_size * kept_fraction))
        self.decode_keep = [[keep] * self.layout.local_kv_heads for _ in range(self.layout.n_layers)]

    def select(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, key_start: torch.Tensor | None
    ) -> Selection:
        """Per row, the method's columns at the row's own budget: query (B, H, Lq, d), key (B, G, L, d)."""
        window = self.config.effective_window
        context_len = key.shape[2]
        rows = []
        for b in range(key.shape[0]):
            start = 0 if key_start is None else int(key_start[b])
            budget = budget_for(self.kept_fraction, context_len - start, window)
            starts = None if key_start is None else key_start[b : b + 1]
            one = self.method.select(query[b : b + 1], key[b : b + 1], budget, window, scale, starts)
            rows.append([one.indices[0, g, : int(one.counts[0, g])] for g in range(key.shape[1])])
        return pack_selection(rows, context_len, key.device)
