"""Reference sparse prefill, dropped mass (Theorem 1) and pair counts against brute-force masked attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bruteforce import causal_masks, fresh_seed, masked_attention, softmax64, visibility
from hypothesis import given, settings
from hypothesis import strategies as st

from tca.core.config import TCAConfig
from tca.core.error_bound import last_query_dropped_mass, theorem1_bound
from tca.core.selection import Selection, select
from tca.core.stats import RunStats, pair_counts
from tca.ops import reference


def random_case(
    seed: int,
    batch: int,
    group: int,
    n_kv: int,
    context_len: int,
    window: int,
    head_dim: int,
    keep_prob: float,
    max_pad: int,
):
    """Random q/k/v, left padding and a random kept set drawn from [start, L - w) per (batch, KV head)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    query = 2.0 * torch.randn(batch, n_kv * group, context_len, head_dim, generator=gen)
    key = torch.randn(batch, n_kv, context_len, head_dim, generator=gen)
    value = torch.randn(batch, n_kv, context_len, head_dim, generator=gen)
    starts = [int(rng.integers(0, min(max_pad, context_len - 1) + 1)) for _ in range(batch)]
    rows = [
        [
            sorted(i for i in range(start, context_len - window) if rng.random() < keep_prob)
            for _ in range(n_kv)
        ]
        for start in starts
    ]
    return query, key, value, starts, rows


