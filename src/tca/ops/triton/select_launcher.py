"""Launcher of the fused selection kernels (DESIGN 2.1): checks, budget tables, allocation, grids.

Same contract and indices as ``tca.core.selection.select``; shared helpers are in ``launchers``.
"""

from __future__ import annotations

import torch
import triton

from ...core.budgets import rank_fractions
from ...core.config import TCAConfig
from ...core.selection import Selection, block_scores, plain_importance, sequence_importance, valid_part
from ...core.transfer import host_ints
from . import kernels
from .launchers import _empty, _kind, _multiprocessors, _precision, _rows_contiguous, _start, _tile, supported

SELECT_BLOCK_N = {"cuda": 128, "cpu": 64}
SELECT_WARPS = 8  # CUDA only: the two importance kernels' num_warps and num_stages (select_tiles.py)
SELECT_STAGES = 3
_fraction_cache: dict[tuple, tuple[torch.Tensor, list[int]]] = {}


def _fractions(mu: torch.Tensor, sigma: torch.Tensor, n_blocks: int, width: int, block_size: int, device):
    """(G, width) float64 kept fraction per rank (zero past n_blocks) on ``device``, and the most
    tokens each head can keep (every rank's budget for a full block; the partial block keeps less).
    Cached per configuration so repeated layers cost no host-device copy."""
    mu_cpu, sigma_cpu = mu.detach().double().cpu(), sigma.detach().double().cpu()
    cache_key = (tuple(mu_cpu.tolist()), tuple(sigma_cpu.tolist()), n_blocks, width, block_size, str(device))
    entry = _fraction_cache.get(cache_key)
    if entry is None:
        table = torch.zeros(mu_cpu.shape[0], width, dtype=torch.float64)
        if n_blocks > 0:
            table[:, :n_blocks] = rank_fractions(mu_cpu, sigma_cpu, n_blocks)
        full = torch.clamp(torch.floor(table * block_size + 0.5), max=float(block_size))
        if len(_fraction_cache) > 256:
            _fraction_cache.clear()
        entry = _fraction_cache.setdefault(cache_key, (table.to(device), full.sum(-1).long().tolist()))
    return entry


