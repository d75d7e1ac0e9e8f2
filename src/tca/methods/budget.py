"""The per-head budget that gives a target kept fraction of the context, local window included."""

from __future__ import annotations

import math
import numbers


def budget_for(kept_fraction: float, context_len: int, window: int) -> int:
    """Candidate tokens to keep so that ``(budget + min(window, L)) / L`` is ``kept_fraction``.

    The exact value ``kept_fraction * L - min(window, L)`` is rounded half up and clipped to
    ``[0, max(L - window, 0)]`` (the window alone may already exceed the fraction).

    Raises:
        ValueError: ``kept_fraction`` not in (0, 1], or ``context_len`` / ``window`` not integers
            >= 0 / >= 1.
    """
    if not (
        isinstance(kept_fraction, numbers.Real)
        and not isinstance(kept_fraction, bool)
        and 0.0 < kept_fraction <= 1.0
    ):
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction!r}.")
    for label, value, minimum in (("context_len", context_len, 0), ("window", window, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}.")
    exact = kept_fraction * context_len - min(window, context_len)
    return min(max(math.floor(exact + 0.5), 0), max(context_len - window, 0))
