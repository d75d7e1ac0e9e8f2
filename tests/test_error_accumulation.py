"""``tca.eval.error_accumulation`` on a tiny random Llama against float64 brute force and transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bruteforce import select_head, softmax64, visibility
from tiny_models import TINY, attention_override, build_profile, tiny_llama

from tca.core.config import TCAConfig
from tca.eval.error_accumulation import average_results, error_accumulation
from tca.integrations.transformers import apply

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64)
LENGTH = 100
MARGIN = 2e-5


def fingerprint(n_layers: int = 2) -> dict:
    return {"architecture": "llama", "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}


def sparse_profile(seed: int, n_layers: int = 2):
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.05, 0.5, (n_layers, 2))
    mu[-1, 1] = math.inf  # one dense head among sparse ones
    return build_profile(fingerprint(n_layers), mu, rng.choice([0.3, 1.0], (n_layers, 2)), CONFIG)


def dense_profile(n_layers: int = 2):
    return build_profile(
        fingerprint(n_layers), np.full((n_layers, 2), math.inf), np.ones((n_layers, 2)), CONFIG
    )


def random_ids(seed: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(1, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


def capture_qkv(model, ids) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Per layer: query (H, L, d), key and value (G, L, d) in float64, and the scaling (dense pass)."""
    captured = {}

    def record(module, query, key, value, mask, scaling):
        captured[module.layer_idx] = tuple(t[0].double().numpy() for t in (query, key, value)) + (scaling,)
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        return torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)

    with torch.no_grad(), attention_override(model, "capture-qkv-error-test", record):
        model(input_ids=ids, use_cache=False)
    return [captured[layer] for layer in range(len(captured))]


def brute_layer(query, key, value, scale, mu, sigma) -> tuple[dict[str, np.ndarray], float]:
    """Per query head, by plain loops: the L1 error between the dense softmax's output and the
    output of the softmax renormalised over what TCA lets each query see, gamma, and the bound
    2 gamma max_k ||v_k||_1. Returns the (H,) arrays and the selection's tie margin."""
    n_heads, context_len, _ = query.shape
    n_kv = key.shape[0]
    group = n_heads // n_kv
    window = CONFIG.effective_window
    observed = query[:, context_len - CONFIG.observation_queries :]
    out = {name: np.zeros((n_heads, context_len)) for name in ("err", "gamma", "bound")}
    margin = math.inf
    for g in range(n_kv):
        args = (CONFIG.block_size, CONFIG.local_window, CONFIG.alpha, scale)
        head = select_head(observed, key, g, mu[g], sigma[g], *args)
        margin = min(margin, head.margin)
        seen = visibility(context_len, head.kept, window)
        v_norm = np.abs(value[g]).sum(-1).max()
        for h in range(g * group, (g + 1) * group):
            for j in range(context_len):
                p = softmax64(key[g, : j + 1] @ query[h, j] * scale)
                mask = seen[j, : j + 1]
                p_tca = np.where(mask, p, 0.0) / p[mask].sum()
                out["err"][h, j] = np.abs((p - p_tca) @ value[g, : j + 1]).sum()
                out["gamma"][h, j] = p[~mask].sum()
                out["bound"][h, j] = 2 * out["gamma"][h, j] * v_norm
    figures = {f"{name}_last": x[:, -1] for name, x in out.items()}
    figures.update({f"{name}_mean": x.mean(-1) for name, x in out.items()})
    return {**figures, "all_err": out["err"], "all_bound": out["bound"]}, margin


@pytest.mark.parametrize("seed", [0, 1])
def test_isolated_errors_equal_bruteforce_and_respect_the_bound(seed):
    model, profile, ids = tiny_llama(seed), sparse_profile(seed), random_ids(seed)
    result = error_accumulation(model, profile, ids, chunk=32)
    for layer, (q, k, v, scale) in enumerate(capture_qkv(model, ids)):
        brute, margin = brute_layer(q, k, v, scale, profile.mu[layer], profile.sigma[layer])
        if margin < MARGIN:
            pytest.skip(f"a near tie ({margin:.1e}) that float32 may break either way")
        assert (brute["all_err"] <= brute["all_bound"] * (1 + 1e-9) + 1e-12).all()  # Theorem 1, float64
        heads, row = result["rows"][layer]["heads"], result["rows"][layer]
        for name in ("err_last", "err_mean", "gamma_last", "gamma_mean", "bound_last", "bound_mean"):
            np.testing.assert_allclose(heads[name], brute[name], rtol=1e-4, atol=1e-5, err_msg=name)
        assert row["isolated_err_last"] == pytest.approx(brute["err_last"].mean(), rel=1e-4, abs=1e-5)
        assert row["violations"] == 0 and row["elem_violations"] == 0
        assert row["checked"] == 4 * LENGTH
        assert (np.array(heads["err_last"]) <= np.array(heads["bound_last"]) + 1e-5).all()
        assert max(heads["gamma_mean"]) > 0  # the profile drops something: the check is not vacuous


