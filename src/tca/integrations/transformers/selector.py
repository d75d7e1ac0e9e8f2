"""TCA's own selector: each KV head's budgets from a calibrated profile."""

from __future__ import annotations

from typing import Any

import torch

from ... import ops
from ...core.profile import Profile
from .cache import mean_keep_fraction
from .layout import head_layout


class ProfileSelector:
    """TCA's own selection (DESIGN 2.1): each KV head's budgets from a calibrated profile.

    A selector tells a ``TCARun`` which keys each head keeps: ``select`` at prefill (and at a new
    turn) and ``decode_keep`` (tokens kept of each block that leaves the window during decode).
    ``tca.methods.MethodSelector`` is the other kind, for the baselines.

    The profile covers the whole model (its fingerprint is checked against the model's global
    config); a selector serves the KV heads its process holds (``layout``), so under tensor
    parallelism each rank takes its own heads' budgets from the same profile.
    """

    def __init__(self, profile: Profile, model: torch.nn.Module):
        profile.check_fits(model)
        self.profile = profile
        self.config = profile.config
        self.layout = head_layout(model)
        held = list(self.layout.kv_heads)
        self._held = torch.tensor(held)
        block = self.config.block_size
        managed = {
            layer: [round(block * mean_keep_fraction(m, s)) for m, s in zip(mu, sigma, strict=True)]
            for layer, mu, sigma in zip(
                profile.managed_layers,
                profile.mu[:, held].tolist(),
                profile.sigma[:, held].tolist(),
                strict=True,
            )
        }
        # [layer][KV head held here]; a layer TCA does not manage keeps its own cache (entry unused)
        self.decode_keep = [managed.get(layer, [block] * len(held)) for layer in range(self.layout.n_layers)]

    def select(self, layer: int, query, key, scale: float, key_start) -> Any:
        """Kept keys of every (row, KV head): query (B, H, Lq, d), key (B, G, L, d) -> Selection."""
        mu, sigma = (config[self._held] for config in self.profile.head_config(layer))  # held heads
        observed = query[:, :, -self.config.observation_queries :]
        return ops.select(observed, key, mu, sigma, self.config, scale, key_start)