def pack(rows: list[list[list[int]]], context_len: int) -> Selection:
    """Build a Selection by hand: ascending indices padded with L."""
    width = max((len(r) for row in rows for r in row), default=0)
    indices = torch.full((len(rows), len(rows[0]), width), context_len, dtype=torch.int64)
    counts = torch.zeros(len(rows), len(rows[0]), dtype=torch.int64)
    for b, row in enumerate(rows):
        for g, kept in enumerate(row):
            indices[b, g, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
            counts[b, g] = len(kept)
    return Selection(indices=indices, counts=counts, context_len=context_len)


def brute_masks(rows, starts, context_len: int, window: int) -> np.ndarray:
    return np.stack(
        [
            np.stack([visibility(context_len, kept, window, start) for kept in row])
            for row, start in zip(rows, starts, strict=True)
        ]
    )


def as64(*tensors):
    return [t.double().numpy() for t in tensors]


@pytest.mark.randomised
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 3),
    group=st.sampled_from([1, 3, 4]),
    context_len=st.integers(1, 90),
    window=st.integers(1, 40),
    keep_prob=st.sampled_from([0.0, 0.2, 0.7, 1.0]),
    max_pad=st.integers(0, 20),
    query_chunk=st.sampled_from([1, 7, 32, 256]),
)
def test_sparse_prefill_equals_masked_dense(
    seed, batch, group, context_len, window, keep_prob, max_pad, query_chunk
):
    query, key, value, starts, rows = random_case(
        seed, batch, group, 2, context_len, window, 8, keep_prob, max_pad
    )
    selection = pack(rows, context_len)
    scale = 8**-0.5
    out = reference.sparse_prefill(
        query, key, value, selection, window, scale, torch.tensor(starts), query_chunk
    )
    expected = masked_attention(
        *as64(query, key, value), brute_masks(rows, starts, context_len, window), scale
    )
    assert out.dtype == query.dtype and out.shape == query.shape
    np.testing.assert_allclose(out.double().numpy(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.randomised
@pytest.mark.parametrize(
    ("context_len", "window", "group"), [(97, 13, 3), (130, 1, 4), (65, 64, 1), (33, 100, 2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_prefill_low_precision(context_len, window, group, dtype):
    """Low-precision inputs: the error is within twice the rounding of the exact answer to that dtype."""
    seed = fresh_seed()
    query, key, value, starts, rows = random_case(seed, 2, group, 2, context_len, window, 16, 0.3, 10)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    selection = pack(rows, context_len)
    out = reference.sparse_prefill(query, key, value, selection, window, 0.25, torch.tensor(starts), 32)
    assert out.dtype == dtype
    expected = masked_attention(
        *as64(query, key, value), brute_masks(rows, starts, context_len, window), 0.25
    )
    own_rounding = np.abs(torch.from_numpy(expected).to(dtype).double().numpy() - expected).max()
    error = np.abs(out.double().numpy() - expected).max()
    assert error <= 2 * own_rounding + 1e-5, f"seed {seed}: error {error}, rounding {own_rounding}"


def dense64(query, key, value, scale, starts):
    masks = np.stack(
        [np.stack([visibility(query.shape[2], [], query.shape[2] + 1, s)] * key.shape[1]) for s in starts]
    )
    return masked_attention(*as64(query, key, value), masks, scale)


@pytest.mark.randomised
@pytest.mark.parametrize(("context_len", "window"), [(1, 1), (50, 7), (129, 16), (64, 64), (64, 80)])
@pytest.mark.parametrize("group", [1, 3])
def test_everything_kept_or_short_context_equals_dense(context_len, window, group):
    """Keeping every candidate, or a context within the window, is exactly dense causal attention."""
    seed = fresh_seed()
    query, key, value, starts, _ = random_case(seed, 2, group, 2, context_len, window, 8, 0.0, 5)
    scale = 8**-0.5
    mu = torch.full((2,), math.inf, dtype=torch.float64)
    config = TCAConfig(block_size=8, local_window=window)
    key_start = torch.tensor(starts)
    selection = select(
        query[:, :, -1:], key, mu, torch.ones(2, dtype=torch.float64), config, scale, key_start
    )
    out = reference.sparse_prefill(query, key, value, selection, window, scale, key_start, 16)
    expected = dense64(query, key, value, scale, starts)
    np.testing.assert_allclose(out.double().numpy(), expected, atol=2e-5, rtol=1e-5)
    plain = reference.dense_causal(query, key, value, scale, key_start)
    np.testing.assert_allclose(plain.double().numpy(), expected, atol=2e-5, rtol=1e-5)
    # and against torch's own SDPA (no padding)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query.double(),
        key.double().repeat_interleave(group, 1),
        value.double().repeat_interleave(group, 1),
        is_causal=True,
        scale=scale,
    )
    unpadded = select(query[:, :, -1:], key, mu, torch.ones(2, dtype=torch.float64), config, scale)
    alone = reference.sparse_prefill(query, key, value, unpadded, window, scale)
    np.testing.assert_allclose(alone.double().numpy(), sdpa.numpy(), atol=2e-5, rtol=1e-5)


def brute_gamma(
    query_last: np.ndarray, key: np.ndarray, rows, starts, window: int, scale: float
) -> np.ndarray:
    """Dense last-query mass outside (kept keys + the window [L - w, L)), per (batch, head)."""
    batch, n_heads, _ = query_last.shape
    n_kv, context_len = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    gamma = np.zeros((batch, n_heads))
    for b in range(batch):
        for head in range(n_heads):
            kv = head // group
            start = starts[b]
            probs = softmax64(key[b, kv, start:] @ query_last[b, head] * scale)
            attended = set(rows[b][kv]) | set(range(context_len - window, context_len))
            gamma[b, head] = sum(p for i, p in enumerate(probs, start) if i not in attended)
    return gamma


@pytest.mark.randomised
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 2),
    group=st.sampled_from([1, 3, 4]),
    context_len=st.integers(1, 120),
    window=st.integers(1, 40),
    keep_prob=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    value_scale=st.sampled_from([0.01, 1.0, 100.0]),
)
def test_dropped_mass_and_theorem1_bound(seed, batch, group, context_len, window, keep_prob, value_scale):
    query, key, value, starts, rows = random_case(
        seed, batch, group, 2, context_len, window, 8, keep_prob, 15
    )
    value = value * value_scale
    selection = pack(rows, context_len)
    scale = 8**-0.5
    key_start = torch.tensor(starts)
    gamma = last_query_dropped_mass(query[:, :, -1], key, selection, window, scale, key_start)
    expected = brute_gamma(*as64(query[:, :, -1], key), rows, starts, window, scale)
    np.testing.assert_allclose(gamma.double().numpy(), expected, atol=1e-5)
    bound = theorem1_bound(gamma, value)
    v_max = np.abs(value.double().numpy()).max(axis=(-1, -2)).repeat(group, axis=1)  # (B, H)
    np.testing.assert_allclose(bound.double().numpy(), 2 * gamma.double().numpy() * v_max, rtol=1e-6)
    # the real error of the last query's output never exceeds 2 * gamma * max|V| (per element)
    sparse = masked_attention(*as64(query, key, value), brute_masks(rows, starts, context_len, window), scale)
    dense = dense64(query, key, value, scale, starts)
    real = np.abs(sparse[:, :, -1] - dense[:, :, -1]).max(-1)  # (B, H)
    assert (real <= 2 * expected * v_max * (1 + 1e-9) + 1e-12).all()
    tca_out = reference.sparse_prefill(query, key, value, selection, window, scale, key_start)
    tca_real = np.abs(tca_out[:, :, -1].double().numpy() - dense[:, :, -1]).max(-1)
    slack = 1e-5 * np.abs(value.double().numpy()).max()
    assert (tca_real <= bound.double().numpy() + slack).all()


@pytest.mark.randomised
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 3),
    context_len=st.integers(1, 80),
    window=st.integers(1, 30),
    keep_prob=st.sampled_from([0.0, 0.3, 1.0]),
    max_pad=st.integers(0, 30),
)
def test_pair_counts_equal_visible_pairs(seed, batch, context_len, window, keep_prob, max_pad):
    _, _, _, starts, rows = random_case(seed, batch, 1, 3, context_len, window, 2, keep_prob, max_pad)
    tca_pairs, dense_pairs = pair_counts(pack(rows, context_len), torch.tensor(starts), window)
    masks = brute_masks(rows, starts, context_len, window)
    assert tca_pairs.tolist() == masks.sum(axis=(-1, -2)).tolist()
    dense = [int(visibility(context_len, [], context_len + 1, s).sum()) for s in starts]
    assert dense_pairs.tolist() == dense
    assert causal_masks(1, 1, context_len)[0, 0].sum() == context_len * (context_len + 1) // 2


