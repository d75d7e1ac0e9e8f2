"""Launchers of the Triton kernels: argument checks, allocation, grids and block shapes.

Signatures mirror ``tca.ops.reference`` and ``tca.select`` so the dispatcher can swap them.
Kernels need a power-of-two head dimension and K/V rows contiguous in the last dimension;
``supported`` says whether a call can take the kernels (the dispatcher falls back otherwise).
"""

from __future__ import annotations

import torch
import triton

from ...core.selection import Selection
from . import kernels

LOG2E = 1.4426950408889634
# Rows (query position x query head) per prefill program and keys per tile: measured on the
# H100, then on the H200 at head dim 128 (benchmarks/NOTES-kernels.md, "Prefill tiles for tensor
# parallelism"); smaller tiles keep the CPU interpreter fast.
# "fp32" (full-precision dots, no tensor-core fast path) gets small tiles to stay out of spills.
PREFILL_ROWS = {"cuda": 256, "cpu": 64, "fp32": 64}
PREFILL_BLOCK_N = {"cuda": 64, "cpu": 32, "fp32": 32}
PREFILL_WARPS = 8
PREFILL_STAGES = {"cuda": 3, "cpu": 2, "fp32": 2}
DECODE_BLOCK_N = {"cuda": 64, "cpu": 16}
DECODE_PROGRAMS_PER_SM = 2
DECODE_WARPS = 4
DECODE_STAGES = 3
# The tiles above were measured at head dim <= 128. A larger head dim (Gemma 3: 256) gets tiles of
# the same bytes (half the rows / keys at 256), so a program's shared memory stays what it was at
# 128 (a 128 x 256 bf16 tile of queries and two of keys and values, double-buffered, would not fit
# an H100's 227 KB). Decided here, not measured: see docs/gemma3.md.
MEASURED_HEAD_DIM = 128
# The 256-row tiles were measured at head dim 128 only: a larger head dim keeps the tiles it ran with
# before them, (rows, keys per tile, stages) at 128 scaled by ``_tile`` (64 rows and 64 keys at 256).
WIDE_HEAD_PREFILL = (128, 128, 2)
# Tests set this: every buffer a kernel must fill starts as NaN (floats) or -7 (integers), so an
# element no program wrote shows up instead of passing as a lucky zero.
POISON = False


