"""Online core-context selection (DESIGN 2.1): which keys outside the local window each KV head keeps.

Per sequence and KV head: importance of every candidate key (the keys before the final local
window) from the last query's softmax, blocks of ``block_size`` scored by mass and
Herfindahl-Hirschman index, blocks ranked, each block given the budget of its rank, and the
top-``budget`` tokens of each block kept. Ties are broken towards the lower index everywhere
(stable sorts), so kernels can reproduce the reference exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .budgets import block_budgets, rank_fractions
from .config import TCAConfig


@dataclass
class Selection:
    """Kept key indices per (batch, KV head).

    Attributes:
        indices: (B, G, K) int64, ascending within a row; rows shorter than K are padded with
            ``context_len`` (an index no query can see, so kernels need no separate mask).
        counts: (B, G) int64, valid entries per row.
        context_len: L, the number of keys the selection was made over.
        head_bounds: per KV head, a host-side upper bound of its counts over the rows (None: not
            known without reading ``counts`` from the device).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    context_len: int
    head_bounds: list[int] | None = None


def candidate_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    pool_kernel: int = 1,
    observation_max: float = 0.0,
    continuation: float = 0.0,
) -> torch.Tensor:
    """Importance of each candidate key for each KV head.

    Args:
        queries: (H, n_obs, d) the observation queries (the last query by default).
        keys: (G, n, d) the candidate keys; H must be a multiple of G (GQA).
        pool_kernel, observation_max, continuation: as ``TCAConfig``'s fields (their defaults: off).
    Returns:
        (G, n) float32, each row a probability distribution: the softmax over the candidates,
        averaged over the group's query heads and the observation queries (with
        ``observation_max`` w: ``(1 - w) * mean + w * max`` over them, the max renormalised); with
        ``pool_kernel > 1``, max-pooled over that many neighbours, and with ``continuation`` c,
        each key raised to ``c ** j`` times the key j before it; renormalised after each.
    """
    n_heads, n_obs, head_dim = queries.shape
    n_kv = keys.shape[0]
    group = n_heads // n_kv
    q = queries.float().reshape(n_kv, group * n_obs, head_dim)  # (G, group*n_obs, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # (G, group*n_obs, n)
    probs = torch.softmax(logits, dim=-1)
    importance = probs.mean(dim=1)
    if observation_max > 0:
        importance = (1 - observation_max) * importance + observation_max * _normalised(probs.amax(dim=1))
    if pool_kernel > 1:
        pooled = torch.nn.functional.max_pool1d(importance.unsqueeze(0), pool_kernel, 1, pool_kernel // 2)[0]
        importance = _normalised(pooled[:, : importance.shape[-1]])
    if continuation > 0:
        importance = _normalised(forward_hold(importance, continuation))
    return importance


def forward_hold(values: torch.Tensor, decay: float) -> torch.Tensor:
    """``out[..., p] = max over j <= p of values[..., p - j] * decay ** j`` (values >= 0), in
    log2(n) doubling steps: after the step of shift s each entry holds the max over j < 2s."""
    out, shift, factor = values, 1, decay
    while shift < values.shape[-1] and factor > 0:
        out = torch.maximum(out, torch.nn.functional.pad(out[..., :-shift], (shift, 0)) * factor)
        shift, factor = shift * 2, factor * factor
    return out


def _normalised(values: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum (rows of non-negative values)."""
    return values / values.sum(-1, keepdim=True)


def importance_options(config: TCAConfig) -> tuple[int, float, float]:
    """``candidate_importance``'s options from a config: pool_kernel, observation_max, continuation."""
    return config.pool_kernel, config.observation_max, config.continuation


def plain_importance(config: TCAConfig) -> bool:
    """Whether importance is the plain mean over the observation queries (no option on): the one the
    fused selection kernel computes."""
    return importance_options(config) == (1, 0.0, 0.0)


def block_scores(importance: torch.Tensor, block_size: int, alpha: float) -> torch.Tensor:
    """(G, n_blocks) float32 block scores ``h_j`` of ``rank_blocks`` from importance (G, n)."""
    n_kv, n = importance.shape
    n_blocks = math.ceil(n / block_size)
    padded = torch.nn.functional.pad(importance, (0, n_blocks * block_size - n))
    blocks = padded.view(n_kv, n_blocks, block_size)  # (G, n_blocks, b)
    mass = blocks.sum(-1)  # (G, n_blocks)
    squares = blocks.square().sum(-1)
    hhi = torch.where(mass > 0, squares / mass.square().clamp_min(1e-30), torch.ones_like(mass))
    return (1.0 - alpha) * mass * n_blocks + alpha * (1.0 - hhi)


def rank_blocks(importance: torch.Tensor, block_size: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scores ``h_j = (1 - alpha) * mass_j + alpha * (1 - HHI_j)`` and the ranking they give.

    ``mass_j`` is the block's importance relative to an average block (``S_j * n_blocks``,
    decided here so both terms are of order one); ``HHI_j = sum s^2 / S_j^2`` (1 for a block
    with no mass).

    Args:
        importance: (G, n) from ``candidate_importance``.
    Returns:
        order: (G, n_blocks) int64, block indices from the highest score down.
        lengths: (n_blocks,) int64 block lengths (the last block may be partial).
    """
    n = importance.shape[-1]
    n_blocks = math.ceil(n / block_size)
    order = torch.argsort(-block_scores(importance, block_size, alpha), dim=-1, stable=True)
    lengths = torch.full((n_blocks,), block_size, dtype=torch.int64, device=importance.device)
    lengths[-1] = n - block_size * (n_blocks - 1)
    return order, lengths


def keep_mask(
    importance: torch.Tensor, order: torch.Tensor, budgets: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Keep the top-``budget`` tokens of each block by importance.

    Args:
        importance: (G, n); order: (G, n_blocks) from ``rank_blocks``;
        budgets: (..., G, n_blocks) int64 tokens kept by the block at each rank.
    Returns:
        (..., G, n) bool mask of kept candidates.
    """
    n_kv, n = importance.shape
    n_blocks = order.shape[-1]
    padded = torch.nn.functional.pad(importance, (0, n_blocks * block_size - n), value=-math.inf)
    blocks = padded.view(n_kv, n_blocks, block_size)
    within = torch.argsort(blocks, dim=-1, descending=True, stable=True)
    position = torch.argsort(within, dim=-1)  # (G, n_blocks, b): rank of each token in its block
    budget_of_block = torch.empty_like(budgets)
    budget_of_block.scatter_(-1, order.expand_as(budgets), budgets)
    kept = position < budget_of_block.unsqueeze(-1)  # (..., G, n_blocks, b)
    return kept.flatten(-2)[..., :n]


def valid_part(
    query: torch.Tensor, key: torch.Tensor, row: int, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row``'s observation queries and keys from its first valid key ``start`` on: (H, n, d)
    and (G, L - start, d); a padding position never observes."""
    observed = query[row, :, max(0, query.shape[2] - (key.shape[2] - start)) :]
    return observed, key[row, :, start:]


def sequence_importance(
    queries: torch.Tensor, keys: torch.Tensor, config: TCAConfig, scale: float
) -> torch.Tensor | None:
    """(G, n) importance of one sequence's candidates (its keys before the final window), with the
    config's options; None when it has none. queries (H, n_obs, d); keys (G, L, d)."""
    n_candidates = keys.shape[1] - config.effective_window
    if n_candidates <= 0:
        return None
    return candidate_importance(queries, keys[:, :n_candidates], scale, *importance_options(config))


def select_sequence(
    queries: torch.Tensor,
    keys: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    config: TCAConfig,
    scale: float,
) -> list[torch.Tensor]:
    """Selection for one sequence without padding.

    Args:
        queries: (H, n_obs, d); keys: (G, L, d); mu, sigma: (G,) the head configurations.
    Returns:
        G ascending int64 tensors of kept indices, all < L - effective window.
    """
    importance = sequence_importance(queries, keys, config, scale)
    if importance is None:
        return [torch.empty(0, dtype=torch.int64, device=keys.device) for _ in range(keys.shape[0])]
    order, lengths = rank_blocks(importance, config.block_size, config.alpha)
    fractions = rank_fractions(mu.cpu(), sigma.cpu(), order.shape[-1]).to(keys.device)  # (G, n_blocks)
    budgets = block_budgets(fractions, lengths[order])
    kept = keep_mask(importance, order, budgets, config.block_size)
    return [row.nonzero().squeeze(-1) for row in kept]


def select(
    query: torch.Tensor,
    key: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    config: TCAConfig,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> Selection:
    """Kept indices for a batch (left padding allowed).

    Args:
        query: (B, H, n_obs, d) observation queries (the last ``config.observation_queries``).
        key: (B, G, L, d) all keys of the context.
        mu, sigma: (G,) head configurations of this layer (``mu = inf`` keeps everything).
        key_start: (B,) first valid (non-padding) key per row; None means 0. Each sequence is
            selected on its own valid part, so a batch equals separate batch-1 runs.
    Returns:
        A ``Selection`` in the batch's index space.
    """
    batch, n_kv, context_len, _ = key.shape
    rows: list[list[torch.Tensor]] = []
    for b in range(batch):
        start = 0 if key_start is None else int(key_start[b])
        kept = select_sequence(*valid_part(query, key, b, start), mu, sigma, config, scale)
        rows.append([indices + start for indices in kept])
    return pack_selection(rows, context_len, key.device)


def nothing_kept(batch: int, n_kv: int, context_len: int, device: torch.device) -> Selection:
    """A selection that keeps no key outside the window: window-only (sliding-window) attention."""
    return Selection(
        indices=torch.empty(batch, n_kv, 0, dtype=torch.int64, device=device),
        counts=torch.zeros(batch, n_kv, dtype=torch.int64, device=device),
        context_len=context_len,
        head_bounds=[0] * n_kv,
    )


def pack_selection(rows: list[list[torch.Tensor]], context_len: int, device: torch.device) -> Selection:
    """Pad per-(batch, KV head) index lists into a ``Selection``."""
    lengths = [[len(r) for r in row] for row in rows]
    counts = torch.tensor(lengths, dtype=torch.int64, device=device)
    width = int(counts.max()) if counts.numel() else 0
    bounds = [max(column) for column in zip(*lengths, strict=True)] if rows else []
    indices = torch.full(
        (len(rows), len(rows[0]) if rows else 0, width), context_len, dtype=torch.int64, device=device
    )
    for b, row in enumerate(rows):
        for g, kept in enumerate(row):
            indices[b, g, : len(kept)] = kept
    return Selection(indices=indices, counts=counts, context_len=context_len, head_bounds=bounds)
