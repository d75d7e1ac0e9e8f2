"""transformers integration: TCA attention through the AttentionInterface registry.

``with tca.apply(model, profile) as run:`` switches the model's attention implementation to
``"tca"`` for the block and restores it on exit (also after an exception). Nothing is patched
at import and no model file is edited: the registry maps the name to ``_tca_attention``, which
finds the run that owns the calling attention module.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops
from .cache import HeadStore, TCACache, TCACacheLayer, mean_keep_fraction, valid_first
from .error_bound import last_query_dropped_mass, theorem1_bound
from .ops import reference
from .profile import Profile, model_fingerprint
from .stats import RunStats

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_NAME = "tca"
CALIBRATION_NAME = "tca-calibrate"

# attention module -> the object that handles its calls (a TCARun or a calibration recorder)
_HANDLERS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


class UnsupportedModelError(ValueError):
    """The model's architecture is not one TCA serves."""


class ContextTooLongError(ValueError):
    """The input is longer than the model's context limit."""


def check_supported(model: Any) -> None:
    """Raise UnsupportedModelError unless ``model`` is a causal LM of a supported family."""
    architecture = model_fingerprint(model)["architecture"]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; "
            f"TCA serves {', '.join(SUPPORTED_ARCHITECTURES)}."
        )


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention modules, by layer index."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def key_start_from_mask(attention_mask: torch.Tensor | None, key_len: int) -> torch.Tensor | None:
    """First valid key per row from transformers' 4D mask (None: no padding).

    Raises ValueError for padding that is not on the left.
    """
    if attention_mask is None:
        return None
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    valid = mask[:, 0, -1, :key_len]  # the last query sees every valid key
    start = valid.int().argmax(-1)
    positions = torch.arange(key_len, device=valid.device).view(1, -1)
    if not torch.equal(valid, positions >= start.view(-1, 1)):
        raise ValueError("TCA needs left padding: set tokenizer.padding_side = 'left'.")
    return start


