"""Triton kernels of TCA (only ``@triton.jit`` code; launchers.py checks, allocates and launches).

Five families:
- sparse prefill: flash-style online softmax over the kept columns (read through the index
  list, causal ``k <= j - w``) plus each query's window ``(j - w, j]``; the rows of one program
  are (query position, query head) pairs of one GQA group, so each K/V tile load serves the
  whole group;
- decode over a compressed cache with a length per (batch, KV head): split along the keys
  (flash-decoding), then one combine;
- selection: importance (two passes: softmax normalisers, then probabilities summed over the
  group), block mass / HHI / score, ranking with budgets, per-block top-t;
- cache entries: a prefill's kept and window rows of every head gathered into the layer's ragged
  buffer in one launch;
- dropped mass: the last query's softmax mass outside its kept keys and window (the statistic of
  the error bound), split along the keys, then one combine.

Exact ties: sorting keys are ``(order-preserving bits of the float) * 2^32 + (2^32 - 1 - index)``
in int64, sorted descending, so equal values put the lower index first, as the reference's
stable sorts do.

Arguments that change with the context length (lengths, positions, index widths and their strides)
are not specialised on (``do_not_specialize``): Triton would otherwise compile a variant per
divisibility of each, so the first call at a new length, or every 16th decode position, compiled.
For the same reason the decode's split count pads to a bound of the device and batch, not of the length.
"""

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- sparse prefill


@triton.jit
def _cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Under "upcast" (the CPU interpreter, whose fp32 ->
    bf16 conversion truncates) the rounding is done on the fp32 bits first, as the GPU does it."""
    if PRECISION == "upcast":
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. "native": fp16/bf16 tensor-core products (exact in fp32);
    "ieee": full fp32; "upcast": operands to fp32 first (the CPU interpreter multiplies bf16
    wrongly; bf16 products are exact in fp32, so the result is the same)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "native":
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _online_softmax_tile(
    q, k, v, acc, m_i, l_i, visible, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr
):
    """One K/V tile into the running (acc, max, sum); the max is in log2 units."""
    s = _dot(q, tl.trans(k), PRECISION)  # (ROWS, BLOCK_N), unscaled
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = m_new
    if MASKED:
        # a row that has seen nothing yet keeps -inf; subtract 0 there so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])  # one fused multiply-add a score
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, PRECISION), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _online(peak, logits):
    """One tile of an online softmax sum: (the new running maximum, the factor that rescales sums
    kept at the old one, the tile's exp(logits - new maximum)). A row masked so far adds nothing."""
    new_peak = tl.maximum(peak, tl.max(logits, 1))
    safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)
    return new_peak, tl.exp(peak - safe), tl.exp(logits - safe[:, None])