@pytest.mark.randomised
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 3),
    context_len=st.integers(1, 80),
    window=st.integers(1, 30),
    padded=st.booleans(),
)
def test_run_stats_of_several_layers_equal_each_layers_own_counts(seed, batch, context_len, window, padded):
    """``RunStats.flush`` computes every queued layer's figures together (the layers' kept indices
    side by side, of different widths): each layer's must equal ``pair_counts`` of that layer alone
    and the plain batch means of its counts, gamma and bound."""
    n_kv, n_heads, n_layers = 3, 6, 4
    rng = np.random.default_rng(seed)
    cases = [random_case(seed + i, batch, 2, n_kv, context_len, window, 2, rng.choice([0.0, 0.3, 1.0]),
                         30 if padded else 0) for i in range(n_layers)]  # fmt: skip
    starts = torch.tensor(cases[0][3]) if padded else None  # one prefill: one padding for every layer
    stats = RunStats(n_layers, n_kv, n_heads)
    expected = []
    for layer, case in enumerate(cases):
        rows = [[[i for i in head if i >= (cases[0][3][b] if padded else 0)] for head in row]
                for b, row in enumerate(case[4])]  # fmt: skip
        selection = pack(rows, context_len)
        gamma, bound = torch.rand(batch, n_heads, dtype=torch.float64), torch.rand(batch, n_heads)
        stats.record_prefill(layer, selection, starts, window, gamma, bound)
        start = starts if padded else torch.zeros(batch, dtype=torch.int64)
        pairs, dense = pair_counts(selection, start, window)
        expected.append((pairs.sum(0).tolist(), int(dense.sum()), selection.counts.double().mean(0).tolist(),
                         gamma.mean(0).tolist(), bound.double().mean(0).tolist()))  # fmt: skip
    stats.flush()
    for layer, (pairs, dense, kept, gamma, bound) in enumerate(expected):
        where = f"seed {seed}, layer {layer}"
        assert stats.tca_pairs[layer].tolist() == pairs and stats.dense_pairs[layer] == dense, where
        np.testing.assert_allclose(stats.kept_counts[layer], kept, rtol=1e-12, err_msg=where)
        np.testing.assert_allclose(stats.gamma[layer], gamma, rtol=1e-12, err_msg=where)
        np.testing.assert_allclose(stats.error_bound[layer], bound, rtol=1e-6, err_msg=where)
    assert stats.prefills == 1


