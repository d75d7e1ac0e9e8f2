"""Brute-force references written from DESIGN 2.1-2.5 and the docstrings, independently of ``tca``.

Plain Python loops and numpy float64; nothing here imports the code under test. Each function
states the rule it implements, so a failing comparison points at the rule, not at shared code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from seeds import fresh_seed  # noqa: F401  (tests import it from here too)


def softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    weights = np.exp(shifted)
    return weights / weights.sum()


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def keep_curve(x: float, mu: float, sigma: float) -> float:
    """P[X > x] for X ~ LogNormal(ln mu, sigma); 1 at x = 0."""
    if x <= 0:
        return 1.0
    return 0.5 * math.erfc((math.log(x) - math.log(mu)) / (sigma * math.sqrt(2.0)))


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)


def rank_fraction(rank: int, n_blocks: int, mu: float, sigma: float) -> float:
    """Fraction kept at ``rank``: the keep curve's average over the slice [rank / n, (rank + 1) / n].

    Numerical integration (Gauss-Legendre on pieces split where the curve bends, at mu * e^(k sigma)),
    not the closed form the library uses.
    """
    if math.isinf(mu):
        return 1.0
    lo, hi = rank / n_blocks, (rank + 1) / n_blocks
    bends = [mu * math.exp(k * sigma / 2) for k in range(-24, 25)]
    edges = [lo] + [e for e in bends if lo < e < hi] + [hi]
    total = 0.0
    for a, b in zip(edges, edges[1:], strict=False):
        for node, weight in zip(_NODES, _WEIGHTS, strict=True):
            total += weight * (b - a) / 2 * keep_curve((a + b) / 2 + node * (b - a) / 2, mu, sigma)
    return min(max(total * n_blocks, 0.0), 1.0)


@dataclass
class HeadSelection:
    kept: list[int]  # ascending, relative to the sequence's first valid key
    ranking: list[int]  # block indices, best first
    budgets: list[int]  # tokens kept by the block at each rank
    blocks: list[list[int]]  # candidate indices of each block
    margin: float  # smallest non-zero gap a float32 implementation could flip (inf: none)


def importance(
    queries: np.ndarray,
    keys: np.ndarray,
    kv_head: int,
    n_candidates: int,
    scale: float,
    observation_max: float = 0.0,
    continuation: float = 0.0,
) -> np.ndarray:
    """Softmax over the candidates, averaged over the KV head's query heads and observation queries;
    with ``observation_max`` w, ``(1 - w) * mean + w * max`` (the max renormalised); with
    ``continuation`` c, each key raised to c**j times the key j before it, then renormalised.

    queries: (H, n_obs, d); keys: (G, L, d). Query head h belongs to KV head h // (H / G).
    """
    n_heads, n_obs, _ = queries.shape
    group = n_heads // keys.shape[0]
    total, peak = np.zeros(n_candidates), np.zeros(n_candidates)
    for head in range(kv_head * group, (kv_head + 1) * group):
        for obs in range(n_obs):
            probs = softmax64(keys[kv_head, :n_candidates] @ queries[head, obs] * scale)
            total += probs
            peak = np.maximum(peak, probs)
    out = total / (group * n_obs)
    if observation_max > 0:
        out = (1 - observation_max) * out + observation_max * peak / peak.sum()
    if continuation > 0:
        held = [max(out[p - j] * continuation**j for j in range(p + 1)) for p in range(n_candidates)]
        out = np.array(held) / sum(held)
    return out


def select_head(
    queries: np.ndarray,
    keys: np.ndarray,
    kv_head: int,
    mu: float,
    sigma: float,
    block_size: int,
    local_window: int,
    alpha: float,
    scale: float,
    observation_max: float = 0.0,
    continuation: float = 0.0,
) -> HeadSelection:
    """DESIGN 2.1 for one KV head of one unpadded sequence, in float64 with plain loops (the
    importance options as ``TCAConfig``'s)."""
    context_len = keys.shape[1]
    n_candidates = context_len - max(local_window, 1)
    if n_candidates <= 0:
        return HeadSelection([], [], [], [], math.inf)
    probs = importance(queries, keys, kv_head, n_candidates, scale, observation_max, continuation)
    n_blocks = math.ceil(n_candidates / block_size)
    blocks = [list(range(j * block_size, min((j + 1) * block_size, n_candidates))) for j in range(n_blocks)]
    scores = []
    for members in blocks:
        mass = sum(probs[i] for i in members)
        squares = sum(probs[i] ** 2 for i in members)
        hhi = squares / mass**2 if mass > 0 else 1.0
        scores.append((1 - alpha) * mass * n_blocks + alpha * (1 - hhi))
    ranking = sorted(range(n_blocks), key=lambda j: (-scores[j], j))
    gaps = [abs(scores[a] - scores[b]) for a, b in zip(ranking, ranking[1:], strict=False)]
    kept, budgets = [], []
    for rank, block in enumerate(ranking):
        length = len(blocks[block])
        exact = rank_fraction(rank, n_blocks, mu, sigma) * length
        budget = min(round_half_up(exact), length)
        budgets.append(budget)
        gaps.append(abs(exact % 1.0 - 0.5))
        by_importance = sorted(blocks[block], key=lambda i: (-probs[i], i))
        kept += by_importance[:budget]
        if 0 < budget < length:
            last_in, first_out = probs[by_importance[budget - 1]], probs[by_importance[budget]]
            gaps.append((last_in - first_out) / last_in)
    nonzero = [gap for gap in gaps if gap > 0]
    return HeadSelection(sorted(kept), ranking, budgets, blocks, min(nonzero, default=math.inf))


def visibility(
    context_len: int, kept: list[int] | set[int], local_window: int, key_start: int = 0
) -> np.ndarray:
    """(L, L) bool: query j sees kept k <= j - w, its window (j - w, j], only keys >= key_start."""
    kept_set = set(kept)
    mask = np.zeros((context_len, context_len), dtype=bool)
    for j in range(context_len):
        for k in range(key_start, j + 1):
            mask[j, k] = (k in kept_set and k <= j - local_window) or k > j - local_window
    return mask


def masked_attention(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, masks: np.ndarray, scale: float
) -> np.ndarray:
    """softmax(q k^T * scale | mask) v in float64; rows with nothing visible give zeros.

    query: (B, H, L, d); key, value: (B, G, L, d); masks: (B, G, L, L). Head h uses KV head h // group.
    """
    batch, n_heads, context_len, head_dim = query.shape
    group = n_heads // key.shape[1]
    out = np.zeros((batch, n_heads, context_len, head_dim))
    for b in range(batch):
        for head in range(n_heads):
            kv = head // group
            scores = query[b, head] @ key[b, kv].T * scale
            for j in range(context_len):
                seen = masks[b, kv, j]
                if seen.any():
                    weights = softmax64(scores[j, seen])
                    out[b, head, j] = weights @ value[b, kv][seen]
    return out


def causal_masks(batch: int, n_kv: int, context_len: int) -> np.ndarray:
    return np.broadcast_to(
        np.tril(np.ones((context_len, context_len), dtype=bool)), (batch, n_kv, context_len, context_len)
    )


def brute_retention(query: np.ndarray, key: np.ndarray, scale: float, window: int):
    """From the full causal attention matrix A (per query head): over queries j >= w and the group's heads,
    base[g] = mean mass inside the window (j - w, j]; values[g, k] = mean A[j, k] over k <= j - w."""
    n_heads, context_len, _ = query.shape
    n_kv = key.shape[0]
    group = n_heads // n_kv
    n_candidates = context_len - window
    base, values = np.zeros(n_kv), np.zeros((n_kv, n_candidates))
    for head in range(n_heads):
        g = head // group
        scores = query[head] @ key[g].T * scale
        for j in range(window, context_len):
            row = softmax64(scores[j, : j + 1])
            base[g] += row[j - window + 1 :].sum()
            values[g, : j - window + 1] += row[: j - window + 1]
    rows = group * n_candidates
    return base / rows, values / rows