def test_keep_everything_profile_has_no_error():
    model, ids = tiny_llama(3), random_ids(3)
    result = error_accumulation(model, dense_profile(), ids, chunk=32)
    assert result["input_rel_err"] == 0.0
    assert result["kl_last"] == pytest.approx(0.0, abs=1e-6)
    assert result["kl_second_half_mean"] == pytest.approx(0.0, abs=1e-6)
    for row in result["rows"]:
        assert row["violations"] == 0 and row["elem_violations"] == 0
        assert row["gamma_mean"] == 0.0 and row["bound_mean"] == 0.0
        for name in ("isolated_err_last", "isolated_err_mean", "hidden_rel_err_mean", "hidden_rel_err_last"):
            assert row[name] == pytest.approx(0.0, abs=1e-5), name


def transformers_hidden_and_logits(model, ids, profile=None):
    """Hidden states (layer 0's input, outputs of all layers but the last) and logits, from transformers."""
    with torch.no_grad():
        if profile is None:
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        else:
            with apply(model, profile):
                out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    return [h[0] for h in out.hidden_states[:-1]], out.logits[0]  # the last entry is after the final norm


@pytest.mark.parametrize("n_layers", [2, 3])
def test_compounded_errors_match_transformers_outputs(n_layers):
    seed = 5 + n_layers
    model, profile, ids = (
        tiny_llama(seed, num_hidden_layers=n_layers),
        sparse_profile(seed, n_layers),
        random_ids(seed),
    )
    result = error_accumulation(model, profile, ids, chunk=32)
    assert [row["layer"] for row in result["rows"]] == list(range(n_layers))
    assert result["input_rel_err"] == 0.0  # layer 0's input does not depend on attention
    dense_hidden, dense_logits = transformers_hidden_and_logits(model, ids)
    tca_hidden, tca_logits = transformers_hidden_and_logits(model, ids, profile)
    for layer, (d, t) in enumerate(zip(dense_hidden[1:], tca_hidden[1:], strict=True)):
        rel = ((t - d).norm(dim=-1) / d.norm(dim=-1)).double().numpy()
        row = result["rows"][layer]
        assert row["hidden_rel_err_last"] == pytest.approx(rel[-1], rel=1e-3, abs=1e-6)
        assert row["hidden_rel_err_mean"] == pytest.approx(rel.mean(), rel=1e-3, abs=1e-6)
        assert row["hidden_rel_err_mean_past_window"] == pytest.approx(rel[32:].mean(), rel=1e-3, abs=1e-6)
    assert result["rows"][-1]["hidden_rel_err_mean"] > 1e-4  # TCA did change something
    p, q = torch.log_softmax(dense_logits.double(), -1), torch.log_softmax(tca_logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).numpy()
    assert result["kl_last"] == pytest.approx(kl[-1], rel=1e-3, abs=1e-7)
    assert result["kl_second_half_mean"] == pytest.approx(kl[LENGTH // 2 :].mean(), rel=1e-3, abs=1e-7)


def test_average_results_means_figures_and_sums_counts():
    model, profile = tiny_llama(9), sparse_profile(9)
    first, second = (error_accumulation(model, profile, random_ids(s), chunk=32) for s in (9, 10))
    averaged = average_results([first, second])
    assert averaged["inputs"] == 2 and len(averaged["rows"]) == 2
    assert averaged["kl_last"] == pytest.approx((first["kl_last"] + second["kl_last"]) / 2)
    for row, a, b in zip(averaged["rows"], first["rows"], second["rows"], strict=True):
        assert row["layer"] == a["layer"]
        assert row["bound_mean"] == pytest.approx((a["bound_mean"] + b["bound_mean"]) / 2)
        assert row["checked"] == a["checked"] + b["checked"]
        assert row["violations"] == a["violations"] + b["violations"]
        np.testing.assert_allclose(
            row["heads"]["err_last"], (np.array(a["heads"]["err_last"]) + b["heads"]["err_last"]) / 2
        )


def test_batch_of_two_is_refused():
    with pytest.raises(ValueError, match="one sequence"):
        error_accumulation(tiny_llama(0), sparse_profile(0), random_ids(0).repeat(2, 1))