def after_cache_brute(query, cached_key, cached_value, lengths, key, value, scale) -> np.ndarray:
    """Float64, one (row, query head, new token) at a time: softmax over the head's valid cached
    entries and the new tokens up to this one."""
    batch, n_heads, n, _ = query.shape
    group = n_heads // cached_key.shape[1]
    out = np.zeros(query.shape)
    for b in range(batch):
        for h in range(n_heads):
            g, valid = h // group, int(lengths[b, h // group])
            for i in range(n):
                keys = np.concatenate([cached_key[b, g, :valid], key[b, g, : i + 1]]).astype(np.float64)
                values = np.concatenate([cached_value[b, g, :valid], value[b, g, : i + 1]]).astype(np.float64)
                out[b, h, i] = softmax64(keys @ query[b, h, i].astype(np.float64) * scale) @ values
    return out


@pytest.mark.randomised
@pytest.mark.parametrize("implementation", ["reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,group,n_kv,capacity,n,step",
    [(1, 1, 1, 1, 1, 256), (2, 3, 2, 37, 5, 256), (3, 4, 3, 20, 17, 4)],
)
def test_attend_after_cache_equals_brute_force(
    monkeypatch, implementation, dtype, batch, group, n_kv, capacity, n, step
):
    """A new turn's tokens over each head's cached entries (ragged lengths, some 0 or full) and
    each other, every head in one call, in steps of ``step`` new tokens, queries in transformers'
    strided layout: equal to float64 attention token by token; the slots past a head's length
    hold NaN and must not count."""
    from tca.ops.reference import attention
    from tca.ops.triton import attend_after_cache_sdpa

    monkeypatch.setattr(attention, "AFTER_CACHE_STEP", step)
    attend = {"reference": reference.attend_after_cache, "sdpa": attend_after_cache_sdpa}[implementation]
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    d, scale = 16, 16**-0.5
    query = torch.randn(batch, n_kv * group, n, d, generator=gen) * 2
    cached_key, cached_value = (torch.randn(batch, n_kv, capacity, d, generator=gen) for _ in range(2))
    key, value = (torch.randn(batch, n_kv, n, d, generator=gen) for _ in range(2))
    lengths = torch.randint(0, capacity + 1, (batch, n_kv), generator=gen)
    lengths[0, 0] = capacity  # a full head and, where there is room, an empty one
    if batch * n_kv > 1:
        lengths[-1, -1] = 0
    # the inputs as the implementation gets them (rounded to dtype): the error is then its arithmetic's
    query, cached_key, cached_value, key, value = (
        x.to(dtype).float() for x in (query, cached_key, cached_value, key, value)
    )
    expected = after_cache_brute(*as64(query, cached_key, cached_value), lengths, *as64(key, value), scale)
    past = torch.arange(capacity) >= lengths[..., None]  # (B, G, C): garbage slots
    cached_key, cached_value = (
        x.masked_fill(past[..., None], float("nan")) for x in (cached_key, cached_value)
    )
    strided = query.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, n, d) over (B, n, H, d)
    args = [x.to(dtype) for x in (strided, cached_key, cached_value)] + [lengths.to(torch.int32)]
    out = attend(*args, key.to(dtype), value.to(dtype), scale)
    assert out.dtype == dtype and out.shape == query.shape
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    error = float(np.abs(out.double().numpy() - expected).max())
    assert error <= tolerance, f"seed {seed}: max error {error:.3g}"