def row_starts(key_start: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 first valid key per row on ``device`` (0 without padding)."""
    if key_start is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    return key_start.to(device, torch.int64)


def _tca_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handler = _HANDLERS.get(module)
    if handler is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return handler(module, query, key, value, attention_mask, scaling, **kwargs)


@contextlib.contextmanager
def attention_handler(model: torch.nn.Module, name: str, handler: Callable) -> Iterator[None]:
    """Route every attention call of ``model`` to ``handler`` inside the block; restore on exit."""
    AttentionInterface.register(name, _tca_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    modules = attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"found no attention modules with q_proj in {type(model).__name__}.")
    previous = model.config._attn_implementation
    for module in modules:
        _HANDLERS[module] = handler
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        for module in modules:
            _HANDLERS.pop(module, None)
        model.set_attn_implementation(previous)


def check_context(model: torch.nn.Module, context_len: int) -> None:
    """Raise ContextTooLongError when ``context_len`` exceeds the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context_len > limit:
        raise ContextTooLongError(
            f"the context has {context_len} tokens but the model supports {limit} "
            "(max_position_embeddings); shorten or truncate the input."
        )


class ProfileSelector:
    """TCA's own selection (DESIGN 2.1): each KV head's budgets from a calibrated profile.

    A selector tells a ``TCARun`` which keys each head keeps: ``select`` at prefill (and at a new
    turn) and ``decode_keep`` (tokens kept of each block that leaves the window during decode).
    ``tca.methods.MethodSelector`` is the other kind, for the baselines.
    """

    def __init__(self, profile: Profile, model: torch.nn.Module):
        profile.check_fits(model)
        self.profile = profile
        self.config = profile.config
        self.decode_keep = [
            [round(self.config.block_size * mean_keep_fraction(m, s)) for m, s in zip(mu, sigma, strict=True)]
            for mu, sigma in zip(profile.mu.tolist(), profile.sigma.tolist(), strict=True)
        ]  # [layer][kv head]

    def select(self, layer: int, query, key, scale: float, key_start) -> Any:
        """Kept keys of every (row, KV head): query (B, H, Lq, d), key (B, G, L, d) -> Selection."""
        mu, sigma = self.profile.head_config(layer)
        observed = query[:, :, -self.config.observation_queries :]
        return ops.select(observed, key, mu, sigma, self.config, scale, key_start)


class TCARun:
    """The state of one ``tca.apply``: selector, configuration, the compressed cache and statistics.

    ``cache`` is the ``TCACache`` that ``generate`` uses (a new one per call unless one is passed
    as ``past_key_values``; ``new_cache()`` makes one to reuse across turns).
    """

    def __init__(self, model: torch.nn.Module, selector: Profile | Any, keep_history: bool = True):
        check_supported(model)
        if isinstance(selector, Profile):
            selector = ProfileSelector(selector, model)
        self.model = model
        self.selector = selector
        self.profile = getattr(selector, "profile", None)
        self.config = selector.config
        self.keep_history = keep_history
        self.fingerprint = model_fingerprint(model)
        self.group = self.fingerprint["n_heads"] // self.fingerprint["n_kv_heads"]
        self.stats = RunStats(
            self.fingerprint["n_layers"], self.fingerprint["n_kv_heads"], self.fingerprint["n_heads"]
        )
        self.cache: TCACache | None = None
        self.decode_keep = selector.decode_keep

    def new_cache(self) -> TCACache:
        """A fresh compressed cache, made the run's current one."""
        self.cache = TCACache(self.fingerprint["n_layers"], self.keep_history)
        return self.cache

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """Attention for one layer call (the AttentionInterface signature). Returns ((B, Lq, H, d), None)."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer_idx = module.layer_idx
        layer = self._cache_layer(layer_idx, key)
        if layer is not None:
            check_context(self.model, layer.seen + key.shape[2])
        if layer is None and query.shape[2] != key.shape[2]:  # decode over someone else's (dense) cache
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        if layer is not None and layer.seen > 0 and query.shape[2] == 1:
            out = self._decode(layer, layer_idx, query, key, value, scale)  # no mask work per decode step
        else:
            key_start = key_start_from_mask(
                attention_mask, attention_mask.shape[-1] if attention_mask is not None else 0
            )
            if layer is None:
                out, _ = self.prefill(layer_idx, query, key, value, key_start, scale)
            elif layer.seen == 0:
                out, selection = self.prefill(layer_idx, query, key, value, key_start, scale)
                self._store(layer, key, value, selection, key_start)
                layer.remember(key, value)
            else:
                out = self._new_turn(layer, layer_idx, query, key, value, key_start, scale)
        if layer is not None:
            layer.seen += key.shape[2]
            layer.pending = 0
            self._compress(layer, layer_idx, query, scale)
            if layer_idx == self.fingerprint["n_layers"] - 1:
                self.stats.record_cache(self.cache)
        return out.transpose(1, 2).contiguous(), None

    def _cache_layer(self, layer_idx: int, key: torch.Tensor) -> TCACacheLayer | None:
        """The compressed-cache layer this call belongs to, or None when no TCA cache is in use."""
        if self.cache is None:
            return None
        layer = self.cache.layers[layer_idx]
        return layer if layer.pending == key.shape[2] and layer.pending > 0 else None

    def prefill(self, layer, query, key, value, key_start, scale):
        """TCA prefill of the whole context (or of a new turn's queries over ``key``): select,
        attend sparsely, record statistics. Returns ((B, H, Lq, d), Selection)."""
        context_len = key.shape[2]
        check_context(self.model, context_len)
        window = self.config.effective_window
        selection = self.selector.select(layer, query, key, scale, key_start)
        if query.shape[2] == context_len:
            out = ops.sparse_prefill(
                query, key, value, selection, window, scale, key_start, self.config.query_chunk
            )
        else:
            out = reference.sparse_prefill(
                query, key, value, selection, window, scale, key_start, self.config.query_chunk
            )
        gamma = last_query_dropped_mass(query[:, :, -1], key, selection, window, scale, key_start)
        start = row_starts(key_start, key.shape[0], key.device)
        self.stats.record_prefill(layer, selection, start, window, gamma, theorem1_bound(gamma, value))
        return out, selection

    def _store(self, layer: TCACacheLayer, key, value, selection, key_start) -> None:
        """Fill the layer's cache with each head's kept tokens plus the window (true positions)."""
        batch, n_kv, context_len, _ = key.shape
        window = self.config.effective_window
        first = row_starts(key_start, batch, key.device)
        recent = torch.arange(max(context_len - window, 0), context_len, device=key.device)  # (W,)
        recent_valid = recent.view(1, -1) >= first.view(-1, 1)  # (B, W): not left padding
        columns = torch.arange(selection.indices.shape[-1], device=key.device).view(1, -1)
        layer.heads = []
        for g in range(n_kv):
            kept_valid = columns < selection.counts[:, g].view(-1, 1).to(key.device)  # (B, K)
            indices = torch.cat([selection.indices[:, g].to(key.device), recent.expand(batch, -1)], 1)
            valid = torch.cat([kept_valid, recent_valid], 1)  # (B, K + W)
            compact = valid_first(valid)
            indices = torch.gather(indices, 1, compact).masked_fill(
                ~torch.gather(valid, 1, compact), context_len
            )
            lengths = valid.sum(-1)
            indices = indices[:, : int(lengths.max())]
            layer.heads.append(HeadStore.gather(key[:, g], value[:, g], indices, lengths))
        # per row: a left-padded row's blocks start at its own first valid token, as when it runs alone
        layer.boundary = first.clamp_min(max(context_len - window, 0)).tolist()

    def _decode(self, layer: TCACacheLayer, layer_idx: int, query, key, value, scale) -> torch.Tensor:
        """One new token: append it to every head, attend over each head's entries. (B, H, 1, d)."""
        outs = []
        for g, head in enumerate(layer.heads):
            head.extend(key[:, g], value[:, g], layer.seen)
            q = query[:, g * self.group : (g + 1) * self.group]
            outs.append(ops.decode(q, head.keys[:, None], head.values[:, None], head.lengths[:, None], scale))
        layer.remember(key, value)
        return torch.cat(outs, dim=1)

    def _new_turn(self, layer: TCACacheLayer, layer_idx: int, query, key, value, key_start, scale):
        """A prefill onto a non-empty cache: select again from the whole host history when it is
        kept, else attend to the stored entries plus the new tokens (causal). (B, H, n, d)."""
        if layer.history is not None:
            full_key = torch.cat([layer.history[0].to(key.device, key.dtype), key], dim=2)
            full_value = torch.cat([layer.history[1].to(value.device, value.dtype), value], dim=2)
            out, selection = self.prefill(layer_idx, query, full_key, full_value, key_start, scale)
            self._store(layer, full_key, full_value, selection, key_start)
            layer.remember(key, value)
            return out
        outs = []
        for g, head in enumerate(layer.heads):
            q = query[:, g * self.group : (g + 1) * self.group]
            outs.append(
                reference.attend_after_cache(
                    q, head.keys, head.values, head.lengths, key[:, g], value[:, g], scale
                )
            )
            head.extend(key[:, g], value[:, g], layer.seen)
        return torch.cat(outs, dim=1)

    def _compress(self, layer: TCACacheLayer, layer_idx: int, query, scale) -> None:
        """Cut every block that has left the window to its head's budget (DESIGN 2.4); rows whose
        next block starts at the same position are cut together."""
        block, window = self.config.block_size, self.config.effective_window
        while True:
            due = [row for row, start in enumerate(layer.boundary) if layer.seen - window - start >= block]
            if not due:
                return
            start = min(layer.boundary[row] for row in due)
            rows = [row for row in due if layer.boundary[row] == start]
            for g, head in enumerate(layer.heads):
                keep = self.decode_keep[layer_idx][g]
                if keep < block:
                    q = query[:, g * self.group : (g + 1) * self.group, -1]
                    head.compress_block(
                        start, block, keep, q, scale, rows=None if len(rows) == len(layer.boundary) else rows
                    )
            for row in rows:
                layer.boundary[row] = start + block


def _generate_with_cache(run: TCARun, generate: Callable) -> Callable:
    """``model.generate`` using the run's compressed cache unless the caller passes a cache."""
    # newer transformers call it ``cache`` (``past_key_values`` deprecated); 5.17 knows only the old name
    name = "cache" if "cache" in inspect.signature(type(run.model).forward).parameters else "past_key_values"

    def tca_generate(*args, **kwargs):
        given = kwargs.get("past_key_values", kwargs.get("cache"))
        if given is None:
            kwargs[name] = run.new_cache()
        elif isinstance(given, TCACache):
            run.cache = given
        return generate(*args, **kwargs)

    return tca_generate


@contextlib.contextmanager
def apply(model: torch.nn.Module, profile: Profile | Any, keep_history: bool = True) -> Iterator[TCARun]:
    """Run ``model`` with TCA attention inside the block.

    ``profile``: a calibrated ``Profile`` (TCA), or any selector with ``config``, ``decode_keep``
    and ``select`` (``tca.methods.MethodSelector`` runs a baseline the same way).

    Prefill uses TCA sparse attention; ``model.generate`` also uses a compressed per-head KV
    cache (``run.cache``). ``keep_history`` keeps every token's K/V on the host so that a new
    turn re-selects from the whole conversation. Yields the ``TCARun``, whose ``stats`` fill as
    the model runs. Everything is restored on exit, also after an exception.
    """
    run = TCARun(model, profile, keep_history)
    with attention_handler(model, ATTENTION_NAME, run):
        model.generate = _generate_with_cache(run, type(model).generate.__get__(model))
        try:
            yield run
        finally:
            del model.generate


_PATCHED: weakref.WeakKeyDictionary[torch.nn.Module, contextlib.ExitStack] = weakref.WeakKeyDictionary()


def patch(model: torch.nn.Module, profile: Profile, keep_history: bool = True) -> TCARun:
    """``apply`` without a ``with``: TCA stays on until ``unpatch(model)``. Returns the run."""
    if model in _PATCHED:
        raise RuntimeError("this model is already patched with TCA; call tca.unpatch(model) first.")
    stack = contextlib.ExitStack()
    run = stack.enter_context(apply(model, profile, keep_history))
    _PATCHED[model] = stack
    return run


def unpatch(model: torch.nn.Module) -> None:
    """Undo ``patch``: the model is as it was before (parameters are never touched)."""
    stack = _PATCHED.pop(model, None)
    if stack is None:
        raise RuntimeError("this model is not patched with TCA (tca.patch was not called on it).")
    stack.close()
