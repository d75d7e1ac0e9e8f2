"""``tca.apply(model, profile, cuda_graphs=True)``: decode steps split into a device side (what a CUDA
graph captures) and a host side run after it (``integrations/transformers/graphs.py``).

The reference is the eager ``generate`` under ``tca.apply`` on the same model and prompts, itself
checked against brute force in ``test_generation.py``: the split step must give the same logits bit
for bit, the same compressed cache (entries, positions, lengths), the same host history and the
same statistics, through block compressions, store growth, a left-padded batch and a second turn.
On the CPU the step runs uncaptured; on a CUDA device (``TCA_TEST_FULL=1`` runs) it is captured and
replayed, and must still give the same tokens.
"""

from __future__ import annotations

import gc
import inspect
import math
import weakref

import numpy as np
import pytest
import torch
from bruteforce import fresh_seed
from tiny_models import TINY, build_profile, left_padded, sharpen_attention, tiny_gemma3
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from tca.core.config import TCAConfig
from tca.core.profile import model_fingerprint
from tca.integrations.transformers import apply

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64)
FAMILIES = {"llama": (LlamaConfig, {}), "qwen2": (Qwen2Config, {}), "qwen3": (Qwen3Config, {"head_dim": 16})}
CACHE_KWARG = "cache" if "cache" in inspect.signature(AutoModelForCausalLM.from_config(
    LlamaConfig(**TINY)).forward).parameters else "past_key_values"  # fmt: skip


def tiny(family: str, seed: int, device: str = "cpu"):
    """A 2-layer, 4-head, 2-KV-head model with peaked attention (scaled q/k projections or norms)."""
    torch.manual_seed(seed)
    config_class, extra = FAMILIES[family]
    model = AutoModelForCausalLM.from_config(config_class(**{**TINY, **extra})).eval()
    sharpen_attention(model, 12.0)
    return model.to(device)


def sparse_profile(model, seed: int):
    """Random sparse budgets; the last layer's last KV head keeps everything (its store must grow)."""
    rng = np.random.default_rng(seed)
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    mu = rng.uniform(0.05, 0.5, shape)
    mu[-1, -1] = math.inf
    return build_profile(model_fingerprint(model), mu, rng.choice([0.3, 1.0], shape), CONFIG)


def prompts(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=gen) for n in lengths]


def generate(model, ids, mask, new_tokens: int, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs,
        )  # fmt: skip


def cache_state(run) -> list:
    """Every managed layer's stored entries per (row, head), its seen count and its host history."""
    state = []
    for layer in run.cache.layers:
        heads = []
        for head in layer.heads:
            for b in range(head.keys.shape[0]):
                n = int(head.lengths[b])
                heads.append((head.keys[b, :n], head.values[b, :n], head.positions[b, :n]))
        state.append((layer.seen, heads, layer.history))
    return state


def assert_same_state(got: list, want: list, where: str) -> None:
    for l, (layer, layer_want) in enumerate(zip(got, want, strict=True)):
        (seen, heads, history), (seen_want, heads_want, history_want) = layer, layer_want
        assert seen == seen_want, f"{where}, layer {l}: seen {seen} != {seen_want}"
        assert len(heads) == len(heads_want)
        for h, (entries, entries_want) in enumerate(zip(heads, heads_want, strict=True)):
            for got_t, want_t in zip(entries, entries_want, strict=True):
                assert torch.equal(got_t, want_t), f"{where}, layer {l}, (row, head) {h}"
        for got_t, want_t in zip(history, history_want, strict=True):
            assert torch.equal(got_t, want_t), f"{where}, layer {l}: host history"


def two_turns(model, profile, turns, cuda_graphs: bool, new_tokens: int):
    """Two generates on one cache (a batch, then a follow-up): outputs and the cache after each."""
    outputs, states = [], []
    with apply(model, profile, cuda_graphs=cuda_graphs) as run:
        cache = run.new_cache()
        ids, mask, _ = turns[0]
        first = generate(model, ids, mask, new_tokens, **{CACHE_KWARG: cache})
        outputs.append(first)
        states.append(cache_state(run))
        follow_up, follow_mask = turns[1]
        ids = torch.cat([first.sequences, follow_up], 1)
        mask = torch.cat([mask, torch.ones_like(first.sequences[:, mask.shape[1] :]), follow_mask], 1)
        outputs.append(generate(model, ids, mask, new_tokens, **{CACHE_KWARG: cache}))
        states.append(cache_state(run))
    return outputs, states, run


