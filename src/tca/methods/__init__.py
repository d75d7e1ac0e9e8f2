"""Baseline selection methods TCA is compared with: each keeps key columns per KV head.

Every method maps one layer's context to a ``Selection`` (kept candidates per batch row and KV
head, outside the local window), so all of them run on the same attention ops and cache.
``get_method(name, **options)`` builds one; ``METHODS`` lists the names.
"""

from __future__ import annotations

import dataclasses

from .base import RowMethod, SelectionMethod
from .budget import budget_for
from .flexprefill import FlexPrefill
from .full import Full
from .random_drop import RandomDrop
from .snapkv import SnapKV
from .streaming import Streaming
from .topk_last import TopKLast
from .vertical_slash import VerticalSlash
from .xattention import XAttention

_CLASSES = (Full, Streaming, SnapKV, VerticalSlash, FlexPrefill, XAttention, RandomDrop, TopKLast)
_REGISTRY: dict[str, type[RowMethod]] = {cls.name: cls for cls in _CLASSES}
METHODS: tuple[str, ...] = tuple(_REGISTRY)


def get_method(name: str, **options: object) -> SelectionMethod:
    """The method called ``name``, built with ``options`` (each method's docstring lists its options).

    Raises:
        ValueError: an unknown name (the message lists ``METHODS``), or an option the method does
            not take, or a bad option value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown selection method {name!r}; known methods: {', '.join(METHODS)}.")
    cls = _REGISTRY[name]
    accepted = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} takes options {accepted or 'none'}, got unknown {', '.join(unknown)}."
        )
    return cls(**options)


from .selector import MethodSelector  # noqa: E402  (needs get_method)

__all__ = ["METHODS", "MethodSelector", "SelectionMethod", "budget_for", "get_method"]
