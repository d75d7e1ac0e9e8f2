"""Offline head-specific calibration (DESIGN 2.2, paper Algorithm 1) -> a Profile.

One forward pass of the unmodified model over calibration text, and one over a short
retrieval probe built from it (``tca.retrieval``: heads that copy from far back keep every
token). In each layer, for every KV
head and each log-Gaussian candidate, the selection of 2.1 is simulated (the last query ranks
the blocks) and its retained attention mass measured: the dense attention mass that prefill
queries place on what TCA would let them see (the kept keys before their window, plus their
window), averaged over the queries that have keys outside their window and over the group's
query heads. That quantity is linear in the kept set, so one streamed pass accumulates, per
key, the mass it receives (``values``), and every candidate and the oracle are scored from it.
No L x L matrix is formed: queries are streamed in chunks of ``config.query_chunk``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import __version__
from .budgets import DENSE, block_budgets, candidate_grid, rank_fractions
from .config import TCAConfig
from .profile import Profile, model_fingerprint
from .selection import candidate_importance, importance_options, keep_mask, rank_blocks
from .softmax import causal_prob_chunks

TOLERANCE = 1e-6


@dataclass
class LayerRetention:
    """Retention statistics of one layer on the calibration text.

    Attributes:
        base: (G,) mean attention mass inside the queries' own windows.
        values: (G, n) mean mass each candidate key receives from queries that see it outside
            their window.
        retained: (M, G) retained mass of each candidate configuration.
        kept: (M, G) global tokens each candidate keeps.
    """

    base: torch.Tensor
    values: torch.Tensor
    retained: torch.Tensor
    kept: torch.Tensor

    def oracle_tokens(self, tau: float) -> np.ndarray:
        """(G,) fewest global tokens whose retained mass reaches tau (greedy on ``values``)."""
        ordered = torch.sort(self.values.double(), dim=-1, descending=True).values
        reach = self.base.double().unsqueeze(-1) + torch.cumsum(ordered, -1)
        short = reach < tau - TOLERANCE  # (G, n) True while tau is not yet reached
        need = short.sum(-1)
        need = torch.where(self.base.double() >= tau - TOLERANCE, torch.zeros_like(need), need + 1)
        return need.clamp_max(self.values.shape[-1]).numpy()

    @classmethod
    def join(cls, parts: Sequence[tuple[Sequence[int], LayerRetention]]) -> LayerRetention:
        """One layer's retention over all KV heads from parts over disjoint heads (each with the
        global KV heads it covers: tensor-parallel ranks measure their own heads)."""
        return cls(
            base=join_heads([(kv, p.base) for kv, p in parts], 0),
            values=join_heads([(kv, p.values) for kv, p in parts], 0),
            retained=join_heads([(kv, p.retained) for kv, p in parts], 1),
            kept=join_heads([(kv, p.kept) for kv, p in parts], 1),
        )


def join_heads(parts: Sequence[tuple[Sequence[int], torch.Tensor]], dim: int) -> torch.Tensor:
    """Tensors over disjoint KV heads (along ``dim``), each with its global heads -> one tensor in
    global head order. The heads must be each of 0..G-1 exactly once."""
    heads = [g for kv_heads, _ in parts for g in kv_heads]
    if sorted(heads) != list(range(len(heads))):
        raise ValueError(f"the parts cover KV heads {sorted(heads)}, not each of {len(heads)} once.")
    joined = torch.cat([tensor for _, tensor in parts], dim)
    return joined.index_select(dim, torch.tensor(heads).argsort().to(joined.device))


def window_and_outside_mass(query: torch.Tensor, key: torch.Tensor, window: int, scale: float, chunk: int):
    """Stream the dense causal softmax of queries ``j >= window`` in chunks.

    Args:
        query: (H, L, d); key: (G, L, d).
    Returns:
        base: (G,) summed window mass; outside: (G, L - window) summed mass per key from
        queries that see it outside their window; count: number of (query, head) rows summed.
    """
    n_kv, context_len = key.shape[0], key.shape[1]
    group = query.shape[0] // n_kv
    n_candidates = context_len - window
    base = torch.zeros(n_kv, dtype=torch.float64)
    outside = torch.zeros(n_kv, n_candidates, dtype=torch.float64)
    for lo, hi, probs in causal_prob_chunks(query, key, scale, chunk, start=window):  # (G, group, C, hi)
        rows = torch.arange(lo, hi, device=query.device).view(-1, 1)
        cols = torch.arange(hi, device=query.device).view(1, -1)
        in_window = cols > rows - window
        base += (probs * in_window).sum((1, 2, 3)).double().cpu()
        seen_outside = probs.masked_fill(in_window, 0.0)[..., :n_candidates]
        outside[:, : seen_outside.shape[-1]] += seen_outside.sum((1, 2)).double().cpu()
    return base, outside, group * n_candidates


def layer_retention(
    query: torch.Tensor,
    key: torch.Tensor,
    config: TCAConfig,
    scale: float,
    candidates: list[tuple[float, float]],
) -> LayerRetention:
    """Retention of every candidate for one layer of one sequence (query (H, L, d), key (G, L, d))."""
    window = config.effective_window
    base, outside, rows = window_and_outside_mass(query, key, window, scale, config.query_chunk)
    base, values = base / rows, outside / rows
    n_candidates = key.shape[1] - window
    observed = query[:, -config.observation_queries :]
    importance = candidate_importance(observed, key[:, :n_candidates], scale, *importance_options(config))
    order, lengths = rank_blocks(importance, config.block_size, config.alpha)
    mu = torch.tensor([c[0] for c in candidates], dtype=torch.float64).view(-1, 1)
    sigma = torch.tensor([c[1] for c in candidates], dtype=torch.float64).view(-1, 1)
    fractions = rank_fractions(mu.expand(-1, key.shape[0]), sigma.expand(-1, key.shape[0]), order.shape[-1])
    budgets = block_budgets(fractions, lengths[order].cpu())  # (M, G, n_blocks)
    kept = keep_mask(importance.cpu(), order.cpu(), budgets, config.block_size)  # (M, G, n)
    retained = base + (kept.double() * values).sum(-1)
    return LayerRetention(base=base, values=values, retained=retained, kept=kept.sum(-1))


def choose_heads(retention: list[LayerRetention], candidates: list[tuple[float, float]], tau: float):
    """Per (managed layer, KV head), the candidate keeping the fewest tokens with retained mass >= tau.

    ``retention``: one entry per managed layer. Returns arrays (n_managed, G): mu, sigma, retained,
    kept_tokens, oracle_tokens. A head with no passing candidate keeps everything (``mu = inf``;
    retained 1).
    """
    n_layers, n_kv = len(retention), retention[0].base.shape[0]
    out = {
        name: np.zeros((n_layers, n_kv))
        for name in ("mu", "sigma", "retained", "kept_tokens", "oracle_tokens")
    }
    for layer, stats in enumerate(retention):
        passing = stats.retained >= tau - TOLERANCE  # (M, G)
        cost = torch.where(passing, stats.kept.double(), torch.full_like(stats.kept.double(), math.inf))
        best = cost.argmin(0)
        for head in range(n_kv):
            choice = int(best[head])
            if passing[choice, head]:
                mu, sigma = candidates[choice]
                retained, kept = float(stats.retained[choice, head]), float(stats.kept[choice, head])
            else:
                (mu, sigma), retained, kept = DENSE, 1.0, float(stats.values.shape[-1])
            out["mu"][layer, head], out["sigma"][layer, head] = mu, sigma
            out["retained"][layer, head], out["kept_tokens"][layer, head] = retained, kept
        out["oracle_tokens"][layer] = stats.oracle_tokens(tau)
    return out


def calibration_ids(tokenizer: Any, text: str, config: TCAConfig, max_tokens: int) -> torch.Tensor:
    """Tokenize and truncate the calibration text; (1, L) int64. Too short a text is an error.

    A tokenizer that starts every text with its BOS token by default (Gemma's ``<bos>``; SmolLM2's
    does not) gets it here too: the model is calibrated on text as it reads documents.
    """
    prefix = text[
        : 32 * max_tokens
    ]  # a token is rarely over 32 characters; a 400 KB text needs no full encoding
    ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if leads_with_bos(tokenizer):
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]], dtype=ids.dtype), ids], -1)
    needed = config.effective_window + 4 * config.block_size
    if max_tokens < needed <= ids.shape[-1]:
        raise ValueError(
            f"max_tokens={max_tokens} cuts the calibration text below the {needed} tokens it needs "
            f"(local_window {config.local_window} + 4 blocks of {config.block_size}): raise max_tokens."
        )
    ids = ids[:, :max_tokens]
    if ids.shape[-1] < needed:
        raise ValueError(
            f"the calibration text has {ids.shape[-1]} tokens; it needs at least {needed} "
            f"(local_window {config.local_window} + 4 blocks of {config.block_size}): pass a longer text."
        )
    return ids


def leads_with_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token before a text by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("a", return_tensors="pt")["input_ids"][0, :1].tolist() == [bos]


def profile_from_retention(
    retention: list[LayerRetention],
    model: Any,
    config: TCAConfig,
    tokens: int,
    text: str,
    retrieval: np.ndarray | None = None,
) -> Profile:
    """Threshold measured retention at ``config.tau`` into a Profile (cheap: no forward pass).

    ``retention``: one entry per layer TCA manages (``model_fingerprint(model)["managed_layers"]``).
    ``retrieval``: (n_managed, G) scores from ``measure_retrieval``; heads at or above
    ``config.retrieval_threshold`` keep every token.
    """
    fingerprint = model_fingerprint(model)
    if len(retention) != len(fingerprint["managed_layers"]):
        raise ValueError(
            f"retention measured for {len(retention)} layers; the model's managed layers are "
            f"{fingerprint['managed_layers']}."
        )
    heads = choose_heads(retention, candidate_grid(config.candidates), config.tau)
    if retrieval is not None and config.retrieval_threshold is not None:
        dense = retrieval >= config.retrieval_threshold
        heads["mu"][dense], heads["sigma"][dense] = DENSE
        heads["retained"][dense] = 1.0
        heads["kept_tokens"][dense] = retention[0].values.shape[-1]
    return Profile(
        config=config,
        fingerprint=fingerprint,
        calibration_tokens=tokens,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        version=__version__,
        retrieval=retrieval,
        **heads,
    )
