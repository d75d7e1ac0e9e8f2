"""The shared masked causal softmax (``tca.core.softmax``) against a plain ``torch.softmax``.

The reference builds the whole (H, Lq, Lk) score matrix with every KV head repeated for its query
heads, masks it densely, and calls ``torch.softmax`` in float64; rows that see no key are set to
zero by hand. Sizes are odd so chunks, groups and padding do not line up.
"""

from __future__ import annotations

import pytest
import torch
from bruteforce import fresh_seed

from tca.core.softmax import causal_prob_chunks, causal_probs, masked_softmax

pytestmark = pytest.mark.randomised  # every test here draws random inputs (seed printed, replayable)


def dense_reference(query, key, scale, first_row, key_start=None):
    """(B, H, Lq, Lk) float64: softmax over the keys k <= p (and k >= key_start[b]) of each query p."""
    batch, n_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    keys = key.double().repeat_interleave(n_heads // key.shape[1], dim=1)  # (B, H, Lk, d)
    scores = query.double() @ keys.transpose(-1, -2) * scale
    visible = torch.zeros(batch, 1, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        start = 0 if key_start is None else int(key_start[b])
        for i in range(q_len):
            visible[b, 0, i, start : first_row + i + 1] = True
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a row with nothing visible: 0/0 -> 0


def ungroup(probs: torch.Tensor) -> torch.Tensor:
    """(B, G, group, C, S) -> (B, H, C, S), head h = g * group + i."""
    batch, n_kv, group = probs.shape[:3]
    return probs.reshape(batch, n_kv * group, *probs.shape[3:])


def random_case(seed: int, batch: int, n_kv: int, group: int, q_len: int, k_len: int, head_dim: int):
    gen = torch.Generator().manual_seed(seed)
    query = 2.0 * torch.randn(batch, n_kv * group, q_len, head_dim, generator=gen)
    key = torch.randn(batch, n_kv, k_len, head_dim, generator=gen)
    key_start = torch.randint(0, k_len + 3, (batch,), generator=gen)  # some rows see nothing
    return query, key, key_start


@pytest.mark.parametrize(
    ("batch", "n_kv", "group", "q_len", "k_len", "chunk"),
    [(1, 1, 1, 1, 1, 1), (2, 3, 2, 97, 97, 31), (3, 2, 3, 41, 103, 17), (1, 1, 5, 13, 13, 64)],
)
def test_chunks_match_dense_softmax(batch, n_kv, group, q_len, k_len, chunk):
    seed = fresh_seed()
    query, key, key_start = random_case(seed, batch, n_kv, group, q_len, k_len, 7)
    first_row = k_len - q_len
    for start in (None, key_start):
        want = dense_reference(query, key, 0.37, first_row, start)
        got = torch.zeros_like(want)
        covered = 0
        for lo, hi, probs in causal_prob_chunks(query, key, 0.37, chunk, key_start=start):
            assert probs.dtype == torch.float32 and probs.shape[-1] == hi, f"seed {seed}"
            got[:, :, lo - first_row : hi - first_row, :hi] = ungroup(probs).double()
            covered += hi - lo
        assert covered == q_len, f"seed {seed}"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"seed {seed}")


def test_chunks_from_a_start_position():
    seed = fresh_seed()
    query, key, _ = random_case(seed, 1, 2, 3, 59, 59, 5)
    want = dense_reference(query, key, 0.5, 0)
    positions = [lo for lo, _, _ in causal_prob_chunks(query, key, 0.5, 10, start=23)]
    assert positions == [23, 33, 43, 53], f"seed {seed}"
    for lo, hi, probs in causal_prob_chunks(query, key, 0.5, 10, start=23):
        torch.testing.assert_close(
            ungroup(probs).double(), want[:, :, lo:hi, :hi], atol=1e-6, rtol=1e-5, msg=f"seed {seed}"
        )


def test_causal_probs_at_an_explicit_position():
    """Queries at positions 40..50 over only the first 29 keys (fewer keys than the queries' positions)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(6, 11, 5, generator=gen)  # (H, C, d), no batch dimension
    key = torch.randn(3, 61, 5, generator=gen)
    got = causal_probs(query, key[:, :29], 0.8, first_row=40)  # (G, group, C, 29)
    want = dense_reference(query[None], key[None], 0.8, 40)[0, :, :, :29]
    want = want / want.sum(-1, keepdim=True)  # the same softmax, over the first 29 columns only
    got = got.reshape(6, 11, 29).double()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"seed {seed}")


def test_masked_softmax_rows_with_nothing_visible_are_zero():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    scores = 3.0 * torch.randn(5, 9, 23, generator=gen)
    visible = torch.rand(5, 9, 23, generator=gen) < 0.3
    visible[:, 4] = False
    got = masked_softmax(scores, visible)
    want = torch.softmax(scores.double().masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    assert not got.isnan().any() and (got[:, 4] == 0).all(), f"seed {seed}"
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5, msg=f"seed {seed}")