@pytest.mark.randomised
@pytest.mark.parametrize("family", FAMILIES)
def test_split_decode_step_equals_eager_generate(family):
    """A left-padded batch of 3 (one prompt inside the window), 70 tokens (several compressed blocks
    and store growth), then a second turn that re-selects from the host history."""
    seed = fresh_seed()
    model = tiny(family, seed)
    profile = sparse_profile(model, seed)
    batch = left_padded(prompts(seed, [150, 97, 20]))
    follow_up = torch.randint(1, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(seed))
    turns = [batch, (follow_up, torch.ones_like(follow_up))]
    new_tokens = 70
    eager, eager_states, eager_run = two_turns(model, profile, turns, False, new_tokens)
    graphed, graphed_states, run = two_turns(model, profile, turns, True, new_tokens)
    for turn in range(2):
        where = f"seed {seed}, turn {turn}"
        assert torch.equal(graphed[turn].sequences, eager[turn].sequences), where
        for step, (got, want) in enumerate(zip(graphed[turn].logits, eager[turn].logits, strict=True)):
            assert torch.equal(got, want), f"{where}, step {step}: logits differ"
        assert_same_state(graphed_states[turn], eager_states[turn], where)
    assert run.decode_graph.steps == 2 * (new_tokens - 1), "every decode step should take the split path"
    # the last layer's dense head (row 0) holds more than the room its store had after prefill: it grew
    dense_head_row0 = graphed_states[0][-1][1][model.config.num_key_value_heads * 3 - 3][0]
    assert dense_head_row0.shape[0] > 150 + CONFIG.block_size + 16, f"seed {seed}: no store growth"
    for name in ("kv_bytes", "dense_kv_bytes", "host_kv_bytes", "managed_kv_bytes", "kept_fraction"):
        assert getattr(run.stats, name) == getattr(eager_run.stats, name), f"seed {seed}: stats.{name}"


def test_models_with_sliding_layers_are_refused_with_the_layers_named():
    model = tiny_gemma3(0)
    fingerprint = model_fingerprint(model)
    profile = build_profile(fingerprint, np.full((2, 2), 0.2), np.full((2, 2), 0.3), CONFIG)
    refused = r"layers \[0, 2\] attend within a sliding window.*cuda_graphs=False"
    with pytest.raises(ValueError, match=refused):
        with apply(model, profile, cuda_graphs=True):
            pass


def test_graphs_are_on_by_default_only_where_they_serve():
    """The default (``cuda_graphs=None``) captures on one CUDA device with the Triton kernels only:
    never on the CPU, and never on a model with sliding layers (no error there: it decodes eagerly)."""
    model = tiny("llama", 0)
    with apply(model, sparse_profile(model, 0)) as run:
        assert not run.cuda_graphs and run.decode_graph is None
    with apply(model, sparse_profile(model, 0), cuda_graphs=True) as run:  # asked for: served eagerly here
        assert run.cuda_graphs and run.decode_graph is not None
    gemma = tiny_gemma3(0)
    profile = build_profile(model_fingerprint(gemma), np.full((2, 2), 0.2), np.full((2, 2), 0.3), CONFIG)
    with apply(gemma, profile) as run:
        assert not run.cuda_graphs


def test_a_finished_run_is_freed_without_the_garbage_collector():
    """A run with a decode graph holds no reference cycle: its cache (device store, pinned host
    history) goes when the ``with`` block's last reference does, not at some later collection."""
    model = tiny("llama", 0)
    ids = prompts(0, [40])[0].unsqueeze(0)
    gc.disable()
    try:
        with apply(model, sparse_profile(model, 0), cuda_graphs=True) as run:
            generate(model, ids, torch.ones_like(ids), 3)
        freed = weakref.ref(run.cache)
        del run
        assert freed() is None
    finally:
        gc.enable()


def test_generate_restores_the_models_own_forward():
    """The split step serves generate's decode forwards only: the model's forward is its own after."""
    model = tiny("llama", 0)
    profile = sparse_profile(model, 0)
    ids = prompts(0, [40])[0].unsqueeze(0)
    own = model.forward
    with apply(model, profile, cuda_graphs=True) as run:
        generate(model, ids, torch.ones_like(ids), 3)
        assert "forward" not in model.__dict__ and model.forward == own
        assert run.decode_graph.steps == 2


@pytest.mark.randomised
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_decode_gives_the_eager_tokens_on_cuda():
    """On the GPU the step is captured once and replayed (re-captured after the store grows)."""
    seed = fresh_seed()
    model = tiny("llama", seed, "cuda")
    profile = sparse_profile(model, seed)
    ids, mask, _ = left_padded(prompts(seed, [300, 211]))
    ids, mask = ids.cuda(), mask.cuda()
    with apply(model, profile, cuda_graphs=False) as run:
        eager = generate(model, ids, mask, 200)
    with apply(model, profile) as graphed_run:  # the default on a CUDA device with the Triton kernels
        graphed = generate(model, ids, mask, 200)
    assert graphed_run.cuda_graphs and not run.cuda_graphs
    assert graphed_run.decode_graph.replays > 150 and graphed_run.decode_graph.captures >= 1
    assert torch.equal(graphed.sequences, eager.sequences), f"seed {seed}"
    for step, (got, want) in enumerate(zip(graphed.logits, eager.logits, strict=True)):
        where = f"seed {seed}, step {step}"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
    assert_same_state(cache_state(graphed_run), cache_state(run), f"seed {seed}")
