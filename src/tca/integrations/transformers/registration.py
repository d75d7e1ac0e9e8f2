"""Registration with transformers: the attention function TCA puts in ``AttentionInterface``.

Nothing is patched at import and no model file is edited: ``attention_handler`` registers one
function under a name, switches the model's attention implementation to it for a ``with`` block
and restores it on exit (also after an exception). The function finds the handler (a ``TCARun``
or a calibration recorder) that owns the calling attention module.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...core.profile import FULL_ATTENTION, SLIDING_ATTENTION, layer_types, model_fingerprint, text_config
from .sliding import window_prefill

SUPPORTED_ARCHITECTURES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")
ATTENTION_NAME = "tca"
CALIBRATION_NAME = "tca-calibrate"

# attention module -> the object that handles its calls (a TCARun or a calibration recorder)
_HANDLERS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


class UnsupportedModelError(ValueError):
    """The model's architecture is not one TCA serves."""


class ContextTooLongError(ValueError):
    """The input is longer than the model's context limit."""


def check_supported(model: Any) -> None:
    """Raise UnsupportedModelError unless ``model`` is a causal LM of a supported family whose
    attention TCA can take over: full-attention layers (sliding-window ones are left alone), causal,
    without logit soft-capping."""
    architecture = model_fingerprint(model)["architecture"]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; "
            f"TCA serves {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    config = text_config(model)
    kinds = layer_types(model)
    unknown = sorted(set(kinds) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise UnsupportedModelError(
            f"this {architecture} model has {', '.join(map(repr, unknown))} layers; TCA serves models "
            "whose layers are full attention or sliding-window attention."
        )
    if FULL_ATTENTION not in kinds:
        raise UnsupportedModelError(
            f"every layer of this {architecture} model attends within a sliding window of "
            f"{getattr(config, 'sliding_window', None)} tokens, which TCA leaves as it is: there is no "
            "full-attention layer for it to manage."
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(
            f"this {architecture} model soft-caps its attention logits "
            f"(attn_logit_softcapping={config.attn_logit_softcapping}), which TCA's kernels do not do."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"this {architecture} model uses bidirectional attention; TCA serves causal decoders."
        )


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention modules, by layer index."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def key_start_from_mask(attention_mask: torch.Tensor | None, key_len: int) -> torch.Tensor | None:
    """First valid key per row from transformers' 4D mask (None: no padding).

    Raises ValueError for padding that is not on the left, and for a row that is all padding.
    """
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :key_len]  # the last query sees every valid key
    valid = last if last.dtype == torch.bool else last == 0  # an additive mask: 0 where seen
    empty = ~valid.any(-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"row(s) {rows} of the batch have no token (their attention_mask is all zeros): "
            "remove empty prompts from the batch."
        )
    start = valid.int().argmax(-1)
    positions = torch.arange(key_len, device=valid.device).view(1, -1)
    if not torch.equal(valid, positions >= start.view(-1, 1)):
        raise ValueError("TCA needs left padding: set tokenizer.padding_side = 'left'.")
    return start


def row_starts(key_start: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 first valid key per row on ``device`` (0 without padding)."""
    if key_start is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    return key_start.to(device, torch.int64)


def _tca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handler = _HANDLERS.get(module)
    if handler is None:  # a layer TCA does not manage: a sliding layer's prefill takes the window kernel
        window = kwargs.get("sliding_window")
        out = window_prefill(query, key, value, attention_mask, scaling, dropout, window)
        if out is not None:
            return out, None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return handler(module, query, key, value, attention_mask, scaling, **kwargs)


@contextlib.contextmanager
def attention_handler(
    model: torch.nn.Module, name: str, handler: Callable, layers: Collection[int] | None = None
) -> Iterator[None]:
    """Route the attention calls of ``model``'s ``layers`` (None: all) to ``handler`` inside the
    block; restore on exit. The other layers run transformers' own SDPA attention, with the
    arguments their module passes (a sliding layer's window mask and ``sliding_window``), except a
    sliding layer's prefill on a GPU, which takes the window kernel (``sliding.window_prefill``).

    A model whose attention is already routed (an ``apply`` or calibration block around this one)
    is a RuntimeError, raised before anything changes: the outer block keeps running as it was.
    """
    AttentionInterface.register(name, _tca_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    modules = attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"found no attention modules with q_proj in {type(model).__name__}.")
    if any(module in _HANDLERS for module in modules):
        raise RuntimeError(
            "this model already runs under tca.apply or tca.patch (or a calibration pass), and TCA runs "
            "do not nest: leave that `with` block or call tca.unpatch(model) first."
        )
    if layers is not None:
        modules = [module for module in modules if module.layer_idx in layers]
    previous = model.config._attn_implementation
    for module in modules:
        _HANDLERS[module] = handler
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        for module in modules:
            _HANDLERS.pop(module, None)
        model.set_attn_implementation(previous)


def check_context(model: torch.nn.Module, context_len: int) -> None:
    """Raise ContextTooLongError when ``context_len`` exceeds the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context_len > limit:
        raise ContextTooLongError(
            f"the context has {context_len} tokens but the model supports {limit} "
            "(max_position_embeddings); shorten or truncate the input."
        )
