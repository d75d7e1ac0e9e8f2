"""TCAConfig: the knobs of TCA-Attention, validated where they are made."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))


def _is_real(value: Any) -> bool:
    # bool is an int subclass, but tau=True is a mistake, not 1.0; numpy scalars are numbers.Real
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    # numpy integers (np.int64 from an array or a sweep) are numbers.Integral; np.bool_ is not
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# integer fields and their minimum
_INTEGER_MINIMUMS = {
    "block_size": 1,
    "local_window": 0,
    "candidates": 1,
    "observation_queries": 1,
    "pool_kernel": 1,
    "query_chunk": 1,
}


@dataclass(frozen=True)
class TCAConfig:
    """Hyper-parameters of TCA-Attention (paper defaults; see ``for_model`` for small models).

    Attributes:
        tau: retained-attention threshold in (0, 1]; calibration keeps, per KV head, the cheapest
            budget whose retained attention mass (averaged over prefill queries) is >= tau.
        block_size: tokens per block (b) for the redundancy score and per-rank budgets.
        local_window: tokens (w) every query always attends to: its own causal window. A query
            always sees itself, so 0 behaves like 1.
        alpha: weight of the redundancy term in the block score
            ``h_j = (1 - alpha) * mass_j + alpha * (1 - HHI_j)``, in [0, 1].
        candidates: number (M) of log-Gaussian budget configurations tried per head.
        observation_queries: how many of the last queries score importance. The paper uses the last
            one; 64 (decided here) reach back past the chat template into the question, which
            recovered needles TCA lost at 16 (docs/choices.md).
        pool_kernel: importance is max-pooled over this many neighbouring keys before blocks are
            scored (odd; 1 = off, the paper's rule), so a kept token brings its neighbours
            (SnapKV's pooling); it did not help SmolLM2's needles (docs/choices.md).
        observation_max: weight in [0, 1] of the strongest observation query in a key's importance:
            ``(1 - w) * mean + w * max`` over the observation queries (each a distribution over
            the candidates). 0 (default) is the mean; with 64 observation queries the mean lets the
            text before the question, and the attention sink, outweigh what the question reads.
        continuation: in [0, 1); a key's importance is at least ``continuation ** j`` times that of
            the key j positions before it, so the text after what the question points at (a value
            after its key: what an answer copies) ranks with it. 0 (default) is off.
        query_chunk: queries processed at once by the reference prefill and by calibration;
            bounds peak memory to O(query_chunk * L) per head.
        retrieval_threshold: a KV head whose retrieval score (``tca.retrieval``: attention a
            copied passage's queries put on its first copy, beyond the window) reaches this keeps
            every token; 0.03 decided here (docs/choices.md). None turns the detection off.
    """

    tau: float = 0.9
    block_size: int = 128
    local_window: int = 4096
    alpha: float = 0.5
    candidates: int = 14
    observation_queries: int = 64
    pool_kernel: int = 1
    observation_max: float = 0.0
    continuation: float = 0.0
    query_chunk: int = 256
    retrieval_threshold: float | None = 0.03

    def __post_init__(self) -> None:
        self._validate()
        # numpy scalars are stored as Python numbers, so that to_dict() / Profile.save are plain JSON
        for name in ("tau", "alpha", "observation_max", "continuation", "retrieval_threshold"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in _INTEGER_MINIMUMS:
            object.__setattr__(self, name, int(getattr(self, name)))

    def _validate(self) -> None:
        if not (_is_real(self.tau) and 0.0 < self.tau <= 1.0):
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}; 0.9 is the paper's default.")
        if not (_is_real(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}; 0.5 is the paper's default.")
        if not (_is_real(self.observation_max) and 0.0 <= self.observation_max <= 1.0):
            raise ValueError(f"observation_max must be in [0, 1], got {self.observation_max!r}; default 0.")
        if not (_is_real(self.continuation) and 0.0 <= self.continuation < 1.0):
            raise ValueError(f"continuation must be in [0, 1), got {self.continuation!r}; default 0 (off).")
        if self.retrieval_threshold is not None and not (
            _is_real(self.retrieval_threshold) and 0.0 < self.retrieval_threshold <= 1.0
        ):
            raise ValueError(
                f"retrieval_threshold must be in (0, 1] or None (off), got {self.retrieval_threshold!r}."
            )
        for name, minimum in _INTEGER_MINIMUMS.items():
            value = getattr(self, name)
            if not _is_integer(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")

    @property
    def effective_window(self) -> int:
        """The window actually attended: a query always attends to itself."""
        return max(self.local_window, 1)

    def replace(self, **changes: Any) -> TCAConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TCAConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown TCAConfig fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)

    @classmethod
    def for_model(cls, model_or_config: Any, **overrides: Any) -> TCAConfig:
        """Defaults scaled to a model's context length.

        Rule (decided here, measured in docs/choices.md): the local window is the model's
        context length / 16, rounded down to a power of two, within [64, 4096]; the block is
        window / 8 within [16, 128]. Llama-3.1 (128K) gets the paper's 4096 / 128; SmolLM2
        (8K) gets 512 / 64, where a 256-token window left perplexity 14% above dense at 4K.
        """
        config = getattr(model_or_config, "config", model_or_config)
        context = getattr(config, "max_position_embeddings", None)
        if not context:
            raise ValueError(
                f"cannot read max_position_embeddings from {type(config).__name__}; "
                "build TCAConfig(local_window=..., block_size=...) yourself."
            )
        window = min(4096, max(64, _power_of_two_at_most(context / 16)))
        block = min(128, max(16, window // 8))
        return cls(local_window=window, block_size=block, **overrides)
