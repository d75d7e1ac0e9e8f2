"""Calibration (DESIGN 2.2) on a tiny random Llama against brute force from the dense attention matrix."""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import pytest
import torch
from bruteforce import brute_retention, fresh_seed, select_head
from tiny_models import TINY, capture_qk, tiny_llama

from tca.core.budgets import candidate_grid
from tca.core.calibration import calibration_ids, profile_from_retention
from tca.core.config import TCAConfig
from tca.integrations.transformers import (
    ContextTooLongError,
    UnsupportedModelError,
    calibrate,
    measure_retention,
)

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64, tau=0.8)
CONTEXT = 301
MARGIN = 2e-5


TOLERANCE = 1e-6  # calibration accepts a retained mass >= tau - TOLERANCE
# Masses the library sums from float32 attention differ from this file's float64 ones by ~1e-8
# (up to ~1e-7 per key): a retained mass this close to tau - TOLERANCE may pass or not there.
ROUNDING = 1e-7


def brute_oracle(base: float, values: np.ndarray, tau: float) -> tuple[int, int]:
    """Fewest candidate keys whose retained mass reaches tau (the best k keys are the k largest), as
    the range of counts rounding allows: with every mass ``ROUNDING`` larger, and smaller. Almost
    always one count; where the mass crosses the threshold within rounding, two or more."""
    reach = base + np.cumsum(sorted(values, reverse=True))

    def fewest(threshold: float) -> int:
        if base >= threshold:
            return 0
        reached = np.flatnonzero(reach >= threshold)
        return int(reached[0]) + 1 if len(reached) else len(reach)

    return fewest(tau - TOLERANCE - ROUNDING), fewest(tau - TOLERANCE + ROUNDING)


@pytest.fixture
def calibrated():
    """(seed, model, ids, retention, captured q/k) for the test's seed (computed once per seed)."""
    return _calibrated(fresh_seed())


@functools.lru_cache(maxsize=1)
def _calibrated(seed: int):
    model = tiny_llama(seed)
    ids = torch.randint(0, TINY["vocab_size"], (1, CONTEXT), generator=torch.Generator().manual_seed(seed))
    retention = measure_retention(model, ids, CONFIG, progress=False)
    return seed, model, ids, retention, capture_qk(model, ids)


@pytest.mark.randomised
def test_layer_retention_equals_brute_force(calibrated):
    seed, _, _, retention, captured = calibrated
    window = CONFIG.effective_window
    candidates = candidate_grid(CONFIG.candidates)
    compared = 0
    for layer, (query, key, scale) in enumerate(captured):
        base, values = brute_retention(query, key, scale, window)
        stats = retention[layer]
        np.testing.assert_allclose(stats.base.numpy(), base, atol=1e-6, err_msg=f"seed {seed}")
        np.testing.assert_allclose(stats.values.numpy(), values, atol=1e-7, err_msg=f"seed {seed}")
        assert abs(base + values.sum(-1) - 1).max() < 1e-9, "every query's mass is in its window or outside"
        observed = query[:, -CONFIG.observation_queries :]
        for m, (mu, sigma) in enumerate(candidates):
            for g in range(key.shape[0]):
                head = select_head(
                    observed, key, g, mu, sigma, CONFIG.block_size, CONFIG.local_window, CONFIG.alpha, scale
                )
                if head.margin < MARGIN:
                    continue
                compared += 1
                assert int(stats.kept[m, g]) == len(head.kept), f"seed {seed}, layer {layer}, candidate {m}"
                retained = base[g] + values[g, head.kept].sum()
                assert float(stats.retained[m, g]) == pytest.approx(retained, abs=1e-6), f"seed {seed}"
    assert compared >= len(candidates) * 2, f"seed {seed}: too many near ties"


@pytest.mark.randomised
@pytest.mark.parametrize("tau", [0.3, 0.6, 0.8, 0.9, 0.97, 1.0])
def test_choice_passes_tau_and_oracle_is_minimum(calibrated, tau):
    seed, model, _, retention, captured = calibrated
    config = CONFIG.replace(tau=tau)
    profile = profile_from_retention(retention, model, config, CONTEXT, "calibration text")
    candidates = candidate_grid(config.candidates)
    n_candidates = CONTEXT - config.effective_window
    checked = 0  # heads checked; a head with a near tie that float32 may break either way is not
    for layer, (query, key, scale) in enumerate(captured):
        base, values = brute_retention(query, key, scale, config.effective_window)
        for g in range(key.shape[0]):
            where = f"seed {seed}, tau {tau}, layer {layer}, head {g}"
            fewest, most = brute_oracle(base[g], values[g], tau)
            oracle = int(profile.oracle_tokens[layer, g])
            assert fewest <= oracle <= most, f"{where}: oracle {oracle}, brute force {fewest}..{most}"
            # brute-force choice: among candidates whose retained mass reaches tau, the fewest kept tokens
            passing, tie = [], False
            for mu, sigma in candidates:
                head = select_head(
                    query[:, -CONFIG.observation_queries :],
                    key,
                    g,
                    mu,
                    sigma,
                    config.block_size,
                    config.local_window,
                    config.alpha,
                    scale,
                )
                retained = base[g] + values[g, head.kept].sum()
                tie = tie or head.margin < MARGIN or abs(retained - (tau - TOLERANCE)) < ROUNDING
                if retained >= tau - TOLERANCE:
                    passing.append((len(head.kept), mu, sigma, retained))
            if tie:
                continue
            checked += 1
            assert profile.kept_tokens[layer, g] >= profile.oracle_tokens[layer, g], where
            if not passing:
                assert math.isinf(profile.mu[layer, g]), (
                    f"{where}: no candidate passes, the head must be dense"
                )
                assert profile.retained[layer, g] == 1.0 and profile.kept_tokens[layer, g] == n_candidates
                continue
            kept, mu, sigma, retained = min(passing, key=lambda p: p[0])  # first in grid order among equals
            assert (profile.mu[layer, g], profile.sigma[layer, g]) == (mu, sigma), where
            assert profile.kept_tokens[layer, g] == kept, where
            assert profile.retained[layer, g] == pytest.approx(retained, abs=1e-6), where
            assert profile.retained[layer, g] >= tau - TOLERANCE and kept >= fewest, where
    if checked == 0:
        pytest.skip(f"seed {seed}, tau {tau}: every head has a near tie")


