"""``tca.apply``: a model runs with TCA attention and a compressed KV cache inside a ``with`` block.

``TCARun`` is the handler of every attention call (see ``registration``): prefill selects and
attends sparsely, decode and new turns go through the cache policy (``policy``), and the run's
``stats`` fill as the model runs.

Only the layers TCA manages (``layout``: the full-attention ones) come to the run; on a model
that mixes in sliding-window layers (Gemma 3) those keep transformers' own window attention (on a
GPU their prefill through TCA's window kernel, ``sliding``) and, in the cache, transformers' own
sliding-window layer.

Under tensor parallelism each rank runs its own ``TCARun`` over the KV heads it holds
(``layout``): its own budgets, its own compressed cache. ``stats`` report the whole model: the
ranks gather their statistics after each prefill and after each ``generate`` (points every rank
reaches together; no collective runs per decode step).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ... import ops
from ...core.error_bound import bound_from_value_max, theorem1_bound
from ...core.profile import Profile, ProfileError, model_fingerprint
from ...core.stats import RunStats
from .cache import TCACache, TCACacheLayer
from .generate import generate_with_cache
from .graphs import DecodeGraph, StaticStep
from .layout import head_layout
from .policy import CachePolicy
from .registration import (
    ATTENTION_NAME,
    attention_handler,
    check_context,
    check_supported,
    key_start_from_mask,
)
from .selector import ProfileSelector


class TCARun:
    """The state of one ``tca.apply``: selector, configuration, the compressed cache and statistics.

    ``cache`` is the ``TCACache`` that ``generate`` uses (a new one per call unless one is passed
    as ``past_key_values``; ``new_cache()`` makes one to reuse across turns).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        selector: Profile | Any,
        keep_history: bool = True,
        cuda_graphs: bool | None = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"tca.apply needs a transformers model (tca.load_model returns one), got {_what(model)}."
            )
        check_supported(model)
        selector = _as_selector(selector)
        if isinstance(selector, Profile):
            selector = ProfileSelector(selector, model)
        self.model = model
        self.selector = selector
        self.profile = getattr(selector, "profile", None)
        self.config = selector.config
        self.keep_history = keep_history
        self.fingerprint = model_fingerprint(model)
        self.layout = layout = head_layout(model)
        self.group = layout.group
        # the whole model's managed layers
        self.stats = RunStats(layout.n_layers, layout.n_kv_heads, layout.n_heads, layout.layers)
        # what this process records: its own heads (the same object when it holds them all)
        self._stats = RunStats(layout.n_layers, layout.local_kv_heads, layout.local_heads, layout.layers)
        if not layout.sharded:
            self._stats = self.stats
        self.cache: TCACache | None = None
        self.decode_keep = selector.decode_keep
        if [len(heads) for heads in self.decode_keep] != [layout.local_kv_heads] * layout.n_layers:
            raise ValueError(
                f"the selector's decode_keep is not one entry per KV head held here for each of "
                f"{layout.n_layers} layers ({layout.local_kv_heads} KV heads); build it from the "
                "model's layout (tca.integrations.transformers.layout.head_layout(model))."
            )
        self.policy = CachePolicy(self.config, self.group, self.decode_keep)
        if cuda_graphs is None:  # the default: wherever graphs serve this model
            cuda_graphs = _graphs_refusal(model, layout) is None and _graph_safe_device(model)
        elif cuda_graphs and (refusal := _graphs_refusal(model, layout)):
            raise ValueError(refusal)
        self.cuda_graphs = bool(cuda_graphs)  # whether generate's decode steps replay a CUDA graph
        self.static: StaticStep | None = None  # set while a graph's decode step runs (graphs.py)
        # (mask, key_start) of the forward running now: every layer gets the same mask (_key_start)
        self._padding: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.decode_graph = DecodeGraph(self) if cuda_graphs else None

    def new_cache(self) -> TCACache:
        """A fresh compressed cache, made the run's current one."""
        layout = self.layout
        self.set_cache(
            TCACache(
                layout.n_layers,
                self.keep_history,
                self.config.block_size,
                layout.layers,
                layout.sliding_window,
            )
        )
        return self.cache

    def set_cache(self, cache: TCACache) -> None:
        """Make ``cache`` the current one: only the current cache of a live run accepts new tokens."""
        if self.cache is not None and self.cache is not cache:
            self.cache.in_use = False
        cache.in_use = True
        self.cache = cache

    def close(self) -> None:
        """The ``apply`` block has ended: the cache accepts no more tokens (``run.cache`` and
        ``run.stats`` can still be read)."""
        if self.cache is not None:
            self.cache.in_use = False

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """Attention for one call of a managed layer (the AttentionInterface signature).
        Returns ((B, Lq, H, d), None)."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer_idx = module.layer_idx
        layer = self._cache_layer(layer_idx, key)
        if layer is not None:
            check_context(self.model, layer.seen + key.shape[2])
        if layer is None and query.shape[2] != key.shape[2]:  # decode over someone else's (dense) cache
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        decoding = layer is not None and layer.seen > 0 and query.shape[2] == 1
        if decoding and self.static is not None:  # a graph's step: its device side only
            out = self.static.attend(layer, layer_idx, query, key, value, scale)
            return out.transpose(1, 2).contiguous(), None
        if decoding:
            out = self.policy.decode(layer, query, key, value, scale)  # no mask work per decode step
        else:
            key_start = self._key_start(attention_mask)
            if layer is None:
                out, _ = self.prefill(layer_idx, query, key, value, key_start, scale)
            elif layer.seen == 0:
                out, selection = self.prefill(layer_idx, query, key, value, key_start, scale)
                self.policy.store(layer, key, value, selection, key_start)
                layer.remember(key, value)
            else:
                out = self._new_turn(layer, layer_idx, query, key, value, key_start, scale)
        if layer is not None:
            layer.seen += key.shape[2]
            layer.pending = 0
            self.policy.compress(layer, layer_idx, query, scale)
            if layer_idx == self.layout.layers[-1]:
                self._stats.record_cache(self.cache)
        if layer_idx == self.layout.layers[-1] and not decoding:
            self._padding = None  # the forward's mask and padding go with it
            self._stats.flush()  # the prefill's one synchronisation for its statistics
            self.gather_stats()  # a prefill's last layer: every rank is here together
        return out.transpose(1, 2).contiguous(), None

    def _key_start(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) first valid key per row of this forward's mask (None: no padding). Every layer of a
        forward gets the same mask object: it is read once, and every layer gets the same tensor
        (so its host copy is read once too, ``core.transfer.host_ints``)."""
        if attention_mask is None:
            return None
        if self._padding is None or self._padding[0] is not attention_mask:
            self._padding = (attention_mask, key_start_from_mask(attention_mask, attention_mask.shape[-1]))
        return self._padding[1]

    def _cache_layer(self, layer_idx: int, key: torch.Tensor) -> TCACacheLayer | None:
        """The compressed-cache layer this call belongs to, or None when no TCA cache is in use."""
        if self.cache is None:
            return None
        layer = self.cache.layers[layer_idx]
        return layer if layer.pending == key.shape[2] and layer.pending > 0 else None

    def prefill(self, layer, query, key, value, key_start, scale, selection=None, value_max=None):
        """TCA prefill of the whole context (or of a new turn's queries over ``key``): select (unless
        ``selection`` is given), attend sparsely, record statistics. ``value_max`` (B, G): the
        context's max |V|, given when ``value`` holds only the rows the selection reads (a new
        turn's). Returns ((B, H, Lq, d), Selection)."""
        context_len = key.shape[2]
        check_context(self.model, context_len)
        window = self.config.effective_window
        if selection is None:
            selection = self.selector.select(layer, query, key, scale, key_start)
        out = ops.sparse_prefill(
            query, key, value, selection, window, scale, key_start, self.config.query_chunk
        )
        gamma = ops.dropped_mass(query[:, :, -1], key, selection, window, scale, key_start)
        bound = theorem1_bound(gamma, value) if value_max is None else bound_from_value_max(gamma, value_max)
        self._stats.record_prefill(layer, selection, key_start, window, gamma, bound)
        return out, selection

    def gather_stats(self) -> None:
        """Bring ``stats`` up to date with every rank's heads (tensor parallel; otherwise nothing to do).

        A collective: every rank calls it at the same point. The run calls it after each prefill and
        after each ``generate``; a hand-written decode loop calls it when it wants the cache sizes.
        """
        if self.layout.sharded:
            self.stats.gather_from(self.layout.gather(self._stats))

    def _new_turn(self, layer: TCACacheLayer, layer_idx: int, query, key, value, key_start, scale):
        """A prefill onto a non-empty cache: select again from the whole host history when it is
        kept, else attend to the stored entries plus the new tokens (causal). (B, H, n, d).

        With the history, every key comes back to the device (the next layer's copy starts now, so
        it runs while this layer computes) but only the values the new queries and the new store
        read: each head's kept rows and the window (``HostHistory.values_then``)."""
        history = layer.host_history
        if history is None:
            return self.policy.attend_new_turn(layer, query, key, value, scale)
        self._prefetch_after(layer_idx, key)
        full_key = history.keys_then(key)  # (B, G, past + n, d)
        selection = self.selector.select(layer_idx, query, full_key, scale, key_start)
        past, window = full_key.shape[2] - key.shape[2], self.config.effective_window
        full_value = history.values_then(value, rows_read(selection, past, window, key.device))
        layer.remember(key, value)  # the new tokens join the history, and its max |V|
        out, _ = self.prefill(
            layer_idx, query, full_key, full_value, key_start, scale, selection, history.value_max
        )
        self.policy.store(layer, full_key, full_value, selection, key_start)
        return out

    def _prefetch_after(self, layer_idx: int, key: torch.Tensor) -> None:
        """Start copying the next managed layer's history keys to the device (a new turn)."""
        later = [other for other in self.layout.layers if other > layer_idx]
        history = self.cache.layers[later[0]].host_history if later else None
        if history is not None:
            history.prefetch_keys(key.shape[2], key)


