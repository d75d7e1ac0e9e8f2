"""Models that mix sliding-window and full-attention layers (Gemma 3): TCA manages the full layers only.

Tiny random Gemma 3 models (``tiny_models.tiny_gemma3``: sliding, full, sliding, full). The sliding
layers must be exactly transformers' own: bit-identical to a dense run where their inputs are the
same, and equal to float64 sliding-window attention written from the definition elsewhere. The
managed layers are checked against brute force in ``test_generation.py`` (Gemma 3 is one of its
families); here: the run's statistics, calibration and the errors for models TCA cannot serve.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch
from bruteforce import brute_retention, fresh_seed, softmax64
from tiny_models import TINY, build_profile, capture_qk, left_padded, tiny_gemma3
from transformers import DynamicCache, Gemma3ForCausalLM, MistralConfig, MistralForCausalLM

from tca.cli import main
from tca.core.config import TCAConfig
from tca.core.profile import Profile, model_fingerprint
from tca.integrations.transformers import UnsupportedModelError, apply, measure_retention, sliding
from tca.integrations.transformers import registration as hf
from tca.integrations.transformers.cache import dense_cache_bytes

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64)
MANAGED = [1, 3]
CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(Gemma3ForCausalLM.forward).parameters else "past_key_values"
)

pytestmark = [
    pytest.mark.randomised,  # the tests here draw random inputs (seed printed, replayable)
    pytest.mark.usefixtures("one_thread"),  # tiny models: one thread (conftest)
]


def sparse_profile(model, seed: int, config: TCAConfig = CONFIG) -> Profile:
    """Random sparse budgets for the managed layers (rows) and KV heads."""
    rng = np.random.default_rng(seed)
    shape = (len(model_fingerprint(model)["managed_layers"]), model.config.num_key_value_heads)
    return build_profile(model_fingerprint(model), rng.uniform(0.05, 0.3, shape), np.ones(shape), config)


def random_ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(1, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


def teacher_forced(model, ids: torch.Tensor, prompt_len: int, cache) -> tuple[list[dict], torch.Tensor]:
    """Prefill ``ids[:, :prompt_len]`` then feed the rest one token at a time on ``cache``.

    Returns every forward's attention outputs per layer (``{layer: (B, n, hidden)}`` from the
    attention modules' forward hooks) and the logits of every position (1, L, vocab).
    """
    outputs: list[dict] = []

    def hook(module, args, output):
        outputs[-1][module.layer_idx] = output[0].detach().clone()

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    logits = []
    try:
        with torch.no_grad():
            for lo, hi in [(0, prompt_len)] + [(i, i + 1) for i in range(prompt_len, ids.shape[1])]:
                outputs.append({})
                out = model(input_ids=ids[:, lo:hi], use_cache=True, **{CACHE_KWARG: cache})
                logits.append(out.logits)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, torch.cat(logits, 1)


# ---- the sliding layers are transformers' own ------------------------------------------------------------


def test_sliding_layers_before_the_first_managed_one_are_bit_identical_to_dense():
    """Sliding layers 0 and 1 run before the only managed layer (2): their inputs are the same as in
    a dense run, so their outputs and window caches must be bit-identical, at prefill and at every
    decode step (fed the same tokens), while the managed layer changes the logits."""
    seed = fresh_seed()
    kinds = ["sliding_attention", "sliding_attention", "full_attention"]
    model = tiny_gemma3(seed, num_hidden_layers=3, layer_types=kinds)
    ids, prompt_len = random_ids(seed, 190), 150  # prompt beyond both windows; 40 decode steps
    dense_cache = DynamicCache(config=model.config)
    dense, dense_logits = teacher_forced(model, ids, prompt_len, dense_cache)
    with apply(model, sparse_profile(model, seed)) as run:
        cache = run.new_cache()
        tca, tca_logits = teacher_forced(model, ids, prompt_len, cache)
    assert run.stats.layers == (2,) and run.stats.kept_fraction < 0.9
    for step, (want, got) in enumerate(zip(dense, tca, strict=True)):
        for layer in (0, 1):
            assert torch.equal(got[layer], want[layer]), f"seed {seed}, step {step}, sliding layer {layer}"
    for layer in (0, 1):
        assert type(cache.layers[layer]) is type(dense_cache.layers[layer])
        assert torch.equal(cache.layers[layer].keys, dense_cache.layers[layer].keys)
        assert torch.equal(cache.layers[layer].values, dense_cache.layers[layer].values)
        assert (
            cache.layers[layer].keys.shape[2] == model.config.sliding_window - 1
        )  # transformers' own window
    assert not torch.allclose(tca_logits, dense_logits, atol=1e-3), (
        "the managed layer should change something"
    )


def test_sliding_layers_after_a_managed_one_are_window_attention(monkeypatch):
    """Every sliding-layer call under TCA (prefill, decode, a new turn) goes to transformers' SDPA with
    the module's own window and scale, and equals float64 attention over the keys within the window:
    a query at position p sees keys at p - W + 1 .. p."""
    seed = fresh_seed()
    model = tiny_gemma3(seed)
    window, scale = model.config.sliding_window, model.config.query_pre_attn_scalar**-0.5
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out = sdpa(module, query, key, value, attention_mask, **kwargs)
        calls.append((module.layer_idx, query, key, value, kwargs, out[0]))
        return out

    sdpa = hf.sdpa_attention_forward
    monkeypatch.setattr(hf, "sdpa_attention_forward", recording)
    with torch.no_grad(), apply(model, sparse_profile(model, seed)) as run:
        cache = run.new_cache()
        turn = {"do_sample": False, "pad_token_id": 0, CACHE_KWARG: cache}
        first = model.generate(random_ids(seed, 90), max_new_tokens=12, min_new_tokens=12, **turn)
        ids = torch.cat([first, random_ids(seed + 1, 25)], 1)
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, **turn)
    assert {layer for layer, *_ in calls} == {0, 2}, "only the sliding layers go to transformers' SDPA"
    assert len(calls) == 2 * (1 + 11 + 1 + 4)  # per sliding layer: prefill, decode steps, new turn, steps
    seen = {0: 0, 2: 0}
    for layer, query, key, value, kwargs, out in calls:
        assert kwargs["sliding_window"] == window and kwargs["scaling"] == pytest.approx(scale)
        n, n_keys = query.shape[2], key.shape[2]
        positions = np.arange(seen[layer], seen[layer] + n)
        key_positions = np.arange(seen[layer] + n - n_keys, seen[layer] + n)  # the last n_keys tokens
        q, k, v = (t[0].double().numpy() for t in (query, key, value))
        group = q.shape[0] // k.shape[0]
        for h in range(q.shape[0]):
            for i, p in enumerate(positions):
                visible = (key_positions <= p) & (key_positions > p - window)
                probs = softmax64(k[h // group][visible] @ q[h, i] * scale)
                expected = probs @ v[h // group][visible]
                np.testing.assert_allclose(
                    out[0, i, h].double().numpy(), expected, atol=2e-5, err_msg=f"seed {seed}, layer {layer}"
                )
        seen[layer] += n


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_sliding_layers_prefill_through_the_window_path_equals_transformers_sdpa(monkeypatch, device):
    """Where ``sliding.window_prefill`` takes a sliding layer's prefill (on a GPU the Triton kernel;
    on the CPU, added here, the reference): a left-padded batch's logits at prefill and over 8
    greedy steps equal those of the same TCA run with the sliding layers on transformers' masked
    SDPA, and the window path answered each sliding layer's prefill, once."""
    seed = fresh_seed()
    model = tiny_gemma3(seed).to(device)
    window = model.config.sliding_window
    prompts = [random_ids(seed, 90)[0], random_ids(seed + 1, 61)[0]]  # both beyond two windows
    ids, mask, _ = (x.to(device) for x in left_padded(prompts))
    profile = sparse_profile(model, seed)

    def run(devices: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(sliding, "DEVICES", devices)
        with torch.no_grad(), apply(model, profile):
            logits = model(input_ids=ids, attention_mask=mask).logits
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        return logits, out

    want_logits, want_tokens = run(())
    calls = []
    original = sliding.ops.window_prefill

    def counted(query, key, value, size, scale, key_start):
        calls.append((query.shape[2], size, key_start.tolist()))
        return original(query, key, value, size, scale, key_start)

    monkeypatch.setattr(sliding.ops, "window_prefill", counted)
    got_logits, got_tokens = run((device,))
    real = mask.bool()  # padding positions' logits are nobody's
    torch.testing.assert_close(
        got_logits[real], want_logits[real], atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}"
    )
    assert torch.equal(got_tokens, want_tokens), f"seed {seed}"
    starts = [ids.shape[1] - len(p) for p in prompts]
    assert calls == [(ids.shape[1], window, starts)] * 4, f"seed {seed}: {calls}"  # 2 layers x 2 prefills