def _tile(measured: int, head_dim: int) -> int:
    """A tile size measured at head dim <= 128, scaled to hold as many bytes at ``head_dim``."""
    return max(16, measured * MEASURED_HEAD_DIM // max(head_dim, MEASURED_HEAD_DIM))


def _prefill_tiles(tiles: str, head_dim: int) -> tuple[int, int, int]:
    """(rows, keys per tile, stages) of the prefill kernel for ``tiles`` ("cuda", "fp32", "cpu")."""
    rows, block_n, stages = PREFILL_ROWS[tiles], PREFILL_BLOCK_N[tiles], PREFILL_STAGES[tiles]
    if tiles == "cuda" and head_dim > MEASURED_HEAD_DIM:
        rows, block_n, stages = WIDE_HEAD_PREFILL
    return _tile(rows, head_dim), _tile(block_n, head_dim), stages


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -7)
    return out


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether these tensors can take the kernels (else use the reference)."""
    head_dim = query.shape[-1]
    return (
        head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and key.dtype == query.dtype
        and query.shape[1] % key.shape[1] == 0
    )


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if not supported(query, key) or value.dtype != key.dtype or value.shape != key.shape:
        raise ValueError(
            f"the Triton kernels need fp16/bf16/fp32 tensors of one dtype, a power-of-two head dim >= 16 "
            f"and H a multiple of G; got query {tuple(query.shape)} {query.dtype}, key {tuple(key.shape)} "
            f"{key.dtype}, value {tuple(value.shape)} {value.dtype}. Use the reference backend."
        )


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 inputs get full-precision dots so the kernel matches an fp32 reference; fp16/bf16 use
    # the tensor cores (products exact, fp32 accumulation). The CPU interpreter gets bf16 dots
    # wrong (Triton 3.9), so there bf16 operands are upcast first: the same products.
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if device.type != "cuda" and dtype == torch.bfloat16 else "native"


def _start(key_start: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if key_start is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    return key_start.to(device=device, dtype=torch.int32)


def sparse_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: Selection,
    local_window: int,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """TCA prefill attention; same contract as ``reference.sparse_prefill``. Returns (B, H, L, d)."""
    _check(query, key, value)
    batch, n_heads, context_len, head_dim = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    window = max(int(local_window), 1)
    kind = _kind(query.device)
    tiles = "fp32" if kind == "cuda" and query.dtype == torch.float32 else kind
    rows, block_n, stages = _prefill_tiles(tiles, head_dim)
    rows = max(rows, triton.next_power_of_2(group))
    positions = rows // group
    n_qblocks = triton.cdiv(context_len, positions)
    query, key, value = (_rows_contiguous(x) for x in (query, key, value))
    indices = selection.indices.to(device=query.device).contiguous()
    if indices.shape[-1] == 0:
        indices = torch.full((batch, n_kv, 1), context_len, dtype=torch.int64, device=query.device)
    # kept entries visible to every row of a query block, and to its last row (prefix lengths)
    first = torch.arange(n_qblocks, device=query.device, dtype=torch.int64) * positions
    last = torch.clamp(first + positions, max=context_len) - 1
    thresholds = torch.stack([first, last], -1).view(1, 1, -1) - window  # (1, 1, 2 * n_qblocks)
    bounds = torch.searchsorted(indices, thresholds.expand(batch, n_kv, -1).contiguous(), right=True)
    bounds = bounds.to(torch.int32).contiguous()
    out = _empty(*query.shape, dtype=query.dtype, device=query.device)
    grid = (n_qblocks, batch * n_kv)
    extra = (
        {"num_warps": PREFILL_WARPS if tiles == "cuda" else 4, "num_stages": stages} if kind == "cuda" else {}
    )
    kernels.sparse_prefill_kernel[grid](
        query,
        key,
        value,
        out,
        indices,
        bounds,
        _start(key_start, batch, query.device),
        *query.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        *out.stride()[:3],
        *indices.stride()[:2],
        n_kv,
        context_len,
        window,
        scale * LOG2E,
        GROUP=group,
        POSITIONS=positions,
        ROWS=rows,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        PRECISION=_precision(query.dtype, query.device),
        **extra,
    )
    return out


def decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new query over a compressed cache; contract of ``reference.decode_reference``.

    Args:
        query: (B, H, 1, d); key, value: (B, G, Kmax, d); lengths: (B, G) valid keys per head.
    Returns:
        (B, H, 1, d) in the query's dtype.
    """
    _check(query, key, value)
    return _decode(query, key, value, lengths, None, key.shape[2], scale)


