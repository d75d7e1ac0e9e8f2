"""Online selection (DESIGN 2.1) and the budget family against brute-force implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed, rank_fraction, round_half_up, select_head
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tca.core.budgets import DENSE, block_budgets, candidate_grid, nominal_kept, rank_fractions
from tca.core.config import TCAConfig
from tca.core.selection import forward_hold, rank_blocks, select

MARGIN = 2e-5  # a float32 implementation may order two things differently closer than this


def make_inputs(
    seed: int, batch: int, n_heads: int, n_kv: int, context_len: int, head_dim: int = 16, n_obs: int = 1
):
    """Peaked random queries/keys (logit spread of a few units) and random head configurations."""
    gen = torch.Generator().manual_seed(seed)
    query = 3.0 * torch.randn(batch, n_heads, n_obs, head_dim, generator=gen)
    key = torch.randn(batch, n_kv, context_len, head_dim, generator=gen)
    mu = torch.exp(
        torch.empty(n_kv, dtype=torch.float64).uniform_(math.log(0.01), math.log(2.0), generator=gen)
    )
    sigma = torch.empty(n_kv, dtype=torch.float64).uniform_(0.2, 1.5, generator=gen)
    return query, key, mu, sigma


@pytest.mark.randomised
@pytest.mark.parametrize("length", [1, 2, 3, 17, 64, 1000])
@pytest.mark.parametrize("decay", [0.0, 0.1, 0.5, 0.97])
def test_forward_hold_equals_its_definition(length, decay):
    """``forward_hold``'s doubling steps against out[p] = max_j values[p - j] * decay**j."""
    seed = fresh_seed()
    values = torch.rand(2, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values[:, torch.rand(length, generator=torch.Generator().manual_seed(seed + 1)) < 0.5] = 0.0
    got = forward_hold(values, decay)
    for p in range(length):
        expected = torch.stack([values[:, p - j] * decay**j for j in range(p + 1)]).amax(0)
        assert torch.allclose(got[:, p], expected, rtol=1e-12, atol=0), f"seed {seed}, p {p}"


def brute_rows(query, key, mu, sigma, config: TCAConfig, scale, starts):
    """Brute-force kept indices per (batch, KV head) in the batch index space, and the smallest margin."""
    rows, margin = [], math.inf
    for b, start in enumerate(starts):
        q = query[b].double().numpy()
        k = key[b, :, start:].double().numpy()
        row = []
        for g in range(key.shape[1]):
            head = select_head(
                q,
                k,
                g,
                float(mu[g]),
                float(sigma[g]),
                config.block_size,
                config.local_window,
                config.alpha,
                scale,
                config.observation_max,
                config.continuation,
            )
            row.append([i + start for i in head.kept])
            margin = min(margin, head.margin)
        rows.append(row)
    return rows, margin


def assert_matches(selection, rows, context_len, message=""):
    assert selection.context_len == context_len
    batch, n_kv = len(rows), len(rows[0])
    width = max((len(r) for row in rows for r in row), default=0)
    assert tuple(selection.indices.shape) == (batch, n_kv, width), message
    for b in range(batch):
        for g in range(n_kv):
            expected = rows[b][g]
            count = int(selection.counts[b, g])
            assert count == len(expected), f"{message} (b={b}, g={g})"
            assert selection.indices[b, g, :count].tolist() == expected, f"{message} (b={b}, g={g})"
            assert (selection.indices[b, g, count:] == context_len).all(), f"{message}: padding must equal L"


@pytest.mark.randomised
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize(
    ("context_len", "block_size", "window"),
    [
        (1, 8, 0),
        (1, 8, 1),
        (7, 8, 0),
        (9, 8, 1),
        (16, 16, 5),
        (17, 16, 0),
        (15, 16, 0),
        (50, 8, 50),
        (51, 8, 50),
        (1000, 64, 37),
        (1001, 32, 1),
    ],
)
def test_select_equals_brute_force(context_len, block_size, window, group):
    seed = fresh_seed()
    n_kv = 2
    query, key, mu, sigma = make_inputs(seed, 1, n_kv * group, n_kv, context_len)
    config = TCAConfig(block_size=block_size, local_window=window, alpha=0.5)
    scale = 16**-0.5
    rows, margin = brute_rows(query, key, mu, sigma, config, scale, [0])
    if margin < MARGIN:
        pytest.skip(f"seed {seed}: a near tie ({margin:.2e}) that float32 may break either way")
    selection = select(query, key, mu, sigma, config, scale)
    assert_matches(selection, rows, context_len, f"seed {seed}")


@pytest.mark.randomised
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    group=st.sampled_from([1, 3, 4]),
    n_kv=st.integers(1, 3),
    context_len=st.integers(1, 300),
    block_size=st.integers(1, 40),
    window=st.integers(0, 40),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    n_obs=st.integers(1, 4),
    dense_head=st.booleans(),
    observation_max=st.sampled_from([0.0, 0.25, 1.0]),
    continuation=st.sampled_from([0.0, 0.3, 0.9]),
)
def test_select_equals_brute_force_random_shapes(
    seed, group, n_kv, context_len, block_size, window, alpha, n_obs, dense_head, observation_max,
    continuation,
):  # fmt: skip
    """Random shapes and options, the importance options included (the strongest observation
    query's weight, the forward hold): the kept indices of the plain float64 brute force."""
    query, key, mu, sigma = make_inputs(seed, 1, n_kv * group, n_kv, context_len, n_obs=n_obs)
    if dense_head:
        mu[0] = math.inf
    config = TCAConfig(
        block_size=block_size,
        local_window=window,
        alpha=alpha,
        observation_max=observation_max,
        continuation=continuation,
    )
    scale = 16**-0.5
    rows, margin = brute_rows(query, key, mu, sigma, config, scale, [0])
    assume(margin >= MARGIN)
    assert_matches(select(query, key, mu, sigma, config, scale), rows, context_len)