@triton.jit(do_not_specialize=["context_len", "stride_ib", "stride_ig"])
def sparse_prefill_kernel(
    Q,
    K,
    V,
    Out,
    Idx,
    Bounds,
    Start,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kg,
    stride_kl,
    stride_vb,
    stride_vg,
    stride_vl,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_ib,
    stride_ig,
    n_kv,
    context_len,
    window,
    qk_scale,
    GROUP: tl.constexpr,
    POSITIONS: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (query blocks, B * G). Row r of a program is position p0 + r // GROUP, head r % GROUP.

    Bounds (B, G, n_qblocks, 2) int32: kept entries visible to every row of the block, and to
    its last row (the kept list is ascending, so both are prefix lengths).
    """
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_kv
    g = pid_bg % n_kv
    p0 = pid_m * POSITIONS
    p_last = tl.minimum(p0 + POSITIONS, context_len) - 1

    rows = tl.arange(0, ROWS)
    pos = p0 + rows // GROUP
    head = g * GROUP + rows % GROUP
    row_ok = (rows < GROUP * POSITIONS) & (pos < context_len)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)

    b64 = b.to(tl.int64)
    q_ptrs = (
        Q
        + b64 * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + pos[:, None] * stride_ql
        + dims[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kg
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vg

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    no_mask = tl.full([ROWS, BLOCK_N], True, tl.int1)

    # kept columns: entries [0, n_all) are visible to every row, [n_all, n_last) need the causal mask
    bounds = Bounds + (pid_bg * tl.num_programs(0) + pid_m) * 2
    n_all = tl.load(bounds)
    n_last = tl.load(bounds + 1)
    idx_base = Idx + b64 * stride_ib + g.to(tl.int64) * stride_ig
    n_all_tiles = n_all // BLOCK_N * BLOCK_N
    for n in range(0, n_all_tiles, BLOCK_N):
        kv_rows = tl.load(idx_base + n + cols)
        k = tl.load(k_base + kv_rows[:, None] * stride_kl + dims[None, :])
        v = tl.load(v_base + kv_rows[:, None] * stride_vl + dims[None, :])
        acc, m_i, l_i = _online_softmax_tile(q, k, v, acc, m_i, l_i, no_mask, qk_scale, False, PRECISION)
    for n in range(n_all_tiles, n_last, BLOCK_N):
        in_list = n + cols < n_last
        kv_rows = tl.load(idx_base + n + cols, mask=in_list, other=0)
        k = tl.load(k_base + kv_rows[:, None] * stride_kl + dims[None, :])
        v = tl.load(v_base + kv_rows[:, None] * stride_vl + dims[None, :])
        visible = in_list[None, :] & (kv_rows[None, :] <= pos[:, None] - window)
        acc, m_i, l_i = _online_softmax_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, True, PRECISION)

    # window: keys [lo, p_last]; tiles inside [p_last - window + 1, p0] are visible to every row
    start = tl.load(Start + b)
    lo = tl.maximum(tl.maximum(p0 - window + 1, start), 0)
    n_tiles = tl.cdiv(tl.maximum(p_last + 1 - lo, 0), BLOCK_N)
    first_full = tl.minimum(tl.cdiv(tl.maximum(p_last - window + 1 - lo, 0), BLOCK_N), n_tiles)
    end_full = tl.maximum(tl.minimum((p0 + 1 - lo) // BLOCK_N, n_tiles), first_full)
    for t in range(0, first_full):
        acc, m_i, l_i = _window_tile(
            q,
            k_base,
            v_base,
            acc,
            m_i,
            l_i,
            lo + t * BLOCK_N,
            pos,
            window,
            p_last,
            stride_kl,
            stride_vl,
            qk_scale,
            dims,
            cols,
            True,
            PRECISION,
        )
    for t in range(first_full, end_full):
        acc, m_i, l_i = _window_tile(
            q,
            k_base,
            v_base,
            acc,
            m_i,
            l_i,
            lo + t * BLOCK_N,
            pos,
            window,
            p_last,
            stride_kl,
            stride_vl,
            qk_scale,
            dims,
            cols,
            False,
            PRECISION,
        )
    for t in range(end_full, n_tiles):
        acc, m_i, l_i = _window_tile(
            q,
            k_base,
            v_base,
            acc,
            m_i,
            l_i,
            lo + t * BLOCK_N,
            pos,
            window,
            p_last,
            stride_kl,
            stride_vl,
            qk_scale,
            dims,
            cols,
            True,
            PRECISION,
        )

    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    o_ptrs = (
        Out
        + b64 * stride_ob
        + head[:, None].to(tl.int64) * stride_oh
        + pos[:, None] * stride_ol
        + dims[None, :]
    )
    tl.store(o_ptrs, _cast(out, Out.dtype.element_ty, PRECISION), mask=row_ok[:, None])


@triton.jit
def _window_tile(
    q,
    k_base,
    v_base,
    acc,
    m_i,
    l_i,
    tile_lo,
    pos,
    window,
    p_last,
    stride_kl,
    stride_vl,
    qk_scale,
    dims,
    cols,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of contiguous window keys starting at ``tile_lo``."""
    keys = tile_lo + cols
    rows_at = tl.minimum(keys, p_last)  # clamp the address; masked lanes never count
    k = tl.load(k_base + rows_at[:, None] * stride_kl + dims[None, :])
    v = tl.load(v_base + rows_at[:, None] * stride_vl + dims[None, :])
    visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
    return _online_softmax_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, MASKED, PRECISION)


