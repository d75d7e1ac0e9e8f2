"""Baseline selection methods (tca.methods) against plain-loop references and the interface contract.

The references below are written from each method's docstring in numpy float64 with Python loops,
independently of ``tca``; comparisons whose outcome a float32 implementation could flip (a near
tie at a cut) are skipped, as in test_select.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed, softmax64

from tca.methods import METHODS, budget_for, get_method

MARGIN = 2e-5  # relative gap below which float32 may order two scores differently
SCALE = 16**-0.5
SMALL_OPTIONS = {
    "vertical_slash": {"observation": 24},
    "flexprefill": {"block": 16},
    "xattention": {"block": 16, "stride": 4},
}


def make_inputs(seed: int, batch: int, n_heads: int, n_kv: int, context_len: int, q_len: int | None = None):
    """Peaked random queries (the last ``q_len`` positions) and keys, head size 16."""
    gen = torch.Generator().manual_seed(seed)
    query = 3.0 * torch.randn(batch, n_heads, q_len or context_len, 16, generator=gen)
    key = torch.randn(batch, n_kv, context_len, 16, generator=gen)
    return query, key


def kept_rows(selection) -> list[list[list[int]]]:
    """Valid indices per (batch, KV head) as lists."""
    batch, n_kv = selection.counts.shape
    return [
        [selection.indices[b, g, : int(selection.counts[b, g])].tolist() for g in range(n_kv)]
        for b in range(batch)
    ]


# ---- plain references -----------------------------------------------------------------------------


def observation_rows(query, key, kv_head, n_obs, n_columns=None):
    """Causal softmax over the first ``n_columns`` keys, for each query head of the KV head's group and
    each of the last ``n_obs`` queries. query: (H, m, d) the last m of n positions; key: (G, n, d).
    Returns (position, probabilities over the columns, zero where not yet visible) pairs."""
    n_heads, m, _ = query.shape
    n_kv, n, _ = key.shape
    group = n_heads // n_kv
    n_columns = n if n_columns is None else n_columns
    rows = []
    for head in range(kv_head * group, (kv_head + 1) * group):
        for i in range(max(0, m - n_obs), m):
            position = n - m + i
            seen = min(position, n_columns - 1) + 1
            probs = np.zeros(n_columns)
            probs[:seen] = softmax64(key[kv_head, :seen] @ query[head, i] * SCALE)
            rows.append((position, probs))
    return rows


def relative_gap(high: float, low: float) -> float:
    gap = (high - low) / max(abs(high), 1e-300)
    return gap if gap > 0 else math.inf  # exact ties are ties in float32 too


def top_by_score(scores, count, columns=None):
    """The ``count`` best columns by (-score, index), and the gap at the cut."""
    columns = list(range(len(scores))) if columns is None else columns
    order = sorted(columns, key=lambda c: (-scores[c], c))
    margin = (
        relative_gap(scores[order[count - 1]], scores[order[count]]) if 0 < count < len(order) else math.inf
    )
    return sorted(order[:count]), margin


def fill_by_blocks(token_scores, block, count):
    """Blocks by total score (ties: lower block), taken whole while they fit; the overflowing one is cut
    to its best tokens."""
    n = len(token_scores)
    blocks = [list(range(j, min(j + block, n))) for j in range(0, n, block)]
    mass = [sum(token_scores[i] for i in members) for members in blocks]
    ranking = sorted(range(len(blocks)), key=lambda j: (-mass[j], j))
    kept, remaining, margin = [], count, math.inf
    for rank, j in enumerate(ranking):
        if rank + 1 < len(ranking):
            margin = min(margin, relative_gap(mass[j], mass[ranking[rank + 1]]))
        take = min(remaining, len(blocks[j]))
        chosen, cut = top_by_score(token_scores, take, blocks[j])
        kept += chosen
        margin = min(margin, cut)
        remaining -= take
        if remaining == 0:
            break
    return sorted(kept), margin


def brute_streaming(query, key, kv_head, count, n_candidates, sinks=4):
    first = min(sinks, count)
    return list(range(first)) + list(range(n_candidates - (count - first), n_candidates)), math.inf


def brute_topk_last(query, key, kv_head, count, n_candidates):
    """Last query's softmax over all keys, summed over the group's heads, top ``count`` candidates."""
    total = sum(probs for _, probs in observation_rows(query, key, kv_head, 1))
    return top_by_score(total[:n_candidates], count)


def brute_snapkv(query, key, kv_head, count, n_candidates, observation=32, pool_kernel=7):
    """Votes of the last ``observation`` queries (softmax over all keys), average-pooled with zero padding."""
    votes = sum(probs for _, probs in observation_rows(query, key, kv_head, observation))[:n_candidates]
    half = pool_kernel // 2
    pooled = [
        sum(votes[j] for j in range(i - half, i + half + 1) if 0 <= j < n_candidates) / pool_kernel
        for i in range(n_candidates)
    ]
    return top_by_score(pooled, count)


def brute_vertical_slash(query, key, kv_head, count, n_candidates, observation=64, vertical_fraction=0.5):
    """Top verticals by column mass, then columns n - 1 - o by the mass of diagonal o."""
    n = key.shape[1]
    vertical, slash = np.zeros(n_candidates), np.zeros(n)
    for position, probs in observation_rows(query, key, kv_head, observation):
        for column in range(position + 1):
            if column < n_candidates:
                vertical[column] += probs[column]
            slash[position - column] += probs[column]
    n_vertical = min(count, math.floor(count * vertical_fraction + 0.5))
    verticals, margin = top_by_score(vertical, n_vertical)
    rest = [c for c in range(n_candidates) if c not in verticals]
    by_column = {c: slash[n - 1 - c] for c in rest}
    slashes, cut = top_by_score(by_column, count - n_vertical, rest)
    return sorted(verticals + slashes), min(margin, cut)


def brute_flexprefill(query, key, kv_head, count, n_candidates, block=64):
    """Mean softmax over the candidates of the last ``block`` queries, then blocks filled by mass."""
    rows = observation_rows(query, key, kv_head, block, n_candidates)
    importance = sum(probs for _, probs in rows) / len(rows)
    return fill_by_blocks(importance, block, count)


def brute_xattention(query, key, kv_head, count, n_candidates, block=64, stride=8):
    """Each stride tile scores one antidiagonal; softmax per query group over visible key groups."""
    n_heads, m, _ = query.shape
    n = key.shape[1]
    group = n_heads // key.shape[0]
    first_query = n - m
    n_groups = math.ceil(n / stride)
    mass = np.zeros(n_groups)
    for head in range(kv_head * group, (kv_head + 1) * group):
        for a in range(first_query // stride, n_groups):
            scores = []
            for b in range(a + 1):
                total = 0.0
                for i in range(stride):
                    q_pos, k_pos = stride * a + stride - 1 - i, stride * b + i
                    if first_query <= q_pos < n and k_pos < n:
                        total += query[head, q_pos - first_query] @ key[kv_head, k_pos]
                scores.append(total * SCALE / stride)
            mass[: a + 1] += softmax64(np.array(scores))
    tokens = [mass[c // stride] / stride for c in range(n_candidates)]
    return fill_by_blocks(tokens, block, count)


BRUTE = {
    "streaming": brute_streaming,
    "topk_last": brute_topk_last,
    "snapkv": brute_snapkv,
    "vertical_slash": brute_vertical_slash,
    "flexprefill": brute_flexprefill,
    "xattention": brute_xattention,
}


@pytest.mark.randomised
@pytest.mark.parametrize("method", sorted(BRUTE))
@pytest.mark.parametrize(
    ("context_len", "window", "budget", "group", "q_len"),
    [
        (97, 5, 30, 1, 97),
        (150, 37, 41, 3, 150),
        (150, 37, 41, 3, 20),
        (120, 1, 7, 2, 120),
        (64, 10, 200, 3, 64),
    ],
)
def test_equals_plain_reference(method, context_len, window, budget, group, q_len):
    """A left-padded batch of 2 against the plain reference run on each row's valid part."""
    seed = fresh_seed()
    n_kv, starts = 2, [0, 13]
    query, key = make_inputs(seed, 2, n_kv * group, n_kv, context_len, q_len)
    options = SMALL_OPTIONS.get(method, {})
    selection = get_method(method, **options).select(query, key, budget, window, SCALE, torch.tensor(starts))
    rows = kept_rows(selection)
    for b, start in enumerate(starts):
        n_keys = context_len - start
        q = query[b, :, max(0, q_len - n_keys) :].double().numpy()
        k = key[b, :, start:].double().numpy()
        n_candidates = max(n_keys - window, 0)
        count = min(budget, n_candidates)
        for g in range(n_kv):
            expected, margin = BRUTE[method](q, k, g, count, n_candidates, **options)
            if margin < MARGIN:
                pytest.skip(f"seed {seed}: a near tie ({margin:.2e}) that float32 may break either way")
            assert rows[b][g] == [i + start for i in expected], f"seed {seed} (b={b}, g={g})"


