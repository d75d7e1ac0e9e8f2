"""One dense forward pass that measures every layer's attention inputs (calibration's building block).

Each managed layer's attention call hands its query and key (after RoPE) to a measuring function,
then answers with dense causal attention streamed over query chunks (CPU SDPA with a mask would
form L x L per head). Layers TCA does not manage (sliding-window layers) run their window
attention (``registration``) and are not measured. No logits are formed: the pass exists for what
the layers see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ...core.config import TCAConfig
from ...ops.reference import dense_causal
from .layout import head_layout
from .registration import CALIBRATION_NAME, attention_handler


def measure_layers(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    measure: Callable[[torch.Tensor, torch.Tensor, float], Any],
    config: TCAConfig,
    desc: str,
    progress: bool = True,
) -> list[Any]:
    """``measure(query (H, L, d), key (G, L, d), scale)`` for every managed layer of a dense pass over
    ``input_ids`` (1, L); returns the results in the order of the managed layers
    (``head_layout(model).layers``)."""
    layers = head_layout(model).layers
    results: dict[int, Any] = {}
    bar = tqdm(total=len(layers), desc=desc, disable=not progress)

    def record(module, query, key, value, attention_mask, scaling, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        results[module.layer_idx] = measure(query[0], key[0], scale)
        bar.update(1)
        out = dense_causal(query, key, value, scale, query_chunk=config.query_chunk)
        return out.transpose(1, 2).contiguous(), None

    try:
        with torch.no_grad(), attention_handler(model, CALIBRATION_NAME, record, layers):
            model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)  # no (L, vocab)
    finally:
        bar.close()
    return [results[layer] for layer in layers]