# ----------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["position", "stride_pb", "keys_per_split"])
def decode_split_kernel(
    Q,
    K,
    V,
    Lengths,
    Offsets,
    NewK,
    NewV,
    Positions,
    PartMax,
    PartSum,
    PartAcc,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kg,
    stride_kl,
    stride_vb,
    stride_vg,
    stride_vl,
    stride_lb,
    stride_lg,
    stride_nb,
    stride_ng,
    stride_pb,
    position,
    n_kv,
    keys_per_split,
    qk_scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    RAGGED: tl.constexpr,
    APPEND: tl.constexpr,
    POSITION_ON_DEVICE: tl.constexpr = False,
):
    """Grid (splits, B * G): one split of one KV head's cache, all its query heads at once.

    RAGGED: every head shares one (B, S, d) buffer (stride_kg = 0) and head g's keys start at
    slot Offsets[g] (int64), as in the compressed cache's layer store.
    APPEND: the step's new token (NewK/NewV (B, G, d) rows with strides stride_nb, stride_ng) is
    attended by split 0 as one more key, which also writes it (and ``position`` into Positions) at
    the slot after the cache's last; ``decode_combine_kernel`` then adds 1 to Lengths.
    POSITION_ON_DEVICE: ``position`` points to a one-element int64 tensor holding it (a CUDA graph
    replays the launch with the position of each step).

    Writes the split's running max, sum (log2 units) and unnormalised output per query head to
    PartMax/PartSum (B*G, splits, GROUP_PAD) and PartAcc (B*G, splits, GROUP_PAD, d).
    """
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_kv
    g = pid_bg % n_kv
    b64 = b.to(tl.int64)
    length = tl.load(Lengths + b * stride_lb + g * stride_lg)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, length)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    head = g * GROUP + rows
    q = tl.load(
        Q + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh + dims[None, :],
        mask=rows[:, None] < GROUP,
        other=0.0,
    )
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kg
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vg
    if RAGGED:
        first = tl.load(Offsets + g)
        k_base += first * stride_kl
        v_base += first * stride_vl

    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    for n in range(lo, hi, BLOCK_N):
        keys = n + cols
        valid = keys < hi
        k = tl.load(k_base + keys[:, None] * stride_kl + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vl + dims[None, :], mask=valid[:, None], other=0.0)
        visible = tl.broadcast_to(valid[None, :], [GROUP_PAD, BLOCK_N])
        acc, m_i, l_i = _online_softmax_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, True, PRECISION)
    if APPEND:
        if pid_s == 0:
            new = cols == 0
            row = b64 * stride_nb + g.to(tl.int64) * stride_ng
            k = tl.load(NewK + row + cols[:, None] * 0 + dims[None, :], mask=new[:, None], other=0.0)
            v = tl.load(NewV + row + cols[:, None] * 0 + dims[None, :], mask=new[:, None], other=0.0)
            visible = tl.broadcast_to(new[None, :], [GROUP_PAD, BLOCK_N])
            acc, m_i, l_i = _online_softmax_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, True, PRECISION)
            tl.store(k_base + length * stride_kl + dims, tl.load(NewK + row + dims))
            tl.store(v_base + length * stride_vl + dims, tl.load(NewV + row + dims))
            slot = length
            if RAGGED:
                slot += tl.load(Offsets + g)
            if POSITION_ON_DEVICE:
                tl.store(Positions + b64 * stride_pb + slot, tl.load(position))
            else:
                tl.store(Positions + b64 * stride_pb + slot, position)

    part = pid_bg * tl.num_programs(0) + pid_s
    tl.store(PartMax + part * GROUP_PAD + rows, m_i)
    tl.store(PartSum + part * GROUP_PAD + rows, l_i)
    tl.store(PartAcc + (part * GROUP_PAD + rows[:, None]) * HEAD_DIM + dims[None, :], acc)