@pytest.mark.randomised
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    group=st.sampled_from([1, 3, 4]),
    context_len=st.integers(1, 200),
    pads=st.lists(st.integers(0, 60), min_size=2, max_size=3),
    block_size=st.integers(1, 24),
    window=st.integers(0, 30),
)
def test_left_padded_batch_equals_separate_runs(seed, group, context_len, pads, block_size, window):
    """A batch with key_start selects each row on its valid part: equal to batch-1 runs and to brute force."""
    n_kv = 2
    starts = [min(p, context_len - 1) for p in pads]
    query, key, mu, sigma = make_inputs(seed, len(starts), n_kv * group, n_kv, context_len)
    config = TCAConfig(block_size=block_size, local_window=window)
    scale = 16**-0.5
    rows, margin = brute_rows(query, key, mu, sigma, config, scale, starts)
    assume(margin >= MARGIN)
    key_start = torch.tensor(starts)
    batched = select(query, key, mu, sigma, config, scale, key_start)
    assert_matches(batched, rows, context_len)
    for b, start in enumerate(starts):
        alone = select(query[b : b + 1], key[b : b + 1, :, start:], mu, sigma, config, scale)
        for g in range(n_kv):
            count = int(batched.counts[b, g])
            assert int(alone.counts[0, g]) == count
            assert torch.equal(alone.indices[0, g, :count] + start, batched.indices[b, g, :count])