# ---- the contract ---------------------------------------------------------------------------------


@pytest.mark.randomised
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("context_len", "window", "budget", "q_len", "start"),
    [
        (301, 37, 100, 301, 0),
        (301, 37, 1000, 301, 0),
        (301, 37, 0, 301, 0),
        (30, 37, 10, 30, 0),
        (301, 1, 299, 50, 0),
        (301, 37, 57, 1, 40),
        (301, 37, 5, 301, 260),
        (301, 300, 3, 301, 0),
    ],
)
def test_budget_and_layout(method, context_len, window, budget, q_len, start):
    """counts = min(budget, n_candidates) (full: n_candidates); unique, ascending, in [start, L - w)."""
    seed = fresh_seed()
    query, key = make_inputs(seed, 1, 6, 2, context_len, q_len)
    selection = get_method(method).select(query, key, budget, window, SCALE, torch.tensor([start]))
    n_candidates = max(context_len - start - window, 0)
    expected = n_candidates if method == "full" else min(budget, n_candidates)
    assert selection.context_len == context_len
    assert selection.indices.dtype == torch.int64 and selection.counts.dtype == torch.int64
    assert selection.counts.tolist() == [[expected, expected]]
    assert tuple(selection.indices.shape) == (1, 2, expected)
    for kept in kept_rows(selection)[0]:
        assert kept == sorted(set(kept)), "unique and ascending"
        assert all(start <= i < context_len - window for i in kept)
    if method == "full":
        assert kept_rows(selection)[0] == [list(range(start, context_len - window))] * 2


