"""What the tensor-parallel tests run, alike in one process and on every rank under torchrun.

``tca_scenarios`` runs a model under ``tca.apply`` (a left-padded prefill, then two turns of greedy
generation on one compressed cache) and ``calibration`` calibrates it; both return plain tensors and
lists, with each kept-index list keyed by the global (layer, KV head), so the test can set a
single-process run beside each rank's run. ``tp_worker.py`` is the torchrun side.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from tiny_models import GEMMA3, build_profile, left_padded, sharpen_attention
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from tca.core.config import TCAConfig
from tca.core.profile import Profile, model_fingerprint
from tca.integrations.transformers import Calibration, apply, measure_retention, measure_retrieval
from tca.methods.selector import MethodSelector

CONFIG = TCAConfig(block_size=16, local_window=32, query_chunk=64, observation_queries=16)
# 8 query / 4 KV heads of 16 dimensions: 2 and 4 ranks each hold whole KV heads
SHAPE = dict(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
# every family TCA serves: (config class, fields beside SHAPE); Gemma 3 with 4 layers (sliding, full,
# sliding, full), its attention scale from query_pre_attn_scalar
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen3": (Qwen3Config, {"head_dim": 16}),
    "gemma3_text": (Gemma3TextConfig, GEMMA3),
}
NEW_TOKENS = 16
CACHE_KWARG = (  # newer transformers call generate's cache argument ``cache``
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


def tiny_lm(family: str, seed: int, sharpen: float = 12.0, **changes) -> torch.nn.Module:
    """A random model of ``family`` in float32 with peaked attention (``sharpen_attention``)."""
    torch.manual_seed(seed)
    config_class, extra = FAMILIES[family]
    model = AutoModelForCausalLM.from_config(config_class(**{**SHAPE, **extra, **changes})).eval()
    sharpen_attention(model, sharpen)
    return model


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (id 0 unknown): 96 ids, as SHAPE's vocab."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="~", pad_token="[UNK]"
    )


def sparse_profile(model: torch.nn.Module, seed: int) -> Profile:
    """Random sparse budgets per (full-attention layer, KV head); the last one's last KV head keeps
    everything. (Sliding-window layers, Gemma 3's, are not TCA's: the profile has no row for them.)"""
    rng = np.random.default_rng(seed)
    kinds = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    shape = (kinds.count("full_attention"), model.config.num_key_value_heads)
    mu = rng.uniform(0.05, 0.5, shape)
    mu[-1, -1] = math.inf
    return build_profile(model_fingerprint(model), mu, rng.choice([0.3, 1.0], shape), CONFIG)


def random_ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(1, SHAPE["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed))


def kept_positions(run) -> dict[tuple[int, int], list[list[int]]]:
    """Per (layer, global KV head): each row's cached positions (prefill kept + window + decode), for
    the layers TCA manages (a sliding-window layer keeps transformers' own cache)."""
    kept = {}
    for layer, cache_layer in enumerate(run.cache.layers):
        for local, head in enumerate(getattr(cache_layer, "heads", ())):
            rows = [head.positions[b, : int(n)].tolist() for b, n in enumerate(head.lengths)]
            kept[layer, run.layout.kv_heads[local]] = rows
    return kept


def stats_summary(stats) -> dict:
    """The whole-model figures of ``run.stats``."""
    arrays = ("kept_counts", "kept_entries", "context_tokens", "tca_pairs", "dense_pairs", "gamma")
    return {
        "kept_fraction": stats.kept_fraction,
        "pairs_fraction": stats.pairs_fraction,
        "prefills": stats.prefills,
        "kv_bytes": stats.kv_bytes,
        "dense_kv_bytes": stats.dense_kv_bytes,
        "host_kv_bytes": stats.host_kv_bytes,
        "managed_kv_bytes": stats.managed_kv_bytes,
        "managed_dense_kv_bytes": stats.managed_dense_kv_bytes,
        **{name: getattr(stats, name).copy() for name in arrays},
    }


def greedy(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Exactly NEW_TOKENS greedy tokens of one row on ``cache``; (1, len + NEW_TOKENS)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        **{CACHE_KWARG: cache},
    )


def tca_scenarios(model, profile: Profile, seed: int, cuda_graphs: bool | None = None) -> dict:
    """A left-padded batch's prefill logits, then two turns of greedy generation on one cache
    (``cuda_graphs=True``: generate's decode steps through the graph path, run uncaptured off CUDA)."""
    result = {}
    ids, mask, positions = left_padded([random_ids(seed, 150), random_ids(seed + 1, 131)])
    with torch.no_grad(), apply(model, profile, cuda_graphs=cuda_graphs) as run:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        result["prefill_logits"] = logits[:, -1]
        result["prefill_stats"] = stats_summary(run.stats)
        cache = run.new_cache()
        turn1 = greedy(model, random_ids(seed + 2, 140).view(1, -1), cache)
        result["turn1_tokens"] = turn1[0, -NEW_TOKENS:].tolist()
        result["turn1_kept"] = kept_positions(run)
        result["turn1_stats"] = stats_summary(run.stats)
        turn2 = greedy(model, torch.cat([turn1, random_ids(seed + 3, 24).view(1, -1)], 1), cache)
        result["turn2_tokens"] = turn2[0, -NEW_TOKENS:].tolist()
        result["turn2_kept"] = kept_positions(run)
        result["turn2_stats"] = stats_summary(run.stats)
        result["turn2_logits"] = model(input_ids=turn2[:, -1:], **{CACHE_KWARG: cache}).logits[:, -1]
    return result


def method_scenario(model, seed: int) -> dict:
    """A baseline (SnapKV at 30% kept) through the same run: one turn of greedy generation."""
    with torch.no_grad(), apply(model, MethodSelector(model, "snapkv", 0.3)) as run:
        tokens = greedy(model, random_ids(seed + 4, 140).view(1, -1), run.new_cache())
        kept = kept_positions(run)
        return {"tokens": tokens[0, -NEW_TOKENS:].tolist(), "kept": kept, **stats_summary(run.stats)}


def calibration(model, seed: int) -> dict:
    """Calibrate on 256 random tokens (both passes); the profile's per-head arrays."""
    ids = random_ids(seed, 256).view(1, -1)
    retention = measure_retention(model, ids, CONFIG, progress=False)
    retrieval = measure_retrieval(model, ids, CONFIG, progress=False)
    profile = Calibration(model, CONFIG, "random", ids.shape[-1], retention, retrieval).profile()
    names = ("mu", "sigma", "retained", "kept_tokens", "oracle_tokens", "retrieval")
    return {name: getattr(profile, name) for name in names}
