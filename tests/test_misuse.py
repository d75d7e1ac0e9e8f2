"""Misuse of ``tca.apply`` / ``patch`` / ``generate``: each case is the right result (checked against
an independent computation: dense, an uncached forward loop, a run that was not misused) or a
clear error naming the value and the fix, and it never damages a run that is going on."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed
from test_generation import (
    CACHE_KWARG,
    assert_restored,
    greedy,
    make_profile,
    random_ids,
    snapshot,
    sparse_profile,
)
from tiny_models import left_padded, tiny_llama
from transformers import GenerationConfig

from tca.core.profile import ProfileError
from tca.integrations.transformers import ContextTooLongError, apply, patch, unpatch

NESTED = "already runs under tca.apply or tca.patch"
LIMIT_WARNING = r"stopped at the model's context limit \(max_position_embeddings = 64\)"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def tca_greedy(model, profile, ids, new_tokens: int, **kwargs):
    """Greedy generate of a run that nothing else touches: the reference for a misused run."""
    with apply(model, profile):
        return greedy(model, ids, new_tokens, **kwargs)


def assert_same_output(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


# ---- runs do not nest ------------------------------------------------------------------------------------


@pytest.mark.randomised
def test_nested_apply_or_patch_is_an_error_that_leaves_the_outer_run_intact():
    seed = fresh_seed()
    model = tiny_llama(seed)
    profile = sparse_profile(model, seed)
    ids = random_ids(seed, 120)
    dense, before, implementation = greedy(model, ids, 8), snapshot(model), model.config._attn_implementation
    reference = tca_greedy(model, profile, ids, 8)
    assert not torch.equal(reference.logits[0], dense.logits[0]), "the profile must change the output"

    with apply(model, profile) as outer:
        with pytest.raises(RuntimeError, match=NESTED), apply(model, profile):
            pass
        with pytest.raises(RuntimeError, match=NESTED):
            patch(model, profile)
        with pytest.raises(RuntimeError, match="not patched"):
            unpatch(model)
        assert_same_output(greedy(model, ids, 8), reference)  # still TCA, with its own cache
        assert outer.stats.prefills > 0 and outer.cache.layers[0].seen == 127
    assert_restored(model, before, implementation)

    run = patch(model, profile)
    with pytest.raises(RuntimeError, match=NESTED), apply(model, profile):
        pass
    assert_same_output(greedy(model, ids, 8), reference)
    assert run.stats.prefills > 0
    unpatch(model)
    assert_restored(model, before, implementation)
    assert_same_output(greedy(model, ids, 8), dense)


def test_calibrating_a_model_under_a_run_is_an_error_that_leaves_the_run_intact():
    from tca.core.config import TCAConfig
    from tca.integrations.transformers import measure_retention

    model = tiny_llama(8)
    profile = sparse_profile(model, 8)
    ids = random_ids(8, 120)
    reference = tca_greedy(model, profile, ids, 4)
    run = patch(model, profile)
    with pytest.raises(RuntimeError, match=NESTED):
        measure_retention(model, ids, TCAConfig(block_size=16, local_window=32), progress=False)
    assert_same_output(greedy(model, ids, 4), reference)
    assert run.stats.prefills > 0
    unpatch(model)


# ---- generate without a cache ----------------------------------------------------------------------------


@pytest.mark.randomised
def test_generate_without_cache_equals_a_loop_of_uncached_forwards():
    """``use_cache=False``: every step is an independent TCA prefill of the whole sequence; no
    compressed cache, no host history, and the run's current cache is left alone."""
    seed = fresh_seed()
    model = tiny_llama(seed)
    profile = sparse_profile(model, seed)
    ids = random_ids(seed, 100)
    with apply(model, profile) as run:
        greedy(model, ids, 3)  # a cached generate first: its cache must stay as it is
        cache = run.cache
        out = greedy(model, ids, 12, use_cache=False)
        assert run.cache is cache and cache.layers[0].seen == 102
        sequence, logits = ids, []
        with torch.no_grad():
            for _ in range(12):
                last = model(input_ids=sequence, use_cache=False).logits[:, -1]
                logits.append(last)
                allowed = last.clone()
                allowed[:, model.generation_config.eos_token_id] = -math.inf  # greedy() sets min_new_tokens
                token = allowed.argmax(-1, keepdim=True)
                best, second = allowed[0].topk(2).values.tolist()
                if best - second < 1e-5:  # a near tie that rounding decides: follow generate's choice
                    token = out.sequences[:, sequence.shape[1], None]
                sequence = torch.cat([sequence, token], dim=1)
    assert torch.equal(out.sequences, sequence)
    for step, (got, want) in enumerate(zip(out.logits, logits, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


def test_generate_without_cache_runs_to_the_context_limit():
    model = tiny_llama(4, max_position_embeddings=64)
    profile = sparse_profile(model, 4)
    ids = random_ids(4, 50)
    with apply(model, profile) as run:
        within = greedy(model, ids, 15, use_cache=False)  # the model reads 64 tokens and predicts a 65th
        with pytest.warns(UserWarning, match=LIMIT_WARNING):
            out = greedy(model, ids, 30, use_cache=False)
    assert run.cache is None
    assert out.sequences.shape[1] == 65 and torch.equal(out.sequences, within.sequences)


# ---- generation modes the compressed cache cannot serve ---------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_beams": 2}, "num_beams=2"),
        ({"num_beams": 3, "do_sample": True}, "num_beams=3"),
        ({"generation_config": GenerationConfig(num_beams=2)}, "num_beams=2"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha=0.6"),
        ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens=3"),
        ({"assistant_model": "tiny"}, "assistant_model=LlamaForCausalLM"),
    ],
    ids=["beam", "beam-sample", "config", "contrastive", "prompt-lookup", "assistant"],
)
def test_generation_modes_the_cache_cannot_serve_name_the_option_and_the_fix(options, named):
    model = tiny_llama(5)
    if options.get("assistant_model") == "tiny":
        options = {"assistant_model": tiny_llama(6)}
    ids = random_ids(5, 40)
    with apply(model, sparse_profile(model, 5)) as run, pytest.raises(ValueError) as error:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0, **options)
    message = str(error.value)
    assert named in message and "TCA cache cannot serve" in message and "use_cache=False" in message
    assert "\n" not in message and run.cache is None