@pytest.mark.randomised
def test_dense_when_nothing_passes(calibrated):
    """With one sharp, tiny candidate and tau = 1, no candidate passes: every head is dense."""
    _, model, _, retention, _ = calibrated
    config = CONFIG.replace(tau=1.0, candidates=1)
    sub = [type(r)(base=r.base, values=r.values, retained=r.retained[:1], kept=r.kept[:1]) for r in retention]
    assert all((r.retained < 1 - 1e-6).all() for r in sub)
    profile = profile_from_retention(sub, model, config, CONTEXT, "text")
    assert np.isinf(profile.mu).all() and (profile.retained == 1.0).all()
    assert (profile.kept_tokens == CONTEXT - config.effective_window).all()
    assert (profile.keep_ratios(CONTEXT) == 1.0).all()


@pytest.mark.randomised
def test_profile_metadata(calibrated):
    _, model, _, retention, _ = calibrated
    profile = profile_from_retention(retention, model, CONFIG, CONTEXT, "some text")
    assert profile.fingerprint == {
        "architecture": "llama",
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "managed_layers": [0, 1],
    }
    assert profile.calibration_tokens == CONTEXT and profile.config == CONFIG
    assert profile.text_sha256 == hashlib.sha256(b"some text").hexdigest()
    assert profile.mu.shape == profile.sigma.shape == (2, 2)


class CharTokenizer:
    """Bytes as token ids (mod the tiny vocabulary), in the transformers call convention."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        return {"input_ids": torch.tensor([[b % TINY["vocab_size"] for b in text.encode()]])}


@pytest.mark.randomised
def test_calibrate_end_to_end_with_given_text():
    seed = fresh_seed()
    model = tiny_llama(seed)
    text = "".join(chr(97 + (i * 7919 + seed) % 26) for i in range(400))
    profile = calibrate(model, CharTokenizer(), text=text, config=CONFIG, max_tokens=CONTEXT, progress=False)
    assert profile.calibration_tokens == CONTEXT
    assert (profile.retained >= CONFIG.tau - 1e-6).all()
    assert (profile.kept_tokens >= profile.oracle_tokens).all()
    with pytest.raises(ValueError, match="pass a longer text"):
        calibrate(model, CharTokenizer(), text="short", config=CONFIG, progress=False)


def test_a_cap_below_the_configuration_names_the_cap_not_the_text():
    """A long text cut by ``max_tokens`` below what the configuration needs: the cap is named."""
    needed = CONFIG.local_window + 4 * CONFIG.block_size  # 96
    with pytest.raises(ValueError, match=f"max_tokens={needed - 1} cuts .* raise max_tokens"):
        calibration_ids(CharTokenizer(), "a" * 1000, CONFIG, max_tokens=needed - 1)
    assert calibration_ids(CharTokenizer(), "a" * 1000, CONFIG, max_tokens=needed).shape == (1, needed)
    with pytest.raises(ValueError, match=f"has {needed - 1} tokens.*pass a longer text"):
        calibration_ids(CharTokenizer(), "a" * (needed - 1), CONFIG, max_tokens=4096)


class BosTokenizer(CharTokenizer):
    """Like Gemma's: a BOS token before every text unless ``add_special_tokens=False``."""

    bos_token_id = 2

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        if add_special_tokens:
            ids = torch.cat([torch.tensor([[self.bos_token_id]]), ids], -1)
        return {"input_ids": ids}


def test_calibration_text_starts_as_the_tokenizer_starts_a_text():
    text = "".join(chr(97 + i % 26) for i in range(400))
    plain = calibration_ids(CharTokenizer(), text, CONFIG, 300)
    with_bos = calibration_ids(BosTokenizer(), text, CONFIG, 300)
    assert plain.shape == with_bos.shape == (1, 300)
    assert with_bos[0, 0] == 2 and torch.equal(with_bos[0, 1:], plain[0, :-1])


def test_calibration_errors():
    model = tiny_llama(0, max_position_embeddings=64)
    with pytest.raises(ContextTooLongError, match="65"):
        measure_retention(model, torch.zeros(1, 65, dtype=torch.int64), CONFIG, progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        measure_retention(gpt2, torch.zeros(1, 10, dtype=torch.int64), CONFIG, progress=False)
