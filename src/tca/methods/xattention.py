"""``xattention``: key blocks scored by strided antidiagonal sums (XAttention)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod, require_int

GROUP_CHUNK = 256  # query stride groups scored at once: memory O(GROUP_CHUNK * n / stride) per head


@dataclass(frozen=True)
class XAttention(ScoreMethod):
    """XAttention (Xu et al. 2025, "XAttention: Block Sparse Attention with Antidiagonal Scoring",
    arXiv 2503.16428).

    Within each ``stride x stride`` tile of the attention matrix one antidiagonal is sampled: the
    tile of query group a and key group b scores ``sum_i q[s a + s - 1 - i] . k[s b + i]`` times
    ``scale / stride`` (the paper's reshaped-query trick, cost ``1 / stride`` of a full QK^T). Each
    query group's scores go through a softmax over the key groups it can see (``b <= a``, tile-level
    causality as in the paper, so the diagonal tile's sampled entries include a few later keys).
    All available queries score (the whole prefill for a fresh one), positions missing from a
    partial group count as zero vectors (the paper's zero padding).

    Adapted: the paper selects key blocks per query block up to a cumulative threshold; here a key
    block's score is its mass summed over every query block that can see it, and blocks are taken
    in decreasing score until the budget, the overflowing block cut to its top tokens. A token's
    score is its stride group's mass shared equally by the group's tokens, so within the cut block
    tokens go by their group's mass, then by position. Candidates are laid from the row's first key;
    a group straddling the window boundary lends its candidates its per-token share.

    Options:
        block: key block size (paper: 64... 128); stride: antidiagonal stride (paper: 8... 16).
    """

    name: ClassVar[str] = "xattention"
    keep_blocks: ClassVar[bool] = True
    block: int = 64
    stride: int = 8

    def __post_init__(self) -> None:
        require_int("block", self.block, 1)
        require_int("stride", self.stride, 1)

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates) each token's share of its stride group's antidiagonal mass."""
        mass = stride_group_mass(queries, keys, scale, self.stride)  # (G, n_groups)
        return mass.repeat_interleave(self.stride, dim=1)[:, :n_candidates] / self.stride


def stride_group_mass(queries: torch.Tensor, keys: torch.Tensor, scale: float, stride: int) -> torch.Tensor:
    """Strided-antidiagonal softmax mass of each key group, summed over query groups and the group's heads.

    Args:
        queries: (H, m, d) the last m of n positions; keys: (G, n, d).
    Returns:
        (G, ceil(n / stride)) float32.
    """
    n_heads, m, head_dim = queries.shape
    n_kv, n, _ = keys.shape
    n_groups = math.ceil(n / stride)
    padded = n_groups * stride
    k = keys.new_zeros(n_kv, padded, head_dim, dtype=torch.float32)
    k[:, :n] = keys.float()
    q = keys.new_zeros(n_heads, padded, head_dim, dtype=torch.float32)
    q[:, n - m : n] = queries.float()
    k_tiles = k.view(n_kv, 1, n_groups, stride * head_dim)  # group b: k[s b + i], i = 0 .. s-1
    q_tiles = q.view(n_heads, n_groups, stride, head_dim).flip(2)  # group a: q[s a + s - 1 - i]
    q_tiles = q_tiles.reshape(n_kv, n_heads // n_kv, n_groups, stride * head_dim)
    mass = torch.zeros(n_kv, n_groups, device=keys.device)
    for lo in range((n - m) // stride, n_groups, GROUP_CHUNK):
        hi = min(lo + GROUP_CHUNK, n_groups)
        logits = torch.matmul(q_tiles[:, :, lo:hi], k_tiles[:, :, :hi].transpose(-1, -2))  # (G, group, C, hi)
        logits = logits * (scale / stride)
        rows = torch.arange(lo, hi, device=keys.device).view(-1, 1)
        logits = logits.masked_fill(torch.arange(hi, device=keys.device) > rows, -math.inf)
        mass[:, :hi] += torch.softmax(logits, dim=-1).sum(dim=(1, 2))
    return mass