@pytest.mark.randomised
def test_padding_is_context_len():
    """Rows with fewer candidates than the widest row are padded with L."""
    query, key = make_inputs(fresh_seed(), 2, 6, 2, 301)
    for method in METHODS:
        selection = get_method(method).select(query, key, 250, 37, SCALE, torch.tensor([0, 100]))
        assert selection.counts[1].tolist() == [164, 164]
        assert (selection.indices[1, :, 164:] == 301).all(), method
        assert (selection.indices[1, :, :164] < 301 - 37).all(), method


@pytest.mark.randomised
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("q_len", [301, 60])
def test_batch_equals_separate_runs(method, q_len):
    """Each row is selected on its own valid part: indices equal its batch-1 run shifted by the padding."""
    seed = fresh_seed()
    context_len, window, budget, starts = 301, 37, 83, [23, 0]
    query, key = make_inputs(seed, 2, 6, 2, context_len, q_len)
    selection_method = get_method(method)
    batched = kept_rows(selection_method.select(query, key, budget, window, SCALE, torch.tensor(starts)))
    for b, start in enumerate(starts):
        alone_query = query[b : b + 1, :, max(0, q_len - (context_len - start)) :]
        alone = selection_method.select(alone_query, key[b : b + 1, :, start:], budget, window, SCALE)
        assert [[i + start for i in kept] for kept in kept_rows(alone)[0]] == batched[b], f"seed {seed}"


@pytest.mark.randomised
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_inputs_match_their_float32_values(method):
    query, key = make_inputs(fresh_seed(), 1, 6, 2, 200)
    query, key = query.bfloat16(), key.bfloat16()
    selection_method = get_method(method)
    low = selection_method.select(query, key, 40, 9, SCALE)
    high = selection_method.select(query.float(), key.float(), 40, 9, SCALE)
    assert torch.equal(low.indices, high.indices)


@pytest.mark.parametrize(("method", "first"), [("topk_last", 0), ("flexprefill", 0), ("snapkv", 3)])
def test_ties_go_to_the_lower_index(method, first):
    """Zero keys tie every score exactly (every logit is 0 whatever the matmul's summation order;
    identical random keys did not: CPU matmul rounds some columns differently): the lowest columns
    win (snapkv: its zero-padded pooling lowers the first 3 columns, so the run starts at 3)."""
    query = torch.randn(1, 4, 301, 8)
    key = torch.zeros(1, 2, 301, 8)
    kept = kept_rows(get_method(method).select(query, key, 50, 80, 8**-0.5))[0]
    assert kept == [list(range(first, first + 50))] * 2


def dense_last_mass(query, key, kept, b, g, start) -> float:
    """The last query's dense softmax over all valid keys, summed over the group's heads and kept columns."""
    group = query.shape[1] // key.shape[1]
    total = 0.0
    for head in range(g * group, (g + 1) * group):
        probs = softmax64(key[b, g, start:].double().numpy() @ query[b, head, -1].double().numpy() * SCALE)
        total += sum(probs[i - start] for i in kept)
    return total