def decode_ragged(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode over a ragged layer store; contract of ``reference.decode_ragged``.

    Args:
        query: (B, H, 1, d); key, value: (B, S, d), head g's keys of row b at slots
            ``offsets[g] + [0, lengths[b, g])``; offsets: (G,) int64 on the device; max_len: a host
            upper bound of the lengths.
    """
    if key.dim() != 3 or key.shape != value.shape or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"ragged key/value must be (B, S, d) with contiguous rows, got {tuple(key.shape)}.")
    return _decode(query, key.unsqueeze(1), value.unsqueeze(1), lengths, offsets, max_len, scale)


def decode_ragged_append(
    query,
    new_key,
    new_value,
    key,
    value,
    positions,
    lengths,
    offsets,
    max_len: int,
    position: int,
    scale=None,
) -> torch.Tensor:
    """Append one token per (row, KV head) to a ragged layer store and attend over it, in two
    launches; contract of ``reference.decode_ragged_append``.

    Args:
        new_key, new_value: (B, G, 1, d); key, value: (B, S, d); positions: (B, S) int64;
        lengths: (B, G) int32 on the device, incremented in place; max_len: a host bound of the
        lengths after the append; position: the token's position, a host int or a one-element
        int64 tensor on the device (read by the kernel: a CUDA graph can replay the launch).
    """
    if lengths.dtype != torch.int32 or positions.stride(-1) != 1:
        raise ValueError("appending needs int32 lengths (updated in place) and contiguous positions.")
    new = (new_key, new_value, positions, position)
    return _decode(query, key.unsqueeze(1), value.unsqueeze(1), lengths, offsets, max_len, scale, new)


def _decode(query, key, value, lengths, offsets, max_len: int, scale, append=None):
    batch, n_heads, q_len, head_dim = query.shape
    if q_len != 1:
        raise ValueError(f"decode takes one query per head, got {q_len}; use sparse_prefill for more.")
    n_kv = lengths.shape[1]
    group = n_heads // n_kv
    scale = head_dim**-0.5 if scale is None else scale
    kind = _kind(query.device)
    block_n = _tile(DECODE_BLOCK_N[kind], head_dim)
    # flash-decoding: enough splits to fill the machine twice over, each a whole number of tiles
    programs = DECODE_PROGRAMS_PER_SM * _multiprocessors(query.device)
    most_splits = triton.cdiv(programs, batch * n_kv)  # never more, whatever the length
    n_splits = max(1, min(most_splits, triton.cdiv(max(max_len, 1), block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(max(max_len, 1), n_splits), block_n) * block_n
    n_splits = triton.cdiv(max(max_len, 1), keys_per_split)
    group_pad = max(16, triton.next_power_of_2(group))
    query, key, value = (_rows_contiguous(x) for x in (query, key, value))
    part_max = _empty(batch * n_kv, n_splits, group_pad, dtype=torch.float32, device=query.device)
    part_sum = _empty(batch * n_kv, n_splits, group_pad, dtype=torch.float32, device=query.device)
    part_acc = _empty(batch * n_kv, n_splits, group_pad, head_dim, dtype=torch.float32, device=query.device)
    if append is None:
        lengths = lengths.to(device=query.device, dtype=torch.int32)
        new_key = new_value = positions = lengths  # unused pointers
        position = 0
    else:
        new_key, new_value, positions, position = append
        new_key, new_value = (
            x.squeeze(2) if x.stride(-1) == 1 else x.squeeze(2).contiguous() for x in append[:2]
        )
    precision = _precision(query.dtype, query.device)
    extra = {"num_warps": DECODE_WARPS, "num_stages": DECODE_STAGES} if kind == "cuda" else {}
    kernels.decode_split_kernel[(n_splits, batch * n_kv)](
        query,
        key,
        value,
        lengths,
        lengths if offsets is None else offsets,
        new_key,
        new_value,
        positions,
        part_max,
        part_sum,
        part_acc,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1) if offsets is None else 0,
        key.stride(2),
        value.stride(0),
        value.stride(1) if offsets is None else 0,
        value.stride(2),
        *lengths.stride(),
        *(new_key.stride()[:2] if append is not None else (0, 0)),
        positions.stride(0) if append is not None else 0,
        position,
        n_kv,
        keys_per_split,
        scale * LOG2E,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        PRECISION=precision,
        RAGGED=offsets is not None,
        APPEND=append is not None,
        POSITION_ON_DEVICE=isinstance(position, torch.Tensor),
        **extra,
    )
    out = _empty(*query.shape, dtype=query.dtype, device=query.device)
    kernels.decode_combine_kernel[(batch * n_heads,)](
        part_max,
        part_sum,
        part_acc,
        out,
        lengths,
        out.stride(0),
        out.stride(1),
        *lengths.stride(),
        n_kv,
        n_splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        # from the bound, not the length: a split count that changes with the length would compile
        # the combine kernel again inside a decode (as the cache grows past a power of two)
        SPLITS_PAD=triton.next_power_of_2(most_splits),
        PRECISION=precision,
        APPEND=append is not None,
    )
    return out


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


ENTRY_SLOTS = {"cuda": 64, "cpu": 16}  # slots per program of gather_entries_kernel (at head dim <= 128)


def gather_entries(key, value, kept, counts, window_start, slot_heads, slot_columns):
    """A layer's cache entries in one launch; same contract as ``reference.gather_entries``."""
    batch, _, context_len, head_dim = key.shape
    n_slots = slot_heads.shape[0]
    key, value = _rows_contiguous(key), _rows_contiguous(value)
    kept, counts = kept.contiguous(), counts.to(torch.int64).contiguous()
    if kept.shape[-1] == 0:  # no kept column to read (the loads are masked off): one dummy column
        kept = torch.zeros(*kept.shape[:2], 1, dtype=torch.int64, device=key.device)
    has_start = not isinstance(window_start, int)
    start = window_start.to(torch.int64).contiguous() if has_start else counts  # (unused without it)
    keys = _empty(batch, n_slots, head_dim, dtype=key.dtype, device=key.device)
    values = _empty(batch, n_slots, head_dim, dtype=value.dtype, device=key.device)
    positions = _empty(batch, n_slots, dtype=torch.int64, device=key.device)
    block = _tile(ENTRY_SLOTS[_kind(key.device)], head_dim)
    kernels.gather_entries_kernel[(batch, triton.cdiv(n_slots, block))](
        key,
        value,
        kept,
        counts,
        start,
        slot_heads,
        slot_columns,
        keys,
        values,
        positions,
        context_len,
        n_slots,
        kept.shape[-1],
        0 if has_start else int(window_start),
        *key.stride()[:3],
        *value.stride()[:3],
        *kept.stride()[:2],
        *counts.stride(),
        HAS_START=has_start,
        HEAD_DIM=head_dim,
        BLOCK_S=block,
    )
    return keys, values, positions


MASS_BLOCK_N = {"cuda": 64, "cpu": 16}  # keys per tile of the dropped-mass kernels (head dim <= 128)
MASS_SPLITS = 64  # at most this many splits per (row, KV head)


def dropped_mass(query, key, selection, local_window: int, scale: float, key_start=None) -> torch.Tensor:
    """The last query's dropped mass (B, H) float32: ``core.error_bound.last_query_dropped_mass``'s
    contract, in two launches (the keys split over enough programs to fill the GPU, then a combine)."""
    batch, n_heads, head_dim = query.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    query, key = _rows_contiguous(query), _rows_contiguous(key)
    kept = selection.indices.to(key.device).contiguous()
    if kept.shape[-1] == 0:  # no kept column to read (the loads are masked off): one padding column
        kept = torch.full((batch, n_kv, 1), context_len, dtype=torch.int64, device=key.device)
    counts = selection.counts.to(device=key.device, dtype=torch.int64)
    kind = _kind(key.device)
    block = _tile(MASS_BLOCK_N[kind], head_dim)
    most = max(1, min(MASS_SPLITS, triton.cdiv(4 * _multiprocessors(key.device), batch * n_kv)))
    n_splits = max(1, min(most, triton.cdiv(context_len, block)))
    keys_per_split = triton.cdiv(triton.cdiv(context_len, n_splits), block) * block
    columns_per_split = triton.cdiv(triton.cdiv(kept.shape[-1], n_splits), block) * block
    rows = max(16, triton.next_power_of_2(group))
    partial = _empty(batch * n_kv, n_splits, 5, rows, dtype=torch.float32, device=key.device)
    out = _empty(batch, n_heads, dtype=torch.float32, device=key.device)
    has_start = key_start is not None
    start = key_start.to(device=key.device, dtype=torch.int64) if has_start else counts
    kernels.dropped_mass_partial_kernel[(batch * n_kv, n_splits)](
        query,
        key,
        kept,
        counts,
        start,
        partial,
        n_kv,
        context_len,
        max(context_len - local_window, 0),
        keys_per_split,
        columns_per_split,
        *query.stride()[:2],
        *key.stride()[:3],
        *kept.stride()[:2],
        *counts.stride(),
        scale,
        HAS_START=has_start,
        GROUP=group,
        ROWS=rows,
        HEAD_DIM=head_dim,
        BLOCK_N=block,
        PRECISION=_precision(query.dtype, query.device),
    )
    # the combine's split tile from the bound, not the length (a length-dependent one would compile
    # again at every new power of two)
    kernels.dropped_mass_combine_kernel[(batch * n_kv,)](
        partial, out, n_splits, GROUP=group, ROWS=rows, SPLITS_PAD=triton.next_power_of_2(most)
    )
    return out


from .select_launcher import select  # noqa: E402,F401  (the selection launcher, re-exported)