def test_beam_search_without_cache_equals_dense_beam_search_under_a_dense_profile():
    """The fix the error names works: with every head dense (TCA equals dense attention), beam
    search with ``use_cache=False`` under apply gives dense beam search's beams."""
    model = tiny_llama(7)
    profile = make_profile(model, np.full((2, 2), math.inf), np.ones((2, 2)))
    ids = random_ids(7, 60)

    def beams(**kwargs):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                num_beams=3,
                num_return_sequences=3,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

    dense = beams()
    with apply(model, profile):
        got = beams(use_cache=False)
    assert torch.equal(got, dense)


# ---- a cache outside its run -------------------------------------------------------------------------------


@pytest.mark.randomised
def test_a_cache_after_its_block_is_an_error_and_can_join_a_new_block():
    seed = fresh_seed()
    model = tiny_llama(seed)
    profile = sparse_profile(model, seed)
    ids1 = random_ids(seed, 90)
    with apply(model, profile) as run:  # the reference: two turns in one block
        cache = run.new_cache()
        turn1 = greedy(model, ids1, 5, **{CACHE_KWARG: cache}).sequences
        ids2 = torch.cat([turn1, random_ids(seed + 1, 20)], dim=1)
        turn2 = greedy(model, ids2, 5, **{CACHE_KWARG: cache})
    with apply(model, profile) as run:
        cache = run.new_cache()
        greedy(model, ids1, 5, **{CACHE_KWARG: cache})
        other = run.new_cache()  # another conversation becomes current: the first is not
        with pytest.raises(RuntimeError, match="not in use by a tca.apply block"), torch.no_grad():
            model(input_ids=ids2[:, -20:], **{CACHE_KWARG: cache})
        assert run.cache is other
    seen = cache.layers[0].seen
    with pytest.raises(RuntimeError, match="not in use by a tca.apply block"):
        greedy(model, ids2, 5, **{CACHE_KWARG: cache})  # dense attention would read 20 tokens of 114
    assert cache.layers[0].seen == seen
    with apply(model, profile) as run:  # a new block may carry the conversation on
        again = greedy(model, ids2, 5, **{CACHE_KWARG: cache})
        assert run.cache is cache
    assert_same_output(again, turn2)