def select(
    query: torch.Tensor,
    key: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    config: TCAConfig,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> Selection:
    """Fused selection; same contract and indices as ``tca.select.select``. Importance by the fused
    kernels (the mean over the observation queries) or, with an importance option, in PyTorch; the
    ranking, budgets and top-t by kernels either way.

    The index tensor's width is an upper bound (each rank's budget for a full block) rather
    than the exact largest count, so it can be sized without waiting for the GPU; entries past
    ``counts`` are padding (``context_len``) exactly as in the reference.
    """
    batch, n_heads, n_obs, head_dim = query.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    if not supported(query, key):
        raise ValueError(f"selection kernel needs a power-of-two head dim >= 16, got {head_dim}.")
    window, block_size = config.effective_window, config.block_size
    device = key.device
    starts = [0] * batch if key_start is None else host_ints(key_start)
    n_cands = [context_len - s - window for s in starts]
    max_cand = max(n_cands)
    if max_cand <= 0:
        counts = torch.zeros(batch, n_kv, dtype=torch.int64, device=device)
        empty = torch.empty(batch, n_kv, 0, dtype=torch.int64, device=device)
        return Selection(empty, counts, context_len, head_bounds=[0] * n_kv)
    n_blocks_max = triton.cdiv(max_cand, block_size)
    nb_pad = triton.next_power_of_2(n_blocks_max)
    entries = [
        _fractions(mu, sigma, triton.cdiv(max(c, 0), block_size), nb_pad, block_size, device) for c in n_cands
    ]
    table = torch.stack([t for t, _ in entries])  # (B, G, NB_PAD)
    head_bounds = [max(column) for column in zip(*(bounds for _, bounds in entries), strict=True)]
    width = max(head_bounds)
    indices = torch.full((batch, n_kv, width), context_len, dtype=torch.int64, device=device)
    if width == 0:
        counts = torch.zeros(batch, n_kv, dtype=torch.int64, device=device)
        return Selection(indices, counts, context_len, head_bounds=head_bounds)
    start = _start(key_start, batch, device)
    imp_stride = n_blocks_max * block_size
    if plain_importance(config):
        importance, scores = _fused_importance(query, key, config, scale, start, max_cand, imp_stride, nb_pad)
    else:
        importance, scores = _importance_with_options(query, key, config, scale, starts, imp_stride, nb_pad)
    budgets = _empty(batch * n_kv, nb_pad, dtype=torch.int64, device=device)
    offsets = _empty(batch * n_kv, nb_pad, dtype=torch.int64, device=device)
    counts = _empty(batch, n_kv, dtype=torch.int64, device=device)
    kernels.rank_blocks_kernel[(batch * n_kv,)](
        scores,
        table,
        start,
        budgets,
        offsets,
        counts,
        n_kv,
        context_len,
        window,
        block_size,
        nb_pad,
        NB_PAD=nb_pad,
    )
    kernels.topk_blocks_kernel[(n_blocks_max, batch * n_kv)](
        importance,
        start,
        budgets,
        offsets,
        indices,
        n_kv,
        context_len,
        window,
        block_size,
        nb_pad,
        imp_stride,
        width,
        BLOCK_B=_block_lanes(block_size),
    )
    return Selection(indices=indices, counts=counts, context_len=context_len, head_bounds=head_bounds)


def _block_lanes(block_size: int) -> int:
    """Lanes of a block-wide tile in the selection kernels: the block size, a power of two >= 16."""
    return max(16, triton.next_power_of_2(block_size))


def _fused_importance(query, key, config, scale, start, max_cand: int, imp_stride: int, nb_pad: int):
    """Importance (B * G, imp_stride) and block scores (B * G, nb_pad), float32, by the two fused
    kernels: the softmax normalisers per chunk of candidates, then each block's importance (the
    mean over the observation rows) and score."""
    batch, n_heads, n_obs, head_dim = query.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    group, window, block_size = n_heads // n_kv, config.effective_window, config.block_size
    device = key.device
    kind = _kind(device)
    n_blocks_max = triton.cdiv(max_cand, block_size)
    query, key = _rows_contiguous(query), _rows_contiguous(key)
    rows = max(16, triton.next_power_of_2(group * n_obs))
    precision = _precision(key.dtype, device)
    block_n = _tile(SELECT_BLOCK_N[kind], head_dim)
    extra = {"num_warps": SELECT_WARPS, "num_stages": SELECT_STAGES} if kind == "cuda" else {}
    # a few chunks per head for the normalisers: enough programs to fill the machine
    n_chunks = max(
        1, min(triton.cdiv(2 * _multiprocessors(device), batch * n_kv), triton.cdiv(max_cand, block_n))
    )
    keys_per_chunk = triton.cdiv(triton.cdiv(max_cand, n_chunks), block_n) * block_n
    n_chunks = triton.cdiv(max_cand, keys_per_chunk)
    part_max = _empty(batch * n_kv, n_chunks, rows, dtype=torch.float32, device=device)
    part_sum = _empty(batch * n_kv, n_chunks, rows, dtype=torch.float32, device=device)
    common = (*query.stride()[:3], *key.stride()[:3])
    kernels.importance_partial_kernel[(n_chunks, batch * n_kv)](
        query,
        key,
        start,
        part_max,
        part_sum,
        *common,
        n_kv,
        context_len,
        window,
        keys_per_chunk,
        scale,
        GROUP=group,
        N_OBS=n_obs,
        ROWS=rows,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        PRECISION=precision,
        **extra,
    )
    importance = _empty(batch * n_kv, imp_stride, dtype=torch.float32, device=device)
    scores = _empty(batch * n_kv, nb_pad, dtype=torch.float32, device=device)
    kernels.importance_blocks_kernel[(n_blocks_max, batch * n_kv)](
        query,
        key,
        start,
        part_max,
        part_sum,
        importance,
        scores,
        *common,
        n_kv,
        context_len,
        window,
        n_chunks,
        block_size,
        nb_pad,
        imp_stride,
        scale,
        config.alpha,
        GROUP=group,
        N_OBS=n_obs,
        ROWS=rows,
        HEAD_DIM=head_dim,
        BLOCK_B=_block_lanes(block_size),
        CHUNKS_PAD=triton.next_power_of_2(n_chunks),
        PRECISION=precision,
        **extra,
    )
    return importance, scores


def _importance_with_options(query, key, config, scale, starts: list[int], imp_stride: int, nb_pad: int):
    """The same buffers as ``_fused_importance``'s, for importance options the fused kernels do not
    compute (``observation_max``, ``continuation``, ``pool_kernel``): ``candidate_importance`` and
    ``block_scores`` in PyTorch, the reference's own functions, so the ranking and top-t kernels that
    follow pick the reference's indices. One row of the batch at a time, on its own valid part."""
    batch, n_kv = query.shape[0], key.shape[1]
    importance = torch.zeros(batch * n_kv, imp_stride, dtype=torch.float32, device=key.device)
    scores = torch.zeros(batch * n_kv, nb_pad, dtype=torch.float32, device=key.device)
    for b, start in enumerate(starts):
        row = sequence_importance(*valid_part(query, key, b, start), config, scale)  # (G, n_cand)
        if row is None:
            continue
        rows = slice(b * n_kv, (b + 1) * n_kv)
        importance[rows, : row.shape[-1]] = row
        row_scores = block_scores(row, config.block_size, config.alpha)
        scores[rows, : row_scores.shape[-1]] = row_scores
    return importance, scores
