"""Calibration of a transformers model (DESIGN 2.2): the dense passes that feed ``tca.core.calibration``.

One sequence serves ``tca.calibrate`` and the evaluation runner alike: ``measure_calibration``
makes the two forward passes (retention over the calibration text, the retrieval probe) once,
and ``Calibration.profile(tau)`` thresholds them into a Profile without another pass.

Under tensor parallelism every rank measures the KV heads it holds during the same sharded pass
(the measuring work splits with the heads), then the ranks gather the measurements, so every rank
builds the same whole-model Profile; the ``tca calibrate`` command writes it from rank 0 alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from ...core.budgets import candidate_grid
from ...core.calibration import (
    LayerRetention,
    calibration_ids,
    join_heads,
    layer_retention,
    profile_from_retention,
)
from ...core.config import TCAConfig
from ...core.profile import Profile
from ...core.retrieval import head_retrieval_scores, probe_ids
from .layer_pass import measure_layers
from .layout import HeadLayout, head_layout
from .registration import check_context, check_supported

T = TypeVar("T")


def _whole_model(layout: HeadLayout, per_layer: list[T], join: Callable[[list], T]) -> list[T]:
    """Per-layer measurements of this process's KV heads -> the whole model's (a collective when
    the heads are sharded: every rank gathers every rank's, then ``join`` merges them per layer)."""
    if not layout.sharded:
        return per_layer
    parts = layout.gather(per_layer)
    return [join([(heads, layers[i]) for heads, layers in parts]) for i in range(len(per_layer))]


def measure_retention(
    model: torch.nn.Module, input_ids: torch.Tensor, config: TCAConfig, progress: bool = True
) -> list[LayerRetention]:
    """One dense forward pass over ``input_ids`` (1, L), scoring every candidate in every managed
    layer (in their order)."""
    check_supported(model)
    check_context(model, input_ids.shape[-1])
    candidates = candidate_grid(config.candidates)

    def measure(query: torch.Tensor, key: torch.Tensor, scale: float) -> LayerRetention:
        return layer_retention(query, key, config, scale, candidates)

    layout = head_layout(model)
    progress = progress and layout.rank == 0
    retention = measure_layers(model, input_ids, measure, config, "calibrating layers", progress)
    return _whole_model(layout, retention, LayerRetention.join)


def measure_retrieval(
    model: torch.nn.Module, ids: torch.Tensor, config: TCAConfig, progress: bool = True
) -> np.ndarray:
    """Retrieval score of every (managed layer, KV head) from one forward pass over the probe
    (``tca.core.retrieval``). ids: (1, L) calibration tokens. Returns (n_managed, n_kv_heads) float64."""
    probe, start, passage = probe_ids(ids, config)

    def measure(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
        return head_retrieval_scores(query, key, start, passage, scale)

    layout = head_layout(model)
    progress = progress and layout.rank == 0
    scores = measure_layers(model, probe, measure, config, "finding retrieval heads", progress)
    scores = _whole_model(layout, scores, lambda parts: join_heads(parts, 0))
    return np.stack([s.double().numpy() for s in scores])


@dataclass
class Calibration:
    """What the calibration passes measured; ``profile(tau)`` thresholds it (no forward pass)."""

    model: Any
    config: TCAConfig
    text: str
    tokens: int
    retention: list[LayerRetention]
    retrieval: np.ndarray

    def profile(self, tau: float | None = None) -> Profile:
        """The Profile at ``tau`` (None: the configuration's tau)."""
        config = self.config if tau is None else self.config.replace(tau=tau)
        return profile_from_retention(
            self.retention, self.model, config, self.tokens, self.text, self.retrieval
        )


def measure_calibration(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    config: TCAConfig | None = None,
    max_tokens: int = 4096,
    progress: bool = True,
) -> Calibration:
    """Both calibration passes over ``text`` (None: the bundled calibration text), truncated to
    ``max_tokens`` tokens, with ``config`` (None: ``TCAConfig.for_model(model)``)."""
    from ...bundled.texts import calibration_text

    config = config or TCAConfig.for_model(model)
    text = calibration_text() if text is None else text
    ids = calibration_ids(tokenizer, text, config, max_tokens)
    retention = measure_retention(model, ids, config, progress)
    retrieval = measure_retrieval(model, ids, config, progress)
    return Calibration(model, config, text, ids.shape[-1], retention, retrieval)


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    config: TCAConfig | None = None,
    max_tokens: int = 4096,
    progress: bool = True,
) -> Profile:
    """Calibrate per-head budgets for ``model`` with one forward pass (DESIGN 2.2).

    Args:
        text: calibration text; None uses the bundled calibration text (``tca.bundled.texts``).
        config: None uses ``TCAConfig.for_model(model)``.
        max_tokens: the text is truncated to this many tokens.
    Returns:
        A Profile for this model.
    """
    return measure_calibration(model, tokenizer, text, config, max_tokens, progress).profile()
