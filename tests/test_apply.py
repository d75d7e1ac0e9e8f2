"""``tca.apply`` on a tiny random Llama against a brute-force model-level reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed, masked_attention, select_head, softmax64, visibility
from tiny_models import TINY, attention_override, build_profile, left_padded, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from tca.core.config import TCAConfig
from tca.core.profile import Profile
from tca.integrations.transformers import ContextTooLongError, UnsupportedModelError, apply

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64)
MARGIN = 2e-5
FINGERPRINT = {"architecture": "llama", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}


def make_profile(mu: np.ndarray, sigma: np.ndarray, config: TCAConfig = CONFIG) -> Profile:
    return build_profile(FINGERPRINT, mu, sigma, config)


def sparse_profile(seed: int) -> Profile:
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.05, 0.5, (2, 2))
    mu[1, 1] = math.inf  # one dense head among sparse ones
    return make_profile(mu, rng.choice([0.3, 1.0], (2, 2)))


def dense_profile() -> Profile:
    return make_profile(np.full((2, 2), math.inf), np.ones((2, 2)))


class BruteTCA:
    """Attention by DESIGN 2.1 + 2.3 in float64: brute selection per (row, KV head), explicit L x L masks."""

    def __init__(self, profile: Profile, starts: list[int]):
        self.profile, self.starts = profile, starts
        self.margin = math.inf
        self.kept: dict[int, list[list[list[int]]]] = {}  # layer -> [b][g] kept indices
        self.masks: dict[int, np.ndarray] = {}
        self.gamma: dict[int, np.ndarray] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling):
        layer, config = module.layer_idx, self.profile.config
        q, k, v = (t.detach().double().numpy() for t in (query, key, value))
        batch, n_kv, context_len, _ = k.shape
        group = q.shape[1] // n_kv
        window = config.effective_window
        kept, masks = [], np.zeros((batch, n_kv, context_len, context_len), dtype=bool)
        gamma = np.zeros((batch, q.shape[1]))
        for b, start in enumerate(self.starts):
            row = []
            for g in range(n_kv):
                observed = min(config.observation_queries, context_len - start)  # never a padding query
                head = select_head(
                    q[b, :, context_len - observed :],
                    k[b, :, start:],
                    g,
                    self.profile.mu[layer, g],
                    self.profile.sigma[layer, g],
                    config.block_size,
                    config.local_window,
                    config.alpha,
                    scaling,
                )
                self.margin = min(self.margin, head.margin)
                row.append([i + start for i in head.kept])
                masks[b, g] = visibility(context_len, row[-1], window, start)
                seen = set(row[-1]) | set(range(context_len - window, context_len))
                for h in range(g * group, (g + 1) * group):
                    probs = softmax64(k[b, g, start:] @ q[b, h, -1] * scaling)
                    gamma[b, h] = sum(p for i, p in enumerate(probs, start) if i not in seen)
            kept.append(row)
        self.kept[layer], self.masks[layer], self.gamma[layer] = kept, masks, gamma
        return torch.from_numpy(masked_attention(q, k, v, masks, scaling)).to(query.dtype)


def brute_logits(model, profile, ids, starts, **inputs):
    brute = BruteTCA(profile, starts)
    with torch.no_grad(), attention_override(model, "brute-tca-test", brute):
        logits = model(input_ids=ids, use_cache=False, **inputs).logits
    if brute.margin < MARGIN:
        pytest.skip(f"a near tie ({brute.margin:.1e}) that float32 may break either way")
    return logits, brute


def tca_logits(model, profile, ids, **inputs):
    with torch.no_grad(), apply(model, profile) as run:
        logits = model(input_ids=ids, use_cache=False, **inputs).logits
    return logits, run


def random_ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(
        1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    state.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]) and tensor.dtype == after[name].dtype, name


# ---- equality with dense -------------------------------------------------------------------------------


@pytest.mark.randomised
@pytest.mark.parametrize("length", [1, 20, 33, 150])
def test_dense_profile_equals_dense_model(length):
    seed = fresh_seed()
    model = tiny_llama(seed)
    ids = random_ids(seed, length)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    logits, run = tca_logits(model, dense_profile(), ids)
    torch.testing.assert_close(logits, dense, atol=2e-5, rtol=1e-5)
    assert run.stats.kept_fraction == pytest.approx(1.0) and run.stats.pairs_fraction == pytest.approx(1.0)


@pytest.mark.randomised
@pytest.mark.parametrize("length", [1, 31, 32])
def test_sequence_within_window_equals_dense(length):
    seed = fresh_seed()
    model = tiny_llama(seed)
    ids = random_ids(seed, length)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    logits, run = tca_logits(model, sparse_profile(seed), ids)
    torch.testing.assert_close(logits, dense, atol=2e-5, rtol=1e-5)
    assert run.stats.pairs_fraction == pytest.approx(1.0)


# ---- equality with the brute-force model ---------------------------------------------------------------


@pytest.mark.randomised
@pytest.mark.parametrize("length", [33, 49, 190])
def test_sparse_profile_equals_brute_force_model(length):
    seed = fresh_seed()
    model = tiny_llama(seed)
    ids = random_ids(seed, length)
    profile = sparse_profile(seed)
    expected, brute = brute_logits(model, profile, ids, [0])
    logits, run = tca_logits(model, profile, ids)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    if length > 100:
        assert not torch.allclose(dense, expected, atol=1e-3), "the sparse profile should change something"
    # statistics against brute-force counts from the masks
    window = CONFIG.effective_window
    kept_entries = [
        [len(brute.kept[layer][0][g]) + min(window, length) for g in range(2)] for layer in range(2)
    ]
    assert run.stats.kept_fraction == pytest.approx(np.mean(kept_entries) / length, rel=1e-12)
    pairs = sum(brute.masks[layer][0].sum(axis=(-1, -2)).mean() for layer in range(2))
    assert run.stats.pairs_fraction == pytest.approx(pairs / (2 * length * (length + 1) / 2), rel=1e-12)
    for layer in range(2):
        assert run.stats.kept_counts[layer].tolist() == [len(kept) for kept in brute.kept[layer][0]]
        np.testing.assert_allclose(run.stats.gamma[layer], brute.gamma[layer][0], atol=1e-4)
    assert (run.stats.gamma[1, 2:] < 1e-6).all(), "a dense head drops nothing (up to float32 rounding)"
    assert run.stats.prefills == 1


@pytest.mark.randomised
def test_left_padded_batch_equals_separate_runs():
    seed = fresh_seed()
    model = tiny_llama(seed)
    profile = sparse_profile(seed)
    prompts = [random_ids(seed, 150)[0], random_ids(seed + 1, 197)[0], random_ids(seed + 2, 60)[0]]
    ids, mask, positions = left_padded(prompts)
    starts = [ids.shape[1] - len(p) for p in prompts]
    batched, run = tca_logits(model, profile, ids, attention_mask=mask, position_ids=positions)
    expected, brute = brute_logits(model, profile, ids, starts, attention_mask=mask, position_ids=positions)
    for b, prompt in enumerate(prompts):
        alone, _ = tca_logits(model, profile, prompt.unsqueeze(0))
        torch.testing.assert_close(
            batched[b, starts[b] :],
            alone[0],
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, b=b: f"seed {seed}, row {b}: {m}",
        )
        torch.testing.assert_close(
            batched[b, starts[b] :],
            expected[b, starts[b] :],
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, b=b: f"seed {seed}, row {b}: {m}",
        )
    # batch statistics (documented as batch-averaged per layer)
    window, lengths = CONFIG.effective_window, np.array([len(p) for p in prompts])
    entries = [
        np.mean(
            [
                [len(brute.kept[layer][b][g]) + min(window, n) for g in range(2)]
                for b, n in enumerate(lengths)
            ],
            axis=0,
        )
        for layer in range(2)
    ]
    assert run.stats.kept_fraction == pytest.approx(np.mean(np.array(entries) / lengths.mean()), rel=1e-12)
    pairs = sum(brute.masks[layer][b].sum(axis=(-1, -2)).mean() for layer in range(2) for b in range(3))
    dense = 2 * (lengths * (lengths + 1) // 2).sum()
    assert run.stats.pairs_fraction == pytest.approx(pairs / dense, rel=1e-12)


@pytest.mark.randomised
def test_left_padded_batch_with_dense_profile_equals_dense_rows():
    seed = fresh_seed()
    model = tiny_llama(seed)
    prompts = [random_ids(seed, 40)[0], random_ids(seed + 1, 71)[0]]
    ids, mask, positions = left_padded(prompts)
    batched, _ = tca_logits(model, dense_profile(), ids, attention_mask=mask, position_ids=positions)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(input_ids=prompt.unsqueeze(0), use_cache=False).logits
        torch.testing.assert_close(batched[b, ids.shape[1] - len(prompt) :], alone[0], atol=2e-5, rtol=1e-5)


# ---- restoring the model ---------------------------------------------------------------------------------


@pytest.mark.randomised
def test_model_restored_after_exit_and_after_exception():
    seed = fresh_seed()
    model = tiny_llama(seed)
    ids = random_ids(seed, 120)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    before = snapshot(model)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad(), apply(model, sparse_profile(seed)):
        assert model.config._attn_implementation != "eager"
        model(input_ids=ids, use_cache=False)
    assert model.config._attn_implementation == "eager"
    assert_bit_identical(model, before)
    with (
        pytest.raises(RuntimeError, match="inside the block"),
        torch.no_grad(),
        apply(model, sparse_profile(seed)),
    ):
        model(input_ids=ids, use_cache=False)
        raise RuntimeError("boom inside the block")
    assert model.config._attn_implementation == "eager"
    assert_bit_identical(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, dense), (
            "attention must be dense again"
        )


def test_model_restored_after_error_raised_by_tca():
    model = tiny_llama(0, max_position_embeddings=64)
    before = snapshot(model)
    with pytest.raises(ContextTooLongError, match="65"), torch.no_grad(), apply(model, dense_profile()):
        model(input_ids=torch.ones(1, 65, dtype=torch.int64), use_cache=False)
    assert model.config._attn_implementation == "eager"
    assert_bit_identical(model, before)


# ---- errors ------------------------------------------------------------------------------------------------


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50, n_positions=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"), apply(gpt2, dense_profile()):
        pass
    assert gpt2.config._attn_implementation != "tca"


def test_context_longer_than_the_model_supports():
    model = tiny_llama(1, max_position_embeddings=64)
    with torch.no_grad(), apply(model, dense_profile()):
        model(input_ids=torch.ones(1, 64, dtype=torch.int64), use_cache=False)  # exactly the limit is fine
        with pytest.raises(ContextTooLongError, match="65 tokens .* 64"):
            model(input_ids=torch.ones(1, 65, dtype=torch.int64), use_cache=False)


def test_right_padding_raises():
    model = tiny_llama(2)
    ids = torch.ones(2, 50, dtype=torch.int64)
    mask = torch.ones(2, 50, dtype=torch.int64)
    mask[1, 40:] = 0
    with pytest.raises(ValueError, match="left padding"), torch.no_grad(), apply(model, dense_profile()):
        model(input_ids=ids, attention_mask=mask, use_cache=False)


def test_profile_for_another_model_raises():
    from tca.core.profile import ProfileError

    model = tiny_llama(3, num_hidden_layers=3)
    with pytest.raises(ProfileError, match="n_layers: profile 2, model 3"), apply(model, dense_profile()):
        pass
    assert model.config._attn_implementation == "eager"


@pytest.mark.randomised
def test_a_padded_prefill_reads_its_padding_once(monkeypatch):
    """Every layer of a forward gets the same mask: the run reads each row's first valid key from it
    once per forward (each read waits for the device on a GPU), and every layer sees the same rows."""
    import tca.integrations.transformers.run as run_module

    seed = fresh_seed()
    model = tiny_llama(seed)  # 2 layers: read per layer, 4 reads in two forwards
    calls = []
    original = run_module.key_start_from_mask
    monkeypatch.setattr(run_module, "key_start_from_mask", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(1, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with apply(model, sparse_profile(seed)) as run, torch.no_grad():
        model(ids, attention_mask=mask, logits_to_keep=1)
        model(ids, attention_mask=mask, logits_to_keep=1)
    assert len(calls) == 2, f"seed {seed}: the mask was read {len(calls)} times in two forwards"
    assert run._padding is None  # dropped with the forward


@pytest.mark.randomised
def test_forward_with_autograd_on_gives_the_no_grad_logits_and_stats():
    """A plain ``model(ids)`` (autograd on, as in many evaluation loops) under TCA: the same logits
    and statistics as under ``torch.no_grad()``, not an error from the statistics' host copy."""
    seed = fresh_seed()
    model, ids, profile = tiny_llama(seed), random_ids(seed, 97), sparse_profile(seed)
    expected, quiet = tca_logits(model, profile, ids)
    with apply(model, profile) as run:
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(
        logits.detach(), expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"seed {seed}: {m}"
    )
    assert run.stats.kept_fraction == quiet.stats.kept_fraction, f"seed {seed}"
    np.testing.assert_array_equal(run.stats.kept_counts, quiet.stats.kept_counts)