def rows_read(selection, past: int, window: int, device: torch.device) -> torch.Tensor:
    """(B, G, K + w) history positions that a new turn's queries and its new store read: each head's
    kept ones and the window of the turn's first query (the new tokens are not in the history:
    positions >= ``past``, padding included, are skipped by ``ops.read_host_rows``)."""
    kept = selection.indices.to(device)  # (B, G, K)
    recent = torch.arange(max(0, past - window + 1), past, device=device)
    return torch.cat([kept, recent.expand(*kept.shape[:2], -1)], 2)


def _graphs_refusal(model: torch.nn.Module, layout) -> str | None:
    """Why ``cuda_graphs=True`` cannot serve this model (``graphs.py``), or None when it can."""
    architecture = type(model).__name__
    others = sorted(set(range(layout.n_layers)) - set(layout.layers))
    if others:
        return (
            f"cuda_graphs=True needs every attention layer managed by TCA, but {architecture}'s layers "
            f"{others} attend within a sliding window (transformers' own cache): pass cuda_graphs=False."
        )
    return None


def _graph_safe_device(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is on one CUDA device whose ops are the Triton kernels
    (their decode step never waits for the device, so a graph can capture it)."""
    devices = {parameter.device for parameter in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False
    return ops.backend(next(iter(devices))).name == "triton"


def _what(value: Any) -> str:
    """``value`` for an error message: its type, and its repr when short."""
    if value is None:
        return "None"
    shown = repr(value)
    return f"{type(value).__name__} {shown}" if len(shown) <= 40 else type(value).__name__


def _as_selector(profile: Any) -> Profile | Any:
    """What ``apply`` was given as its profile: a Profile or a selector as is, a path loaded."""
    if isinstance(profile, (str, os.PathLike)):
        if not os.path.isfile(profile):
            from ...bundled.profiles import bundled_profiles

            raise ProfileError(
                f"tca.apply got the path {os.fspath(profile)!r}, which is no profile file; pass a Profile: "
                f"tca.Profile.load(PATH), tca.calibrate(model, tokenizer), or a bundled model's "
                f"tca.profile_for(NAME) (bundled: {', '.join(bundled_profiles()) or 'none'})."
            )
        return Profile.load(profile)
    if isinstance(profile, Profile) or all(hasattr(profile, a) for a in ("config", "decode_keep", "select")):
        return profile
    raise TypeError(
        f"tca.apply needs a Profile, got {_what(profile)}: pass tca.Profile.load(PATH), "
        "tca.calibrate(model, tokenizer) or tca.profile_for(NAME) (a bundled model's), "
        "or a selector such as tca.methods.MethodSelector."
    )


@contextlib.contextmanager
def apply(
    model: torch.nn.Module,
    profile: Profile | Any,
    keep_history: bool = True,
    cuda_graphs: bool | None = None,
) -> Iterator[TCARun]:
    """Run ``model`` with TCA attention inside the block.

    ``profile``: a calibrated ``Profile`` (TCA) or the path of a saved one, or any selector with
    ``config``, ``decode_keep`` and ``select`` (``tca.methods.MethodSelector`` runs a baseline
    the same way).

    Prefill uses TCA sparse attention; ``model.generate`` also uses a compressed per-head KV
    cache (``run.cache``), for greedy search and sampling (other modes: ``use_cache=False``), and
    stops with a warning when a sequence reaches the model's context limit, keeping what it
    generated. ``keep_history`` keeps every token's K/V on the host so that a new turn re-selects
    from the whole conversation. ``cuda_graphs`` replays ``generate``'s decode steps from a captured
    CUDA graph (``graphs.py``; the same tokens, less host time): None (default) does so wherever it
    serves (the model on one CUDA device per process, every layer managed), True insists (a
    ValueError where it cannot serve), False decodes eagerly. Under tensor parallelism each rank
    captures its own step, the model's all-reduces included.
    Yields the ``TCARun``, whose ``stats`` fill as the model runs.
    Everything is restored on exit, also after an exception; the cache then accepts no more
    tokens. Runs do not nest: entering ``apply`` (or ``patch``) on a model already under one
    is a RuntimeError that leaves the outer run as it was.
    """
    run = TCARun(model, profile, keep_history, cuda_graphs)
    with attention_handler(model, ATTENTION_NAME, run, run.layout.layers):
        model.generate = generate_with_cache(run, type(model).generate.__get__(model))
        try:
            yield run
        finally:
            del model.generate
            run.close()


_PATCHED: weakref.WeakKeyDictionary[torch.nn.Module, contextlib.ExitStack] = weakref.WeakKeyDictionary()


def patch(
    model: torch.nn.Module, profile: Profile, keep_history: bool = True, cuda_graphs: bool | None = None
) -> TCARun:
    """``apply`` without a ``with``: TCA stays on until ``unpatch(model)``. Returns the run."""
    if model in _PATCHED:
        raise RuntimeError("this model is already patched with TCA; call tca.unpatch(model) first.")
    stack = contextlib.ExitStack()
    run = stack.enter_context(apply(model, profile, keep_history, cuda_graphs))
    _PATCHED[model] = stack
    return run


def unpatch(model: torch.nn.Module) -> None:
    """Undo ``patch``: the model is as it was before (parameters are never touched)."""
    stack = _PATCHED.pop(model, None)
    if stack is None:
        raise RuntimeError("this model is not patched with TCA (tca.patch was not called on it).")
    stack.close()
