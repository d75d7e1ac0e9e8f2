"""Tiny random-weight transformers models and an attention hook, for tests (no ``tca`` import)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from transformers import (
    AttentionInterface,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


# Gemma 3 in small: sliding layers first and between (window 20), full-attention layers 1 and 3, the
# attention scale from query_pre_attn_scalar (20), not the head dim (16)
GEMMA3 = dict(
    head_dim=16,
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention"] * 2,
    sliding_window=20,
    query_pre_attn_scalar=20,
)


def tiny_gemma3(seed: int, sharpen: float = 12.0, **changes) -> Gemma3ForCausalLM:
    """A 4-layer (sliding, full, sliding, full), 4-head, 2-KV-head Gemma 3 in float32, eval mode, SDPA.

    Attention is made peaked by ``sharpen`` (``sharpen_attention``: Gemma's q and k norms).
    """
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**TINY, **GEMMA3, **changes})).eval()
    sharpen_attention(model, sharpen)
    return model


def sharpen_attention(model: torch.nn.Module, sharpen: float) -> None:
    """Make a random model's attention peaked (random init is near uniform), so selection decisions
    matter: q and k projections scaled by ``sharpen``; where q and k are RMS-normalised (Qwen3, Gemma
    3), which would undo a scaled projection, those norms' weights by ``sqrt(sharpen) / 2`` instead
    (less, or the softmax becomes one-hot and float32 importances tie at 0; Gemma's norm multiplies
    by ``1 + weight``)."""
    offset = 1.0 if model.config.model_type == "gemma3_text" else 0.0
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if hasattr(attention, "q_norm"):
                for norm in (attention.q_norm, attention.k_norm):
                    norm.weight.add_(offset).mul_(sharpen**0.5 / 2).sub_(offset)
            else:
                attention.q_proj.weight.mul_(sharpen)
                attention.k_proj.weight.mul_(sharpen)


def tiny_llama(seed: int, sharpen: float = 12.0, **changes) -> LlamaForCausalLM:
    """A 2-layer, 4-head, 2-KV-head Llama in float32, eval mode, eager attention.

    Attention is made peaked by ``sharpen`` (``sharpen_attention``: the q and k projections).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **changes}, attn_implementation="eager")).eval()
    sharpen_attention(model, sharpen)
    return model


@contextlib.contextmanager
def attention_override(model: torch.nn.Module, name: str, function: Callable) -> Iterator[None]:
    """Inside the block, ``model``'s attention runs ``function(module, query, key, value, mask, scaling)``.

    ``function`` returns the attention output (B, H, L, d); the mask is transformers' boolean SDPA mask.
    """

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = function(module, query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def left_padded(
    prompts: list[torch.Tensor], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids (B, L) for left-padded prompts."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), length, dtype=torch.int64)
    for b, prompt in enumerate(prompts):
        ids[b, length - len(prompt) :] = prompt
        mask[b, length - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def build_profile(fingerprint: dict, mu, sigma, config):
    """A Profile with the given head configurations (mu, sigma: (n_layers, n_kv_heads) arrays)."""
    from tca.core.profile import Profile

    zeros = np.zeros_like(mu)
    return Profile(
        config=config,
        fingerprint=dict(fingerprint),
        mu=mu,
        sigma=sigma,
        retained=zeros + 1,
        kept_tokens=zeros,
        oracle_tokens=zeros,
        calibration_tokens=0,
        text_sha256="",
        version="test",
    )


def capture_qk(model, ids) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Per layer: query (H, L, d), key (G, L, d) in float64 and the scaling, from a dense forward pass
    (a sliding-window layer attends with the window mask transformers gives it)."""
    captured = {}

    def record(module, query, key, value, mask, scaling):
        captured[module.layer_idx] = (query[0].double().numpy(), key[0].double().numpy(), scaling)
        group = query.shape[1] // key.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            query,
            key.repeat_interleave(group, 1),
            value.repeat_interleave(group, 1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
        )

    with torch.no_grad(), attention_override(model, "capture-qk-test", record):
        model(input_ids=ids, use_cache=False)
    return [captured[layer] for layer in range(len(captured))]