@pytest.mark.randomised
@pytest.mark.parametrize("budget", [10, 60, 150])
def test_topk_last_is_the_last_query_oracle(budget):
    """No method keeps more of the last query's dense attention mass at the same budget."""
    seed = fresh_seed()
    starts = [0, 31]
    query, key = make_inputs(seed, 2, 6, 2, 301)
    masses = {}
    for method in METHODS:
        rows = kept_rows(get_method(method).select(query, key, budget, 37, SCALE, torch.tensor(starts)))
        masses[method] = [
            dense_last_mass(query, key, rows[b][g], b, g, start)
            for b, start in enumerate(starts)
            for g in range(2)
        ]
    for method, mass in masses.items():
        if method == "full":  # ignores the budget: it keeps every candidate
            assert all(m >= o - 1e-9 for m, o in zip(mass, masses["topk_last"], strict=True))
            continue
        for oracle, other in zip(masses["topk_last"], mass, strict=True):
            assert oracle >= other - 1e-6, f"seed {seed}: {method} keeps more than topk_last"


@pytest.mark.randomised
def test_random_is_seeded_and_varies():
    query, key = make_inputs(fresh_seed(), 2, 6, 2, 301)
    starts = torch.tensor([0, 0])

    def run(seed):
        return kept_rows(get_method("random", seed=seed).select(query, key, 60, 37, SCALE, starts))

    first = run(0)
    assert first == run(0), "reproducible for one seed"
    assert first != run(1), "another seed draws another subset"
    assert first[0][0] != first[0][1], "KV heads draw differently"
    assert first[0][0] != first[1][0], "rows with different contents draw differently"


# ---- registry and budget_for ----------------------------------------------------------------------


def test_registry():
    assert set(METHODS) == {
        "full",
        "streaming",
        "snapkv",
        "vertical_slash",
        "flexprefill",
        "xattention",
        "random",
        "topk_last",
    }
    for name in METHODS:
        assert get_method(name).name == name
    with pytest.raises(ValueError) as error:
        get_method("h2o")
    assert "h2o" in str(error.value)
    assert all(name in str(error.value) for name in METHODS)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("snapkv", {"pool_kernel": 4}),
        ("snapkv", {"observation": 0}),
        ("snapkv", {"block": 8}),
        ("full", {"seed": 1}),
        ("streaming", {"sinks": -1}),
        ("vertical_slash", {"vertical_fraction": 1.5}),
        ("flexprefill", {"block": 0}),
        ("xattention", {"stride": 0}),
        ("random", {"seed": 0.5}),
    ],
)
def test_bad_options(name, options):
    with pytest.raises(ValueError):
        get_method(name, **options)


@pytest.mark.parametrize(("budget", "window"), [(-1, 4), (3, 0), (2.0, 4), (True, 4)])
def test_bad_budget_or_window(budget, window):
    query, key = make_inputs(0, 1, 2, 1, 20)
    with pytest.raises(ValueError):
        get_method("topk_last").select(query, key, budget, window, SCALE)


@pytest.mark.parametrize(
    ("kept_fraction", "context_len", "window", "expected"),
    [
        (1.0, 1000, 37, 963),
        (0.5, 1000, 37, 463),
        (0.01, 1000, 37, 0),  # the window alone exceeds the fraction
        (0.25, 10, 1, 2),  # 1.5 rounds up
        (0.5, 20, 37, 0),  # context shorter than the window: nothing to keep
        (0.999, 301, 37, 264),  # clipped to L - w
        (0.3, 301, 37, 53),  # 90.3 - 37 = 53.3
    ],
)
def test_budget_for(kept_fraction, context_len, window, expected):
    assert budget_for(kept_fraction, context_len, window) == expected


def test_budget_for_is_the_closest_budget():
    for context_len in (1, 7, 100, 301):
        for window in (1, 5, 37, 400):
            for kept_fraction in np.linspace(0.01, 1.0, 37):
                budget = budget_for(float(kept_fraction), context_len, window)
                allowed = range(0, max(context_len - window, 0) + 1)
                assert budget in allowed
                error = abs((budget + min(window, context_len)) / context_len - kept_fraction)
                best = min(abs((b + min(window, context_len)) / context_len - kept_fraction) for b in allowed)
                assert error <= best + 1e-12


@pytest.mark.parametrize("kept_fraction", [0, 0.0, -0.1, 1.5, math.nan, True, "0.5"])
def test_budget_for_rejects(kept_fraction):
    with pytest.raises(ValueError, match="kept_fraction") as error:
        budget_for(kept_fraction, 100, 4)
    assert repr(kept_fraction) in str(error.value)
