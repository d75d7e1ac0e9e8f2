"""``random``: a seeded uniformly random subset of the candidates (random token dropping)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoreMethod


@dataclass(frozen=True)
class RandomDrop(ScoreMethod):
    """Random token dropping, after Hou et al. 2022 ("Token Dropping for Efficient BERT
    Pretraining", ACL 2022), whose random-dropping baseline drops tokens uniformly at random: here
    a uniformly random ``budget``-subset of the candidates, the floor any informed method must beat.

    Adapted: the paper drops tokens in training; here the random subset is the kept key columns of
    a KV head at inference. The draw is seeded by ``seed``, the KV head, the number of candidates
    and the bytes of the row's last key, so it differs per (row, KV head) and per layer, is
    reproducible for the same inputs, and a batch row draws what it would draw alone.

    Options:
        seed: integer seed.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def scores(
        self, queries: torch.Tensor, keys: torch.Tensor, n_candidates: int, scale: float
    ) -> torch.Tensor:
        """(G, n_candidates): a seeded random permutation's ranks, so the top ``count`` are its first
        ``count`` entries, a uniformly random subset per KV head."""
        rows = []
        for g in range(keys.shape[0]):
            generator = torch.Generator().manual_seed(self.row_seed(g, n_candidates, keys[g, -1]))
            order = torch.randperm(n_candidates, generator=generator)
            rows.append(
                torch.empty(n_candidates).scatter_(0, order, -torch.arange(n_candidates, dtype=torch.float))
            )
        return torch.stack(rows).to(keys.device)

    def row_seed(self, kv_head: int, n_candidates: int, last_key: torch.Tensor) -> int:
        """A 63-bit seed from the options, the KV head, the row length and the row's last key (d,)."""
        digest = hashlib.blake2b(f"{self.seed}:{kv_head}:{n_candidates}:".encode(), digest_size=8)
        digest.update(last_key.float().cpu().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") >> 1
