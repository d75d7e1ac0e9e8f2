"""The interface every baseline selection method meets, and the per-row driver they share.

A method maps one layer's context to the key columns each KV head keeps outside the local
window, so every baseline runs on the same attention ops and cache as TCA (``ops.reference``:
each query attends to the kept columns it can see plus its own window of ``window`` tokens).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from ..core.selection import Selection, pack_selection
from .scoring import fill_blocks, top_indices


class SelectionMethod(Protocol):
    """Selects, per (batch row, KV head), the kept columns among the candidates.

    The candidates of row ``b`` are the keys ``[start, L - window)`` with ``start = key_start[b]``
    (left padding; None = 0): the keys before the final local window.
    """

    name: str

    def select(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        budget: int,
        window: int,
        scale: float,
        key_start: torch.Tensor | None = None,
    ) -> Selection:
        """Kept columns; see ``RowMethod.select`` for the arguments and the result's layout."""
        ...


def check_arguments(query: torch.Tensor, key: torch.Tensor, budget: int, window: int) -> None:
    """ValueError unless the shapes and integers meet the ``SelectionMethod`` contract."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be 4-D, got {tuple(query.shape)} and {tuple(key.shape)}.")
    n_heads, q_len, head_dim = query.shape[1:]
    n_kv, context_len, key_dim = key.shape[1:]
    if query.shape[0] != key.shape[0] or head_dim != key_dim or n_heads % max(n_kv, 1) or n_kv == 0:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must share batch and head size, "
            "with query heads a multiple of KV heads."
        )
    if q_len > context_len:
        raise ValueError(f"query ({q_len}) cannot be longer than the context ({context_len}).")
    require_int("budget", budget, 0)
    require_int("window", window, 1)


def require_int(label: str, value: object, minimum: int) -> None:
    """ValueError unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}.")


class RowMethod:
    """Base of the methods here: each batch row is selected on its own valid part.

    Subclasses implement ``select_row`` for one unpadded sequence; ``select`` handles left padding,
    queries shorter than the context and the packing, so a batch equals separate batch-1 runs.
    """

    name: ClassVar[str] = ""

    def select(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        budget: int,
        window: int,
        scale: float,
        key_start: torch.Tensor | None = None,
    ) -> Selection:
        """Kept columns per (batch row, KV head).

        Args:
            query: (B, H, Lq, d) prefill queries after RoPE, the last Lq positions of the context.
            key: (B, G, L, d) all keys; query head i uses KV head i // (H / G).
            budget: tokens kept per (row, KV head) among the candidates.
            window: the local window w >= 1; the candidates of a row are ``[start, L - w)``.
            scale: softmax scale of the logits.
            key_start: (B,) first valid key per row (left padding); None means 0.
        Returns:
            A ``Selection``: ``counts = min(budget, n_candidates)`` per (row, KV head) (``full``
            keeps every candidate), indices ascending in ``[start, L - w)``, padded with L.
        """
        check_arguments(query, key, budget, window)
        batch, n_kv, context_len, _ = key.shape
        empty = torch.empty(0, dtype=torch.int64, device=key.device)
        rows: list[list[torch.Tensor]] = []
        for b in range(batch):
            start = 0 if key_start is None else int(key_start[b])
            n_keys = context_len - start
            n_candidates = max(0, n_keys - window)
            count = self.row_count(budget, n_candidates)
            if count == 0:
                rows.append([empty] * n_kv)
                continue
            observed = query[b, :, max(0, query.shape[2] - n_keys) :]  # padding never observes
            kept = self.select_row(observed, key[b, :, start:], count, n_candidates, scale)  # (G, count)
            rows.append(list(kept.to(key.device) + start))
        return pack_selection(rows, context_len, key.device)

    def row_count(self, budget: int, n_candidates: int) -> int:
        """Tokens kept by a row with ``n_candidates`` candidates: ``min(budget, n_candidates)``."""
        return min(budget, n_candidates)

    def select_row(
        self, queries: torch.Tensor, keys: torch.Tensor, count: int, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """Kept candidates of one unpadded sequence.

        Args:
            queries: (H, m, d) its queries, the last m of its n positions; keys: (G, n, d).
            count: tokens to keep per KV head, 1 <= count <= n_candidates.
        Returns:
            (G, count) int64, ascending in each row, all < n_candidates.
        """
        raise NotImplementedError


class ScoreMethod(RowMethod):
    """A method that is a score per candidate key (kvpress's ``ScorerPress`` idea): ``scores`` is all
    a subclass writes; keeping is shared. By default the top ``count`` candidates of each KV head
    (ties to the lower index); with ``keep_blocks``, whole blocks of ``self.block`` candidates in
    decreasing total score, the block that overflows the budget cut to its best tokens.

    The decode-time policy (which tokens of a block leaving the window stay) is the cache's, the
    same for every method (``tca.integrations.transformers.policy``).
    """

    keep_blocks: ClassVar[bool] = False

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates) float: higher is kept first. Arguments as in ``select_row``."""
        raise NotImplementedError

    def select_row(
        self, queries: torch.Tensor, keys: torch.Tensor, count: int, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """The ``count`` best candidates per KV head by ``scores`` (or best blocks): (G, count)."""
        scores = self.scores(queries, keys, n_candidates, scale)
        if self.keep_blocks:
            return fill_blocks(scores, self.block, count)
        return top_indices(scores, count)