@triton.jit(do_not_specialize=["n_splits"])
def decode_combine_kernel(
    PartMax,
    PartSum,
    PartAcc,
    Out,
    Lengths,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lg,
    n_kv,
    n_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    APPEND: tl.constexpr,
):
    """Grid (B * H,): merge one query head's splits; a head with no valid key outputs 0.
    APPEND: the first query head of each KV head adds the appended token to Lengths."""
    pid = tl.program_id(0)
    n_heads = n_kv * GROUP
    b = pid // n_heads
    h = pid % n_heads
    bg = b * n_kv + h // GROUP
    r = h % GROUP
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    ok = splits < n_splits
    part = (bg * n_splits + splits) * GROUP_PAD + r
    m = tl.load(PartMax + part, mask=ok, other=float("-inf"))
    s = tl.load(PartSum + part, mask=ok, other=0.0)
    acc = tl.load(PartAcc + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.math.exp2(m - m_safe)
    total = tl.sum(s * weight, 0)
    out = tl.sum(acc * weight[:, None], 0)
    out = tl.where(total > 0, out / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(
        Out + b.to(tl.int64) * stride_ob + h * stride_oh + dims, _cast(out, Out.dtype.element_ty, PRECISION)
    )
    if APPEND:
        if r == 0:
            at = Lengths + b * stride_lb + (h // GROUP) * stride_lg
            tl.store(at, tl.load(at) + 1)


# ----------------------------------------------------------------------------- selection


@triton.jit
def _importance_logits(
    Q,
    K,
    b,
    g,
    n_kv,
    start,
    n_cand,
    key_lo,
    stride_qb,
    stride_qh,
    stride_qo,
    stride_kb,
    stride_kg,
    stride_kl,
    scale,
    GROUP: tl.constexpr,
    N_OBS: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits (ROWS, BLOCK_N) of the group's observation queries against candidates key_lo + [0, BLOCK_N)
    (candidate positions relative to ``start``); invalid rows/keys are -inf."""
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    cand = key_lo + tl.arange(0, BLOCK_N)
    head = g * GROUP + rows // N_OBS
    obs = rows % N_OBS
    row_ok = rows < GROUP * N_OBS
    key_ok = cand < n_cand
    b64 = b.to(tl.int64)
    q = tl.load(
        Q
        + b64 * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + obs[:, None] * stride_qo
        + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k = tl.load(
        K
        + b64 * stride_kb
        + g.to(tl.int64) * stride_kg
        + (start + cand)[:, None] * stride_kl
        + dims[None, :],
        mask=key_ok[:, None],
        other=0.0,
    )
    logits = _dot(q, tl.trans(k), PRECISION) * scale
    return tl.where(row_ok[:, None] & key_ok[None, :], logits, float("-inf")), row_ok


@triton.jit(do_not_specialize=["context_len", "keys_per_chunk"])
def importance_partial_kernel(
    Q,
    K,
    Start,
    PartMax,
    PartSum,
    stride_qb,
    stride_qh,
    stride_qo,
    stride_kb,
    stride_kg,
    stride_kl,
    n_kv,
    context_len,
    window,
    keys_per_chunk,
    scale,
    GROUP: tl.constexpr,
    N_OBS: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (chunks, B * G): per observation row, max and sum of exp over one chunk of candidates."""
    pid_c = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_kv
    g = pid_bg % n_kv
    start = tl.load(Start + b)
    n_cand = context_len - start - window
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([ROWS], dtype=tl.float32)
    lo = pid_c * keys_per_chunk
    hi = tl.minimum(lo + keys_per_chunk, n_cand)
    for n in range(lo, hi, BLOCK_N):
        logits, row_ok = _importance_logits(
            Q,
            K,
            b,
            g,
            n_kv,
            start,
            n_cand,
            n,
            stride_qb,
            stride_qh,
            stride_qo,
            stride_kb,
            stride_kg,
            stride_kl,
            scale,
            GROUP,
            N_OBS,
            ROWS,
            HEAD_DIM,
            BLOCK_N,
            PRECISION,
        )
        m_i, shrink, p = _online(m_i, logits)
        s_i = s_i * shrink + tl.sum(p, 1)
    rows = tl.arange(0, ROWS)
    part = (pid_bg * tl.num_programs(0) + pid_c) * ROWS + rows
    tl.store(PartMax + part, m_i)
    tl.store(PartSum + part, s_i)


@triton.jit(do_not_specialize=["context_len", "n_chunks", "blocks_stride", "imp_stride"])
def importance_blocks_kernel(
    Q,
    K,
    Start,
    PartMax,
    PartSum,
    Importance,
    Scores,
    stride_qb,
    stride_qh,
    stride_qo,
    stride_kb,
    stride_kg,
    stride_kl,
    n_kv,
    context_len,
    window,
    n_chunks,
    block_size,
    blocks_stride,
    imp_stride,
    scale,
    alpha,
    GROUP: tl.constexpr,
    N_OBS: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_B: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (blocks, B * G): importance of one block's candidates, its mass, HHI and score.

    importance = softmax over all candidates, averaged over the group's observation rows;
    score = (1 - alpha) * mass * n_blocks + alpha * (1 - HHI), as ``select.rank_blocks``.
    """
    pid_j = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_kv
    g = pid_bg % n_kv
    start = tl.load(Start + b)
    n_cand = context_len - start - window
    n_blocks = tl.cdiv(n_cand, block_size)
    if pid_j < n_blocks:
        chunks = tl.arange(0, CHUNKS_PAD)
        rows = tl.arange(0, ROWS)
        part = (pid_bg * n_chunks + chunks[:, None]) * ROWS + rows[None, :]
        c_ok = chunks[:, None] < n_chunks
        m_c = tl.load(PartMax + part, mask=c_ok, other=float("-inf"))  # (CHUNKS_PAD, ROWS)
        s_c = tl.load(PartSum + part, mask=c_ok, other=0.0)
        m_all = tl.max(m_c, 0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        total = tl.sum(s_c * tl.exp(m_c - m_safe[None, :]), 0)  # (ROWS,)
        key_lo = pid_j * block_size
        logits, row_ok = _importance_logits(
            Q,
            K,
            b,
            g,
            n_kv,
            start,
            n_cand,
            key_lo,
            stride_qb,
            stride_qh,
            stride_qo,
            stride_kb,
            stride_kg,
            stride_kl,
            scale,
            GROUP,
            N_OBS,
            ROWS,
            HEAD_DIM,
            BLOCK_B,
            PRECISION,
        )
        in_block = tl.arange(0, BLOCK_B) < block_size
        probs = tl.exp(logits - m_safe[:, None]) / tl.where(row_ok, total, 1.0)[:, None]
        importance = tl.sum(tl.where(row_ok[:, None], probs, 0.0), 0) / (GROUP * N_OBS)
        importance = tl.where(in_block & (key_lo + tl.arange(0, BLOCK_B) < n_cand), importance, 0.0)
        cand = key_lo + tl.arange(0, BLOCK_B)
        tl.store(
            Importance + pid_bg.to(tl.int64) * imp_stride + cand, importance, mask=in_block & (cand < n_cand)
        )
        mass = tl.sum(importance, 0)
        squares = tl.sum(importance * importance, 0)
        hhi = tl.where(mass > 0, squares / tl.maximum(mass * mass, 1e-30), 1.0)
        score = (1.0 - alpha) * mass * n_blocks + alpha * (1.0 - hhi)
        tl.store(Scores + pid_bg * blocks_stride + pid_j, score)


@triton.jit
def _descending_key(values, index):
    """int64 keys that sort like ``values`` (float32), ties broken towards the lower index."""
    bits = (values + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.to(tl.int64) * 4294967296 + (4294967295 - index.to(tl.int64))


@triton.jit(do_not_specialize=["context_len", "blocks_stride"])
def rank_blocks_kernel(
    Scores,
    Fractions,
    Start,
    Budgets,
    Offsets,
    Counts,
    n_kv,
    context_len,
    window,
    block_size,
    blocks_stride,
    NB_PAD: tl.constexpr,
):
    """Grid (B * G,): rank blocks by score, give each its rank's budget, and lay out the output.

    Fractions (B, G, NB_PAD) float64: the kept fraction at each rank (``budgets.rank_fractions``).
    Writes the budget and the first output slot of each block (in block order) and the count.
    """
    pid_bg = tl.program_id(0)
    b = pid_bg // n_kv
    start = tl.load(Start + b)
    n_cand = context_len - start - window
    n_blocks = tl.maximum(tl.cdiv(n_cand, block_size), 0)
    blocks = tl.arange(0, NB_PAD)
    ok = blocks < n_blocks
    score = tl.load(Scores + pid_bg * blocks_stride + blocks, mask=ok, other=0.0)
    key = tl.where(ok, _descending_key(score, blocks), -9223372036854775807)
    ranked = tl.sort(key, descending=True)  # rank r holds the r-th best block
    block_at_rank = (4294967295 - (ranked & 4294967295)).to(tl.int32)
    last_len = n_cand - block_size * (n_blocks - 1)
    length = tl.where(block_at_rank == n_blocks - 1, last_len, block_size).to(tl.float64)
    fraction = tl.load(Fractions + pid_bg.to(tl.int64) * NB_PAD + blocks, mask=ok, other=0.0)
    budget = tl.minimum(tl.floor(fraction * length + 0.5), length).to(tl.int64)
    # back to block order: sort (block, budget) pairs ascending by block
    pairs = tl.where(ok, block_at_rank.to(tl.int64) * 4294967296 + budget, 9223372036854775807)
    by_block = tl.sort(pairs)
    budget_of_block = tl.where(ok, by_block & 4294967295, 0)
    offset = tl.cumsum(budget_of_block, 0) - budget_of_block
    tl.store(Budgets + pid_bg * blocks_stride + blocks, budget_of_block, mask=ok)
    tl.store(Offsets + pid_bg * blocks_stride + blocks, offset, mask=ok)
    tl.store(Counts + pid_bg, tl.sum(budget_of_block, 0))


@triton.jit(do_not_specialize=["context_len", "blocks_stride", "imp_stride", "width"])
def topk_blocks_kernel(
    Importance,
    Start,
    Budgets,
    Offsets,
    Indices,
    n_kv,
    context_len,
    window,
    block_size,
    blocks_stride,
    imp_stride,
    width,
    BLOCK_B: tl.constexpr,
):
    """Grid (blocks, B * G): keep a block's top-``budget`` candidates, written ascending."""
    pid_j = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_kv
    start = tl.load(Start + b)
    n_cand = context_len - start - window
    n_blocks = tl.cdiv(n_cand, block_size)
    if pid_j < n_blocks:
        budget = tl.load(Budgets + pid_bg * blocks_stride + pid_j)
        offset = tl.load(Offsets + pid_bg * blocks_stride + pid_j)
        local = tl.arange(0, BLOCK_B)
        cand = pid_j * block_size + local
        ok = (local < block_size) & (cand < n_cand)
        importance = tl.load(Importance + pid_bg.to(tl.int64) * imp_stride + cand, mask=ok, other=0.0)
        key = tl.where(ok, _descending_key(importance, local), -9223372036854775807)
        ranked = tl.sort(key, descending=True)
        threshold = tl.sum(tl.where(local == budget - 1, ranked, 0), 0)
        kept = ok & (key >= threshold) & (local * 0 + budget > 0)  # a zero budget keeps nothing
        slot = offset + tl.cumsum(kept.to(tl.int64), 0) - 1
        out = Indices + pid_bg.to(tl.int64) * width + slot
        tl.store(out, (start + cand).to(tl.int64), mask=kept)


# ----------------------------------------------------------------------------- cache entries


@triton.jit(do_not_specialize=["context_len", "n_slots", "width", "window_start"])
def gather_entries_kernel(
    key_ptr,
    value_ptr,
    kept_ptr,
    counts_ptr,
    start_ptr,
    heads_ptr,
    columns_ptr,
    out_key_ptr,
    out_value_ptr,
    positions_ptr,
    context_len,
    n_slots,
    width,
    window_start,
    stride_kb,
    stride_kg,
    stride_kl,
    stride_vb,
    stride_vg,
    stride_vl,
    stride_ib,
    stride_ig,
    stride_cb,
    stride_cg,
    HAS_START: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One row's block of slots: each slot's entry position (a kept token, a window token, or -1),
    then its key and value rows (zeros for -1). Grid (B, cdiv(S, BLOCK_S))."""
    b = tl.program_id(0).to(tl.int64)
    slots = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    live = slots < n_slots
    head = tl.load(heads_ptr + slots, mask=live, other=0)
    column = tl.load(columns_ptr + slots, mask=live, other=0)
    count = tl.load(counts_ptr + b * stride_cb + head * stride_cg, mask=live, other=0)
    if HAS_START:
        start = tl.load(start_ptr + b)
    else:
        start = window_start
    kept = column < count
    from_kept = tl.load(
        kept_ptr + b * stride_ib + head * stride_ig + tl.minimum(column, width - 1), mask=live & kept, other=0
    )
    window = start + column - count
    position = tl.where(kept, from_kept, tl.where(window < context_len, window, -1))
    tl.store(positions_ptr + b * n_slots + slots, position, mask=live)
    dims = tl.arange(0, HEAD_DIM)
    filled = (live & (position >= 0))[:, None]
    source = tl.maximum(position, 0)[:, None]
    out = b * n_slots * HEAD_DIM + slots[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(
        key_ptr + b * stride_kb + head[:, None] * stride_kg + source * stride_kl + dims[None, :],
        mask=filled,
        other=0.0,
    )
    tl.store(out_key_ptr + out, k, mask=live[:, None])
    v = tl.load(
        value_ptr + b * stride_vb + head[:, None] * stride_vg + source * stride_vl + dims[None, :],
        mask=filled,
        other=0.0,
    )
    tl.store(out_value_ptr + out, v, mask=live[:, None])


# ----------------------------------------------------------------------------- dropped mass


@triton.jit(do_not_specialize=["context_len", "window_lo", "keys_per_split", "columns_per_split"])
def dropped_mass_partial_kernel(
    Q,
    K,
    Kept,
    Counts,
    Start,
    Partial,
    n_kv,
    context_len,
    window_lo,
    keys_per_split,
    columns_per_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kg,
    stride_kl,
    stride_ib,
    stride_ig,
    stride_cb,
    stride_cg,
    scale,
    HAS_START: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The last query of GROUP query heads (one row, one KV head) over one split of the keys (the
    softmax sum, and the window's part of it) and one split of the kept list (the kept keys' sum
    outside the window), each sum with its own running maximum. Grid (B * G, splits); writes
    Partial (B * G, splits, 5, ROWS): maximum, sum, window sum, kept maximum, kept sum."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // n_kv).to(tl.int64)
    g = (pid % n_kv).to(tl.int64)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    q = tl.load(
        Q + b * stride_qb + (g * GROUP + rows)[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    key_base = K + b * stride_kb + g * stride_kg
    peak = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    window = tl.zeros([ROWS], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, context_len)
    for tile in range(lo, hi, BLOCK_N):
        keys = (tile + tl.arange(0, BLOCK_N)).to(tl.int64)  # times the key stride: past 2^31 at 2M keys
        seen = (keys >= start) & (keys < hi)
        k = tl.load(key_base + keys[:, None] * stride_kl + dims[None, :], mask=seen[:, None], other=0.0)
        logits = _dot(q, tl.trans(k), PRECISION) * scale
        logits = tl.where(row_ok[:, None] & seen[None, :], logits, float("-inf"))
        peak, shrink, p = _online(peak, logits)
        total = total * shrink + tl.sum(p, 1)
        window = window * shrink + tl.sum(tl.where(keys[None, :] >= window_lo, p, 0.0), 1)
    count = tl.load(Counts + b * stride_cb + g * stride_cg)
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, count)
    kept_peak = tl.full([ROWS], float("-inf"), tl.float32)
    kept = tl.zeros([ROWS], tl.float32)
    for tile in range(first, first + columns_per_split, BLOCK_N):
        columns = tile + tl.arange(0, BLOCK_N)
        index = tl.load(Kept + b * stride_ib + g * stride_ig + columns, mask=columns < last, other=0)
        live = (columns < last) & (index < window_lo)  # a kept key inside the window counts once
        k = tl.load(key_base + index[:, None] * stride_kl + dims[None, :], mask=live[:, None], other=0.0)
        logits = _dot(q, tl.trans(k), PRECISION) * scale
        logits = tl.where(row_ok[:, None] & live[None, :], logits, float("-inf"))
        kept_peak, shrink, p = _online(kept_peak, logits)
        kept = kept * shrink + tl.sum(p, 1)
    out = Partial + (pid * tl.num_programs(1) + split).to(tl.int64) * 5 * ROWS + rows
    tl.store(out, peak)
    tl.store(out + ROWS, total)
    tl.store(out + 2 * ROWS, window)
    tl.store(out + 3 * ROWS, kept_peak)
    tl.store(out + 4 * ROWS, kept)


@triton.jit
def dropped_mass_combine_kernel(
    Partial, Out, n_splits, GROUP: tl.constexpr, ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr
):
    """gamma = 1 - (window sum + kept sum) / sum, the splits' sums brought to one maximum. Grid
    (B * G,); writes Out (B, H) at the program's GROUP heads."""
    pid = tl.program_id(0)
    splits = tl.arange(0, SPLITS_PAD)
    rows = tl.arange(0, ROWS)
    at = Partial + pid.to(tl.int64) * n_splits * 5 * ROWS + splits[:, None] * 5 * ROWS + rows[None, :]
    ok = (splits < n_splits)[:, None]
    peak = tl.load(at, mask=ok, other=float("-inf"))
    total = tl.load(at + ROWS, mask=ok, other=0.0)
    window = tl.load(at + 2 * ROWS, mask=ok, other=0.0)
    kept_peak = tl.load(at + 3 * ROWS, mask=ok, other=float("-inf"))
    kept = tl.load(at + 4 * ROWS, mask=ok, other=0.0)
    top = tl.max(peak, 0)  # every kept key is also a seen key: kept maxima are at most this
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(peak - top[None, :])
    kept_weight = tl.exp(kept_peak - top[None, :])
    whole = tl.sum(total * weight, 0)
    attended = tl.sum(window * weight, 0) + tl.sum(kept * kept_weight, 0)
    whole = tl.where(whole > 0, whole, 1.0)  # padding rows of ROWS (not stored) see nothing
    gamma = tl.maximum(1.0 - attended / whole, 0.0)
    tl.store(Out + pid.to(tl.int64) * GROUP + rows, gamma, mask=rows < GROUP)
