"""Retrieval-head detection (tca.retrieval) against brute force over the full attention matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed, softmax64
from tiny_models import TINY, capture_qk, tiny_llama

from tca.core.calibration import profile_from_retention
from tca.core.config import TCAConfig
from tca.core.retrieval import head_retrieval_scores, probe_ids
from tca.integrations.transformers import calibrate, measure_retention, measure_retrieval

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64, tau=0.8)


def brute_scores(query: np.ndarray, key: np.ndarray, start: int, passage: int, scale: float) -> np.ndarray:
    """Per KV head: max over its query heads of the mean, over copy queries start + i (i < passage - 1),
    of the causal softmax mass on positions i and i + 1."""
    n_heads, n_kv = query.shape[0], key.shape[0]
    group = n_heads // n_kv
    per_head = np.zeros(n_heads)
    for head in range(n_heads):
        g = head // group
        masses = []
        for i in range(passage - 1):
            j = start + i
            row = softmax64(query[head, j] @ key[g, : j + 1].T * scale)
            masses.append(row[i] + row[i + 1])
        per_head[head] = np.mean(masses)
    return per_head.reshape(n_kv, group).max(-1)


@pytest.mark.randomised
@pytest.mark.parametrize(
    "heads,kv,length,start,passage", [(6, 2, 97, 60, 31), (4, 4, 50, 30, 17), (3, 1, 40, 21, 5)]
)
def test_scores_equal_brute_force(heads, kv, length, start, passage):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(heads, length, 8, generator=g) * 2
    key = torch.randn(kv, length, 8, generator=g) * 2
    got = head_retrieval_scores(query, key, start, passage, 0.4).numpy()
    want = brute_scores(query.double().numpy(), key.double().numpy(), start, passage, 0.4)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"seed {seed}")


@pytest.mark.randomised
def test_a_copying_head_scores_near_one_and_a_random_head_near_zero():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    length, start, passage = 200, 120, 60
    key = torch.nn.functional.normalize(torch.randn(2, length, 32, generator=g), dim=-1)
    query = torch.randn(2, length, 32, generator=g) * 0.1
    copy = torch.arange(passage - 1)
    query[0, start + copy] = key[0, copy + 1] * 40.0  # head 0 looks up the successor of its source token
    scores = head_retrieval_scores(query, key, start, passage, 1.0)
    assert scores[0] > 0.95 and scores[1] < 0.1, f"seed {seed}: {scores}"


def test_probe_layout():
    ids = torch.arange(1000, 1400).view(1, -1)
    probe, start, passage = probe_ids(ids, CONFIG)
    assert passage == min(256, 400 - CONFIG.local_window - CONFIG.block_size)
    assert torch.equal(probe[:, start : start + passage], probe[:, :passage])
    assert start - passage >= CONFIG.local_window  # every source token is outside its copy's window
    assert probe.shape[-1] == start + passage
    with pytest.raises(ValueError, match="longer text"):
        probe_ids(ids[:, : CONFIG.local_window + CONFIG.block_size + 1], CONFIG)


@pytest.mark.randomised
def test_measure_retrieval_matches_captured_attention():
    seed = fresh_seed()
    model = tiny_llama(seed)
    ids = torch.randint(0, TINY["vocab_size"], (1, 160), generator=torch.Generator().manual_seed(seed))
    scores = measure_retrieval(model, ids, CONFIG, progress=False)
    probe, start, passage = probe_ids(ids, CONFIG)
    for layer, (query, key, scale) in enumerate(capture_qk(model, probe)):
        want = brute_scores(query, key, start, passage, scale)
        np.testing.assert_allclose(scores[layer], want, atol=1e-5, err_msg=f"seed {seed}, layer {layer}")


@pytest.mark.randomised
@pytest.mark.parametrize("threshold", [None, 0.05, 0.3, 1.0])
def test_heads_at_the_threshold_keep_everything(threshold):
    seed = fresh_seed()
    model = tiny_llama(seed)
    ids = torch.randint(0, TINY["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(seed))
    config = CONFIG.replace(retrieval_threshold=threshold)
    retention = measure_retention(model, ids, config, progress=False)
    plain = profile_from_retention(retention, model, config, 200, "text")
    scores = np.random.default_rng(seed).uniform(0, 0.6, plain.mu.shape)
    profile = profile_from_retention(retention, model, config, 200, "text", scores)
    marked = np.zeros_like(scores, bool) if threshold is None else scores >= threshold
    assert np.array_equal(profile.retrieval, scores)
    assert np.isinf(profile.mu[marked]).all() and (profile.retained[marked] == 1.0).all()
    assert (profile.kept_tokens[marked] == 200 - CONFIG.local_window).all()
    for name in ("mu", "sigma", "retained", "kept_tokens"):
        assert np.array_equal(getattr(profile, name)[~marked], getattr(plain, name)[~marked]), name


@pytest.mark.randomised
def test_calibrate_records_scores():
    seed = fresh_seed()
    model = tiny_llama(seed)
    text = "".join(chr(97 + (i * 7919 + seed) % 26) for i in range(400))

    class Bytes:
        def __call__(self, text, return_tensors="pt", add_special_tokens=False):
            return {"input_ids": torch.tensor([[b % TINY["vocab_size"] for b in text.encode()]])}

    profile = calibrate(model, Bytes(), text=text, config=CONFIG, max_tokens=300, progress=False)
    assert profile.retrieval.shape == profile.mu.shape
    assert ((profile.retrieval >= 0) & (profile.retrieval <= 1 + 1e-6)).all()
    dense = profile.retrieval >= CONFIG.retrieval_threshold
    assert np.isinf(profile.mu[dense]).all() and not math.isnan(profile.retrieval.sum())