@pytest.mark.randomised
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    group=st.sampled_from([1, 3, 4]),
    context_len=st.integers(1, 400),
    start=st.integers(0, 50),
    block_size=st.integers(1, 64),
    window=st.integers(0, 64),
)
def test_selection_properties(seed, group, context_len, start, block_size, window):
    """Unique, sorted, in [start, L - w_eff), disjoint from the window; per-block counts = rank budgets."""
    n_kv = 2
    start = min(start, context_len - 1)
    query, key, mu, sigma = make_inputs(seed, 1, n_kv * group, n_kv, context_len)
    config = TCAConfig(block_size=block_size, local_window=window)
    scale = 16**-0.5
    selection = select(query, key, mu, sigma, config, scale, torch.tensor([start]))
    w_eff = max(window, 1)
    assert selection.indices.dtype == torch.int64
    for g in range(n_kv):
        count = int(selection.counts[0, g])
        kept = selection.indices[0, g, :count].tolist()
        assert (selection.indices[0, g, count:] == context_len).all()
        assert kept == sorted(set(kept)), "indices must be unique and ascending"
        assert all(start <= i < context_len - w_eff for i in kept), (
            "kept must precede the last query's window"
        )
        # per-block counts: blocks laid from the first candidate key (start); budget of the block's rank
        n_candidates = context_len - start - w_eff
        if n_candidates <= 0:
            assert count == 0
            continue
        q = query[0].double().numpy()
        k = key[0, :, start:].double().numpy()
        brute = select_head(q, k, g, float(mu[g]), float(sigma[g]), block_size, window, config.alpha, scale)
        assume(brute.margin >= MARGIN)
        per_block = [0] * len(brute.blocks)
        for i in kept:
            per_block[(i - start) // block_size] += 1
        for rank, block in enumerate(brute.ranking):
            assert per_block[block] == brute.budgets[rank]
        # independent of the ranking: full blocks' counts are the full-length budgets, as a multiset
        full = [j for j, members in enumerate(brute.blocks) if len(members) == block_size]
        full_budgets = [
            round_half_up(rank_fraction(r, len(brute.blocks), float(mu[g]), float(sigma[g])) * block_size)
            for r, j in enumerate(brute.ranking)
            if j in full
        ]
        assert sorted(per_block[j] for j in full) == sorted(full_budgets)


@pytest.mark.randomised
@pytest.mark.parametrize("context_len", [1, 5, 130, 257])
def test_dense_heads_keep_every_candidate(context_len):
    seed = fresh_seed()
    query, key, _, sigma = make_inputs(seed, 1, 4, 2, context_len)
    mu = torch.full((2,), math.inf, dtype=torch.float64)
    config = TCAConfig(block_size=16, local_window=7)
    selection = select(query, key, mu, sigma, config, 0.25)
    expected = list(range(max(context_len - 7, 0)))
    for g in range(2):
        assert selection.indices[0, g, : int(selection.counts[0, g])].tolist() == expected


def test_ties_go_to_the_lower_index():
    """Zero keys make every probability exactly equal (identical random keys need not, under CPU matmul
    rounding): blocks and tokens must be taken lowest index first."""
    context_len, block_size, window = 100, 10, 4
    query = torch.randn(1, 2, 1, 8)
    key = torch.zeros(1, 1, context_len, 8)
    mu, sigma = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    config = TCAConfig(block_size=block_size, local_window=window)
    selection = select(query, key, mu, sigma, config, 8**-0.5)
    brute = select_head(
        query[0].double().numpy(), key[0].double().numpy(), 0, 0.3, 0.5, block_size, window, 0.5, 8**-0.5
    )
    assert brute.ranking[:9] == list(range(9)), "equal full blocks rank by index"
    assert selection.indices[0, 0, : int(selection.counts[0, 0])].tolist() == brute.kept
    for rank, budget in enumerate(brute.budgets[:9]):
        assert [i for i in brute.kept if i // block_size == rank] == list(
            range(rank * 10, rank * 10 + budget)
        )


def brute_block_scores(importance: np.ndarray, block_size: int, alpha: float) -> list[float]:
    n = len(importance)
    n_blocks = math.ceil(n / block_size)
    scores = []
    for j in range(n_blocks):
        members = importance[j * block_size : (j + 1) * block_size]
        mass = float(members.sum())
        hhi = float((members**2).sum()) / mass**2 if mass > 0 else 1.0
        scores.append((1 - alpha) * mass * n_blocks + alpha * (1 - hhi))
    return scores


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_zero_mass_block_has_hhi_one(alpha):
    """A block with no mass counts as concentrated (HHI 1): score (1 - alpha) * 0 + alpha * 0 = 0."""
    importance = torch.tensor([[0.2, 0.1, 0.0, 0.0, 0.3, 0.3, 0.1, 0.0, 0.0]], dtype=torch.float32)
    order, lengths = rank_blocks(importance, 2, alpha)
    scores = brute_block_scores(importance[0].double().numpy(), 2, alpha)
    assert lengths.tolist() == [2, 2, 2, 2, 1]
    assert scores[1] == 0.0 and scores[4] == 0.0
    expected = sorted(range(5), key=lambda j: (-round(scores[j], 6), j))
    assert order[0].tolist() == expected


# ---- budgets.py -----------------------------------------------------------------------------------


@pytest.mark.randomised
@settings(max_examples=60, deadline=None)
@given(
    mu=st.floats(1e-3, 10.0),
    sigma=st.floats(0.1, 3.0),
    n_blocks=st.integers(1, 300),
    factor=st.floats(1.0, 5.0),
)
def test_rank_fractions(mu, sigma, n_blocks, factor):
    mu_t, sigma_t = torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    fractions = rank_fractions(mu_t, sigma_t, n_blocks)
    assert fractions.dtype == torch.float64 and fractions.shape == (n_blocks,)
    expected = [rank_fraction(r, n_blocks, mu, sigma) for r in range(n_blocks)]
    np.testing.assert_allclose(fractions.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert ((fractions >= 0) & (fractions <= 1)).all()
    # non-increasing in rank: the closed form's differences of E[min(X, c)] carry ~1e-16 noise where the
    # curve is flat at 1, so allow that much; the integer budgets of equal blocks must be exactly monotone
    assert (fractions[1:] <= fractions[:-1] + 1e-12).all(), "non-increasing in rank"
    equal_blocks = block_budgets(fractions, torch.full((n_blocks,), 128))
    assert (equal_blocks[1:] <= equal_blocks[:-1]).all()
    larger = rank_fractions(mu_t * factor, sigma_t, n_blocks)
    assert (larger >= fractions - 1e-12).all(), "a larger mu keeps at least as much at every rank"
    budgets = block_budgets(larger, torch.full((n_blocks,), 17))
    assert (block_budgets(fractions, torch.full((n_blocks,), 17)) <= budgets).all()


@pytest.mark.randomised
@settings(max_examples=60, deadline=None)
@given(
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50),
    lengths=st.lists(st.integers(0, 200), min_size=50, max_size=50),
)
def test_block_budgets_round_half_up(fractions, lengths):
    lengths = lengths[: len(fractions)]
    budgets = block_budgets(torch.tensor(fractions, dtype=torch.float64), torch.tensor(lengths))
    assert budgets.dtype == torch.int64
    assert budgets.tolist() == [min(round_half_up(f * n), n) for f, n in zip(fractions, lengths, strict=True)]
    assert block_budgets(torch.tensor([0.5, 0.25, 0.75]), torch.tensor([1, 2, 2])).tolist() == [1, 1, 2]


@pytest.mark.parametrize("n_blocks", [1, 2, 13])
def test_infinite_mu_keeps_everything(n_blocks):
    mu = torch.tensor([math.inf, 0.1])
    sigma = torch.tensor([1.0, 1.0])
    fractions = rank_fractions(mu, sigma, n_blocks)
    assert (fractions[0] == 1).all()
    lengths = torch.tensor([5] * (n_blocks - 1) + [3])
    assert torch.equal(block_budgets(fractions[0], lengths), lengths)
    assert DENSE[0] == math.inf


@pytest.mark.parametrize(
    ("candidate_len", "block_size"), [(0, 8), (1, 8), (8, 8), (9, 8), (1000, 64), (77, 5)]
)
def test_nominal_kept(candidate_len, block_size):
    mu, sigma = 0.2, 0.7
    expected = 0
    if candidate_len > 0:
        n_blocks = math.ceil(candidate_len / block_size)
        lengths = [block_size] * (n_blocks - 1) + [candidate_len - block_size * (n_blocks - 1)]
        expected = sum(
            min(round_half_up(rank_fraction(r, n_blocks, mu, sigma) * n), n) for r, n in enumerate(lengths)
        )
    as64 = torch.tensor([mu, sigma], dtype=torch.float64)
    assert int(nominal_kept(as64[0], as64[1], candidate_len, block_size)) == expected
    assert (
        int(nominal_kept(torch.tensor(math.inf), torch.tensor(1.0), candidate_len, block_size))
        == candidate_len
    )


@pytest.mark.parametrize("count", [1, 2, 7, 14])
def test_candidate_grid(count):
    grid = candidate_grid(count)
    assert len(grid) == count and len(set(grid)) == count
    assert all(0 < mu < math.inf and sigma > 0 for mu, sigma in grid)
    for sigma in {s for _, s in grid}:
        mus = [m for m, s in grid if s == sigma]
        assert mus == sorted(mus), "cheapest first within a sigma"