@pytest.mark.randomised
@pytest.mark.parametrize("implementation", ["reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,group,n_kv,past,n,window,step,padded",
    [(1, 1, 1, 9, 1, 4, 256, False), (2, 3, 2, 61, 7, 16, 256, True), (3, 2, 2, 40, 13, 100, 5, True)],
)
def test_new_turn_prefill_reads_only_kept_rows_and_windows(
    monkeypatch, implementation, dtype, batch, group, n_kv, past, n, window, step, padded
):
    """A new turn's n queries over its history of ``past`` tokens plus themselves (Lq < L): equal to
    float64 attention over each query's kept keys and window, query by query, when every value
    row outside the kept ones and the windows holds NaN (a new turn's values are read from the host
    at those rows only, ``run.rows_read``); with left padding and windows wider than the history."""
    from tca.core.selection import pack_selection
    from tca.integrations.transformers.run import rows_read
    from tca.ops.reference import attention
    from tca.ops.triton import sparse_prefill_tail_sdpa

    monkeypatch.setattr(attention, "AFTER_CACHE_STEP", step)
    prefill = {"reference": reference.sparse_prefill, "sdpa": sparse_prefill_tail_sdpa}[implementation]
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    d, scale, length = 16, 16**-0.5, past + n
    query = (torch.randn(batch, n_kv * group, n, d, generator=gen) * 2).to(dtype).float()  # as it is given
    key, value = (torch.randn(batch, n_kv, length, d, generator=gen).to(dtype).float() for _ in range(2))
    starts = (
        torch.randint(0, past // 2, (batch,), generator=gen)
        if padded
        else torch.zeros(batch, dtype=torch.int64)
    )
    kept = [
        [torch.nonzero(torch.rand(length, generator=gen) < 0.3).squeeze(-1) for _ in range(n_kv)]
        for _ in range(batch)
    ]
    kept = [[k[(k >= int(starts[b])) & (k < length - window)] for k in row] for b, row in enumerate(kept)]
    selection = pack_selection(kept, length, key.device)
    read = torch.zeros(batch, n_kv, length, dtype=torch.bool)
    rows = rows_read(selection, past, window, key.device)
    for b in range(batch):
        for g in range(n_kv):
            read[b, g, rows[b, g][rows[b, g] < past]] = True
    read[:, :, past:] = True  # the new tokens' own values
    holey = value.masked_fill(~read[..., None], float("nan"))
    out = prefill(
        query.to(dtype), key.to(dtype), holey.to(dtype), selection, window, scale, starts if padded else None
    )
    expected = np.zeros((batch, n_kv * group, n, d))
    k64, v64, q64 = key.double().numpy(), value.double().numpy(), query.double().numpy()
    for b in range(batch):
        for h in range(n_kv * group):
            g = h // group
            for i in range(n):
                p = past + i
                seen = sorted(
                    {int(x) for x in kept[b][g] if x <= p - window}
                    | set(range(max(p - window + 1, int(starts[b])), p + 1))
                )
                expected[b, h, i] = softmax64(k64[b, g, seen] @ q64[b, h, i] * scale) @ v64[b, g, seen]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    error = float(np.abs(out.double().numpy() - expected).max())
    assert error <= tolerance, f"seed {seed}: max error {error:.3g}"