# ---- statistics, calibration -----------------------------------------------------------------------------


def test_stats_cover_the_managed_layers():
    seed = fresh_seed()
    model = tiny_gemma3(seed)
    profile = sparse_profile(model, seed)
    length = 150
    with torch.no_grad(), apply(model, profile) as run:
        model.generate(random_ids(seed, length), max_new_tokens=1, do_sample=False)
    stats = run.stats
    assert stats.layers == tuple(MANAGED) == run.layout.layers and stats.prefills == 1
    assert stats.kept_entries.shape == (2, 2) and stats.gamma.shape == (2, 4)
    entries = [[int(h.lengths[0]) for h in run.cache.layers[layer].heads] for layer in MANAGED]
    assert stats.kept_fraction == pytest.approx(np.mean(entries) / length, rel=1e-12)
    window = CONFIG.effective_window
    for row in range(len(MANAGED)):
        assert stats.kept_counts[row].tolist() == [n - window for n in entries[row]]
        assert stats.context_tokens[row] == length
    # bytes: the TCA stores plus the sliding layers' windows (transformers' own layers)
    own = sum(run.cache.layers[l].keys.nbytes + run.cache.layers[l].values.nbytes for l in (0, 2))
    stored = sum(run.cache.layers[l].nbytes for l in MANAGED)
    assert stats.kv_bytes == stored + own and own > 0


