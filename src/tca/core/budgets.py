"""The log-Gaussian family of per-rank token budgets (paper: Algorithm 1, decided here in detail).

A configuration ``(mu, sigma)`` is a curve over the relative rank ``x`` in (0, 1) (0 = highest
block score):

    keep(x) = P[X > x],   X ~ LogNormal(ln mu, sigma)

so the best blocks keep almost everything, blocks ranked past ``mu`` keep less and less, and
``sigma`` sets how gradual the fall is. The block at rank r of n keeps the curve's average over
its slice ``[r/n, (r+1)/n]`` of its tokens (closed form: ``E[min(X, c)]`` differences). Averaging,
rather than sampling at the slice's middle, keeps the total budget ``~ n_tokens * E[min(X, 1)]``
at every length: sampling gave a head 38 tokens at 4K and 3 at 2K. Budgets are relative to the
number of blocks, so one profile serves every context length. A KV head whose every candidate
fails tau is "dense" (``mu = inf``): it keeps all tokens.
"""

from __future__ import annotations

import math

import torch

DENSE = (math.inf, 1.0)


def candidate_grid(count: int) -> list[tuple[float, float]]:
    """``count`` (mu, sigma) pairs: mu log-spaced over [0.01, 0.8], two sharpness levels.

    Ordered from cheapest to most generous within each sigma.
    """
    sigmas = (0.3, 1.0) if count > 1 else (0.3,)
    per_sigma = math.ceil(count / len(sigmas))
    mus = torch.logspace(math.log10(0.01), math.log10(0.8), per_sigma, dtype=torch.float64).tolist()
    grid = [(mu, sigma) for sigma in sigmas for mu in mus]
    return grid[:count]


def rank_fractions(mu: torch.Tensor, sigma: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Fraction of tokens kept at each rank.

    Args:
        mu, sigma: (...,) configuration per head; ``mu = inf`` keeps everything.
    Returns:
        (..., n_blocks) float64 fractions in [0, 1], non-increasing along ranks.
    """
    mu = torch.as_tensor(mu, dtype=torch.float64).unsqueeze(-1)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).unsqueeze(-1)
    edges = torch.arange(n_blocks + 1, dtype=torch.float64) / max(n_blocks, 1)  # (n_blocks + 1,)
    finite_mu = torch.where(torch.isinf(mu), torch.ones_like(mu), mu)
    area = _expected_min(finite_mu, sigma, edges)  # (..., n_blocks + 1)
    fractions = (area[..., 1:] - area[..., :-1]) * n_blocks
    fractions = torch.cummin(fractions.clamp(0.0, 1.0), dim=-1).values  # exact monotonicity despite rounding
    return torch.where(torch.isinf(mu), torch.ones_like(fractions), fractions)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _expected_min(mu: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """E[min(X, c)] for X ~ LogNormal(ln mu, sigma): the integral of P[X > x] over [0, c]."""
    log_c = torch.log(c.clamp_min(1e-300))
    partial = mu * torch.exp(sigma**2 / 2) * _normal_cdf((log_c - torch.log(mu) - sigma**2) / sigma)
    return torch.where(
        c > 0, partial + c * (1 - _normal_cdf((log_c - torch.log(mu)) / sigma)), torch.zeros_like(partial)
    )


def block_budgets(fractions: torch.Tensor, block_lengths: torch.Tensor) -> torch.Tensor:
    """Tokens to keep in the block at each rank: ``round(fraction * length)`` (half up).

    Args:
        fractions: (..., n_blocks) from ``rank_fractions``.
        block_lengths: (..., n_blocks) lengths of the blocks in rank order.
    Returns:
        (..., n_blocks) int64 budgets, each in [0, length].
    """
    budgets = torch.floor(fractions * block_lengths.to(torch.float64) + 0.5).to(torch.int64)
    return torch.minimum(budgets, block_lengths.to(torch.int64))


def nominal_kept(mu: torch.Tensor, sigma: torch.Tensor, candidate_len: int, block_size: int) -> torch.Tensor:
    """Global tokens kept for ``candidate_len`` keys outside the window (blocks assumed full,
    the partial block at the last rank). Returns (...,) int64."""
    if candidate_len <= 0:
        return torch.zeros(torch.as_tensor(mu).shape, dtype=torch.int64)
    n_blocks = math.ceil(candidate_len / block_size)
    lengths = torch.full((n_blocks,), block_size, dtype=torch.int64)
    lengths[-1] = candidate_len - block_size * (n_blocks - 1)
    return block_budgets(rank_fractions(mu, sigma, n_blocks), lengths).sum(-1)


def mu_for_share(share: float, candidate_len: int, block_size: int, sigma: float = 1.0) -> float:
    """The ``mu`` whose nominal kept share of ``candidate_len`` candidates is ``share`` (bisection on
    log mu, at ``sigma``): how the benchmarks build uniform profiles at a target kept share."""
    lo, hi = math.log(1e-4), math.log(50.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        kept = int(nominal_kept(torch.tensor(math.exp(mid)), torch.tensor(sigma), candidate_len, block_size))
        lo, hi = (mid, hi) if kept < share * candidate_len else (lo, mid)
    return math.exp((lo + hi) / 2)