# ---- the context limit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_stops_at_the_context_limit_keeping_what_it_generated(batch):
    """A decode that reaches max_position_embeddings stops there with a warning and returns the
    tokens generated so far (the same as a generate asked for exactly that many): the model reads
    64 tokens and the 65th is predicted from them."""
    model = tiny_llama(1, max_position_embeddings=64)
    profile = sparse_profile(model, 1)
    prompts = [random_ids(1, 60)[0], random_ids(2, 45)[0]][:batch]
    ids, mask, _ = left_padded(prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for exactly what fits is no reason to warn
        exact = tca_greedy(model, profile, ids, 5, attention_mask=mask)
    with apply(model, profile) as run, pytest.warns(UserWarning, match=LIMIT_WARNING):
        out = greedy(model, ids, 30, attention_mask=mask)
    assert out.sequences.shape == (batch, 65) and run.cache.layers[0].seen == 64
    assert_same_output(out, exact)
    with pytest.raises(ContextTooLongError, match="65 tokens .* 64"), apply(model, profile):
        greedy(model, random_ids(1, 65), 3)  # a prompt beyond the limit is an error


# ---- bad values ---------------------------------------------------------------------------------------


@pytest.mark.randomised
def test_apply_takes_a_profile_path(tmp_path):
    seed = fresh_seed()
    model = tiny_llama(seed)
    profile = sparse_profile(model, seed)
    profile.calibration_tokens = 300  # a saved profile records a real calibration length
    path = tmp_path / "profile.json"
    profile.save(path)
    ids = random_ids(seed, 80)
    want = tca_greedy(model, profile, ids, 4)
    for given in (path, str(path)):
        with apply(model, given) as run:
            assert_same_output(greedy(model, ids, 4), want)
        assert run.profile.config == profile.config


@pytest.mark.parametrize(
    ("profile", "error", "named"),
    [
        (None, TypeError, "got None"),
        (3, TypeError, "got int 3"),
        ({"mu": 1}, TypeError, "got dict"),
        ("missing.json", ProfileError, "'missing.json', which is no profile file"),
        ("smollm2", ProfileError, "tca.profile_for(NAME) (bundled: "),
    ],
)
def test_apply_names_a_bad_profile_and_the_fix(profile, error, named):
    model = tiny_llama(0)
    before, implementation = snapshot(model), model.config._attn_implementation
    with pytest.raises(error) as raised, apply(model, profile):
        pass
    assert named in str(raised.value) and "tca.Profile.load(PATH)" in str(raised.value)
    assert_restored(model, before, implementation)


def test_apply_names_a_model_that_is_not_one():
    with pytest.raises(TypeError, match="needs a transformers model .*got str 'smollm2'"):
        with apply("smollm2", None):
            pass


@pytest.mark.parametrize("generate", [False, True], ids=["forward", "generate"])
def test_a_row_without_tokens_is_named(generate):
    model = tiny_llama(3)
    ids, mask, _ = left_padded([random_ids(3, 40)[0], random_ids(4, 25)[0], random_ids(5, 30)[0]])
    mask[1] = 0
    for attention_mask, rows in ((mask, r"\[1\]"), (torch.zeros_like(mask), r"\[0, 1, 2\]")):
        with (
            pytest.raises(ValueError, match=f"row\\(s\\) {rows} of the batch have no token"),
            apply(model, sparse_profile(model, 3)),
            torch.no_grad(),
        ):
            if generate:
                greedy(model, ids, 3, attention_mask=attention_mask)
            else:
                model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