def test_calibration_measures_the_managed_layers_only():
    seed = fresh_seed()
    model = tiny_gemma3(seed)
    config = CONFIG.replace(tau=0.8)
    ids = random_ids(seed, 171)
    retention = measure_retention(model, ids, config, progress=False)
    assert len(retention) == len(MANAGED)
    captured = capture_qk(model, ids)  # every layer, the sliding ones with their window mask
    for stats, layer in zip(retention, MANAGED, strict=True):
        query, key, scale = captured[layer]
        assert scale == pytest.approx(model.config.query_pre_attn_scalar**-0.5)
        base, values = brute_retention(query, key, scale, config.effective_window)
        np.testing.assert_allclose(stats.base.numpy(), base, atol=1e-6, err_msg=f"seed {seed}, layer {layer}")
        np.testing.assert_allclose(stats.values.numpy(), values, atol=1e-7, err_msg=f"seed {seed}")
    from tca.core.calibration import profile_from_retention

    profile = profile_from_retention(retention, model, config, ids.shape[1], "text")
    assert profile.managed_layers == tuple(MANAGED) and profile.mu.shape == (2, 2)
    with pytest.raises(ValueError, match=r"retention measured for 1 layers"):
        profile_from_retention(retention[:1], model, config, ids.shape[1], "text")


# ---- what TCA cannot serve -------------------------------------------------------------------------------


def test_a_model_with_only_sliding_layers_is_refused():
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=64)).eval()
    profile = build_profile(model_fingerprint(model), np.zeros((0, 2)), np.zeros((0, 2)), CONFIG)
    with pytest.raises(UnsupportedModelError, match="sliding window of 64 tokens.*no full-attention layer"):
        apply(model, profile).__enter__()
    assert model.config._attn_implementation != "tca"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attn_logit_softcapping": 50.0}, "soft-caps its attention logits"),
        ({"use_bidirectional_attention": True}, "bidirectional attention"),
    ],
)
def test_gemma_variants_tca_cannot_serve_are_refused(changes, message):
    model = tiny_gemma3(0, **changes)
    profile = sparse_profile(tiny_gemma3(0), 0)
    with pytest.raises(UnsupportedModelError, match=message):
        apply(model, profile).__enter__()


def test_unknown_layer_kinds_are_refused():
    model = tiny_gemma3(0)
    model.config.layer_types = ["sliding_attention", "full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="'chunked_attention' layers"):
        apply(model, sparse_profile(tiny_gemma3(0), 0)).__enter__()


def test_a_profile_row_per_managed_layer_and_dense_heads_keep_everything():
    """A dense profile (mu = inf) on the managed layers: TCA equals the dense model (the sliding
    layers exactly, the managed ones up to rounding), and the run keeps every entry."""
    seed = fresh_seed()
    model = tiny_gemma3(seed)
    shape = (2, 2)
    profile = build_profile(model_fingerprint(model), np.full(shape, math.inf), np.ones(shape), CONFIG)
    ids = random_ids(seed, 120)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
        with apply(model, profile) as run:
            logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, dense, atol=2e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert run.stats.kept_fraction == pytest.approx(1.0) and run.stats.pairs_fraction == pytest.approx(1.0)


def test_dense_cache_bytes_are_what_transformers_holds():
    seed = fresh_seed()
    model = tiny_gemma3(seed)
    ids = random_ids(seed, 40)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)  # fmt: skip
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert dense_cache_bytes(model, 40 + 7 - 1) == held
    assert (
        dense_cache_bytes(model, 10) == 2 * 2 * 16 * 4 * 4 * 10
    )  # within the window: every layer, every token


def test_profile_show_names_the_managed_layers(tmp_path, capsys):
    model = tiny_gemma3(0)
    profile = sparse_profile(model, 0)
    path = tmp_path / "gemma.json"
    profile.save(path)
    assert main(["profile", "show", str(path), "--length", "400"]) == 0
    printed = capsys.readouterr().out
    assert (
        "TCA manages the 2 full-attention layers 1, 3; the other 2 keep their own sliding-window" in printed
    )
    rows = [line.split() for line in printed.splitlines() if re.match(r"\s*\d+\s", line)]
    assert [int(row[0]) for row in rows] == MANAGED
    np.testing.assert_allclose(
        [[float(x) for x in row[1:3]] for row in rows], profile.keep_ratios(400), atol=5e-4
    )
