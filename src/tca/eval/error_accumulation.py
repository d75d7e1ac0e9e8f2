"""How TCA's attention error builds up through the layers of a model, on one input.

Isolated error: each layer gets the inputs the dense model gives it (query, key and value after
RoPE, from one dense forward pass). Its attention output under dense causal attention is compared
with TCA's sparse prefill (``reference.sparse_prefill``), for every query head and every query.
The selection is the profile's, made by the same observation-query rule as ``TCARun.prefill``.
Each error is checked against Theorem 1.

Compounded error: the whole model runs under ``tca.apply``. The hidden state after each layer
(the residual stream) is compared with the dense run's, and then the next-token distributions.

Norms. For query i, let p be the dense softmax and p~ the softmax renormalised over the keys TCA
lets i see. Then ``sum_k |p_k - p~_k| = 2 gamma_i``, where gamma_i is the dense mass on the keys
i cannot see. Two bounds follow, and both are checked:

- ``||o_i - o~_i||_1 <= 2 gamma_i ||V||_inf``. Here ``||V||_inf = max_k ||v_k||_1`` is the
  largest row sum of the KV head's values. This is the paper's L1 statement, and the headline.
- ``max_e |o_ie - o~_ie| <= 2 gamma_i max|V|``, per element (``tca.error_bound.theorem1_bound``).

On the Triton backend, ``tca.apply`` may answer a layer with dense attention past the measured
crossover (``ops.sparse_prefill``). The isolated error always measures the sparse rule itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..core.error_bound import last_query_dropped_mass, theorem1_bound
from ..core.profile import Profile
from ..core.selection import Selection
from ..core.softmax import causal_prob_chunks
from ..integrations.transformers.registration import attention_handler, attention_modules, check_supported
from ..integrations.transformers.run import apply
from ..integrations.transformers.selector import ProfileSelector
from ..ops import reference

TRACE_NAME = "tca-error-trace"
TOLERANCE = 1e-5  # float32 slack of a bound check, relative to the value norm in the bound


@dataclass
class LayerError:
    """Isolated error of one layer. Every array is (H,), one entry per query head.

    ``err_*`` is the L1 norm of the output error, with ``bound_*`` its bound ``2 gamma ||V||_inf``.
    ``elem_err_*`` is the largest element error, with ``elem_bound_*`` its bound ``2 gamma max|V|``.
    ``*_last`` is for the last query; ``*_mean`` is the mean over all queries. ``rel_err_mean`` is
    the relative L2 error of the output, averaged over queries. ``violations`` and
    ``elem_violations`` count the (head, query) pairs above their bound (with float slack), out of
    ``checked`` pairs.
    """

    err_last: np.ndarray
    bound_last: np.ndarray
    err_mean: np.ndarray
    bound_mean: np.ndarray
    elem_err_last: np.ndarray
    elem_bound_last: np.ndarray
    elem_err_mean: np.ndarray
    elem_bound_mean: np.ndarray
    gamma_last: np.ndarray
    gamma_mean: np.ndarray
    rel_err_mean: np.ndarray
    violations: int
    elem_violations: int
    checked: int


def kept_mask(selection: Selection, n_kv: int) -> torch.Tensor:
    """(G, L) bool: the candidates the (single-row) selection keeps for each KV head."""
    context_len = selection.context_len
    mask = torch.zeros(n_kv, context_len + 1, dtype=torch.bool, device=selection.indices.device)
    mask.scatter_(1, selection.indices[0], True)  # the padding index L lands in the extra column
    return mask[:, :context_len]


def dropped_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    selection: Selection,
    local_window: int,
    scale: float,
    chunk: int = 256,
) -> torch.Tensor:
    """gamma of every query: the dense causal softmax mass on the keys TCA hides from it.

    Query j sees its window ``(j - w, j]`` and the kept keys ``k <= j - w``; every other earlier
    key is hidden. Queries are processed ``chunk`` at a time.

    Args:
        query: (1, H, L, d); key: (1, G, L, d); selection: made over the L keys.
    Returns:
        (H, L) float32 in [0, 1].
    """
    _, n_heads, context_len, _ = query.shape
    n_kv = key.shape[1]
    kept = kept_mask(selection, n_kv).view(n_kv, 1, 1, context_len)
    cols = torch.arange(context_len, device=key.device)
    parts = []
    for lo, hi, probs in causal_prob_chunks(query[0], key[0], scale, chunk):  # (G, group, C, hi)
        rows = torch.arange(lo, hi, device=key.device).view(-1, 1)
        seen = (cols[:hi] > rows - local_window) | (kept[..., :hi] & (cols[:hi] <= rows - local_window))
        parts.append((probs * ~seen).sum(-1))  # (G, group, C); non-causal keys have probability 0
    return torch.cat(parts, dim=-1).reshape(n_heads, context_len)


def value_inf_norm(value: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``||V||_inf`` per query head: the largest L1 norm of a value row of its KV head.

    Args:
        value: (1, G, L, d).
    Returns:
        (H,) float32.
    """
    norms = value[0].float().abs().sum(-1).amax(-1)  # (G,)
    return norms.repeat_interleave(n_heads // value.shape[1])


def dense_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, chunk: int = 256
) -> torch.Tensor:
    """Dense causal attention in float32 (``reference.dense_causal``, GQA, ``chunk`` queries at a
    time): query (1, H, L, d), key, value (1, G, L, d) -> (1, H, L, d) float32."""
    return reference.dense_causal(query.float(), key.float(), value.float(), scale, query_chunk=chunk)


def isolated_layer_error(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: Selection,
    local_window: int,
    scale: float,
    dense: torch.Tensor | None = None,
    chunk: int = 256,
) -> LayerError:
    """Error of TCA's sparse prefill against dense attention for one layer, given the same inputs.

    Args:
        query: (1, H, L, d); key, value: (1, G, L, d); selection: the layer's kept keys.
        dense: (1, H, L, d) float32, the dense output when the caller already has it.
    Returns:
        The layer's ``LayerError``.
    """
    q, k, v = (t.float() for t in (query, key, value))
    n_heads = q.shape[1]
    if dense is None:
        dense = dense_attention(q, k, v, scale, chunk)
    sparse = reference.sparse_prefill(q, k, v, selection, local_window, scale, None, chunk)
    dense, diff = dense[0].float(), (dense - sparse)[0].float()  # (H, L, d)
    err, elem_err = diff.abs().sum(-1), diff.abs().amax(-1)  # (H, L)
    rel_err = diff.norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)
    gamma = dropped_mass(q, k, selection, local_window, scale, chunk)  # (H, L)
    gamma_last = last_query_dropped_mass(q[:, :, -1], k, selection, local_window, scale)[0]  # (H,)
    inf_norm = value_inf_norm(v, n_heads)  # (H,)
    twice_max = theorem1_bound(torch.ones(1, n_heads, device=v.device), v)[0]  # (H,): 2 max|V|
    bound, elem_bound = 2.0 * gamma * inf_norm[:, None], gamma * twice_max[:, None]
    violations = err > bound + TOLERANCE * inf_norm[:, None]
    elem_violations = elem_err > elem_bound + TOLERANCE * twice_max[:, None] / 2

    def host(x: torch.Tensor) -> np.ndarray:
        return x.double().cpu().numpy()

    return LayerError(
        err_last=host(err[:, -1]),
        bound_last=host(2.0 * gamma_last * inf_norm),
        err_mean=host(err.mean(-1)),
        bound_mean=host(bound.mean(-1)),
        elem_err_last=host(elem_err[:, -1]),
        elem_bound_last=host(theorem1_bound(gamma_last[None], v)[0]),
        elem_err_mean=host(elem_err.mean(-1)),
        elem_bound_mean=host(elem_bound.mean(-1)),
        gamma_last=host(gamma_last),
        gamma_mean=host(gamma.mean(-1)),
        rel_err_mean=host(rel_err.mean(-1)),
        violations=int(violations.sum()),
        elem_violations=int(elem_violations.sum()),
        checked=violations.numel(),
    )


class DenseTracer:
    """Attention handler for a dense forward pass that measures each layer's isolated TCA error.

    It answers every layer with dense causal attention (``dense_attention``, float32). On the way it records
    ``errors[layer]``, the isolated error of the profile's selection on the layer's dense inputs.
    """

    def __init__(self, model: torch.nn.Module, profile: Profile, chunk: int = 256):
        self.selector = ProfileSelector(profile, model)
        self.window = profile.config.effective_window
        self.chunk = chunk
        self.errors: dict[int, LayerError] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """One layer (the AttentionInterface signature). Returns ((1, L, H, d), None)."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer = module.layer_idx
        selection = self.selector.select(layer, query, key, scale, None)
        dense = dense_attention(query, key, value, scale, self.chunk)
        self.errors[layer] = isolated_layer_error(
            query, key, value, selection, self.window, scale, dense, self.chunk
        )
        return dense.to(query.dtype).transpose(1, 2).contiguous(), None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (the modules holding an attention module), by layer index."""
    index = {id(m): m.layer_idx for m in attention_modules(model)}
    layers = {}
    for module in model.modules():
        for child in module.children():
            if id(child) in index:
                layers[index[id(child)]] = module
    return [layers[i] for i in sorted(layers)]


@contextlib.contextmanager
def record_hidden_states(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, collect the residual stream of the first sequence of each forward pass.

    Yields a list that fills with n_layers + 1 tensors (L, D) in float32: layer 0's input, then
    the output of each layer in order. The hooks are removed on exit.
    """
    states: list[torch.Tensor] = []

    def keep(hidden) -> None:
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        states.append(hidden[0].detach().float())

    def keep_input(module, args, kwargs) -> None:
        keep(args[0] if args else kwargs["hidden_states"])

    layers = decoder_layers(model)
    handles = [layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(lambda module, args, output: keep(output)) for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Trace:
    """One forward pass over one input.

    ``hidden`` holds n_layers + 1 tensors (L, D): layer 0's input, then each layer's output.
    ``final`` (L, D) is the decoder's last hidden state, after its final norm.
    """

    hidden: list[torch.Tensor]
    final: torch.Tensor


def run_trace(model: torch.nn.Module, input_ids: torch.Tensor) -> Trace:
    """Run the decoder over ``input_ids`` (1, L) under whatever attention is set; record a Trace."""
    with torch.no_grad(), record_hidden_states(model) as hidden:
        out = model.get_decoder()(input_ids=input_ids.to(model.device), use_cache=False)
    return Trace(hidden=list(hidden), final=out.last_hidden_state[0].float())


def dense_trace(
    model: torch.nn.Module, profile: Profile, input_ids: torch.Tensor, chunk: int = 256
) -> tuple[Trace, list[LayerError]]:
    """The dense forward pass over ``input_ids`` (1, L), with each layer's isolated TCA error."""
    tracer = DenseTracer(model, profile, chunk)
    with attention_handler(model, TRACE_NAME, tracer):
        trace = run_trace(model, input_ids)
    return trace, [tracer.errors[layer] for layer in sorted(tracer.errors)]


def tca_trace(model: torch.nn.Module, profile: Profile, input_ids: torch.Tensor) -> Trace:
    """The forward pass over ``input_ids`` (1, L) with the whole model under ``tca.apply``."""
    with apply(model, profile):
        return run_trace(model, input_ids)


def relative_error(dense: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per position: ``||other - dense|| / ||dense||``; (L, D) pair -> (L,)."""
    return (other - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)


def hidden_state_errors(dense: Trace, tca: Trace, local_window: int) -> list[dict[str, float]]:
    """Per residual-stream state (layer 0's input, then each layer's output), the relative L2
    error of the TCA run against the dense one. The mean is over all positions and over the
    positions at or past the window (the first ``local_window`` queries are exact); ``last`` is
    the last position."""
    rows = []
    for d, t in zip(dense.hidden, tca.hidden, strict=True):
        rel = relative_error(d, t)
        past = rel[local_window:] if rel.shape[0] > local_window else rel[-1:]
        rows.append(
            {"mean": float(rel.mean()), "mean_past_window": float(past.mean()), "last": float(rel[-1])}
        )
    return rows


def next_token_kl(model: torch.nn.Module, dense: Trace, tca: Trace, chunk: int = 256) -> dict[str, float]:
    """KL(dense || tca) in nats of the next-token distributions, at the last position and as a
    mean over the positions of the second half. Logits are formed ``chunk`` positions at a time."""
    head = model.get_output_embeddings()
    length = dense.final.shape[0]
    kls = []
    with torch.no_grad():
        for lo in range(length // 2, length, chunk):
            hi = min(lo + chunk, length)
            weight = next(head.parameters())
            p = torch.log_softmax(head(dense.final[lo:hi].to(weight.dtype)).float(), -1)
            q = torch.log_softmax(head(tca.final[lo:hi].to(weight.dtype)).float(), -1)
            kls.append((p.exp() * (p - q)).sum(-1))
    kl = torch.cat(kls)
    return {"kl_last": float(kl[-1]), "kl_second_half_mean": float(kl.mean())}


def layer_row(layer: int, error: LayerError, hidden: dict[str, float]) -> dict:
    """One layer's JSON row: the isolated figures averaged over query heads, the hidden-state error
    after the layer, and the per-head figures under ``heads``."""
    row = {
        "layer": layer,
        "isolated_err_last": float(error.err_last.mean()),
        "bound_last": float(error.bound_last.mean()),
        "isolated_err_mean": float(error.err_mean.mean()),
        "bound_mean": float(error.bound_mean.mean()),
        "violations": error.violations,
        "hidden_rel_err_mean": hidden["mean"],
        "hidden_rel_err_last": hidden["last"],
        "hidden_rel_err_mean_past_window": hidden["mean_past_window"],
        "isolated_rel_err_mean": float(error.rel_err_mean.mean()),
        "elem_err_last": float(error.elem_err_last.mean()),
        "elem_bound_last": float(error.elem_bound_last.mean()),
        "elem_err_mean": float(error.elem_err_mean.mean()),
        "elem_bound_mean": float(error.elem_bound_mean.mean()),
        "elem_violations": error.elem_violations,
        "checked": error.checked,
        "gamma_last": float(error.gamma_last.mean()),
        "gamma_mean": float(error.gamma_mean.mean()),
    }
    row["heads"] = {
        name: getattr(error, name).tolist()
        for name in ("err_last", "bound_last", "err_mean", "bound_mean", "gamma_last", "gamma_mean")
    }
    return row


def error_accumulation(
    model: torch.nn.Module, profile: Profile, input_ids: torch.Tensor, chunk: int = 256
) -> dict:
    """Isolated and compounded TCA error of ``model`` with ``profile`` on ``input_ids`` (1, L).

    Two forward passes: one dense (which also measures each layer's isolated error) and one under
    ``tca.apply``.

    Returns:
        ``rows``, one per layer (see ``layer_row``); ``input_rel_err``, the error of layer 0's
        input (0: embeddings do not depend on attention); ``kl_last`` and ``kl_second_half_mean``.
    """
    check_supported(model)
    if input_ids.shape[0] != 1:
        raise ValueError(f"error_accumulation takes one sequence (1, L), got {tuple(input_ids.shape)}.")
    window = profile.config.effective_window
    dense, errors = dense_trace(model, profile, input_ids, chunk)
    tca = tca_trace(model, profile, input_ids)
    hidden = hidden_state_errors(dense, tca, window)
    return {
        "length": input_ids.shape[-1],
        "input_rel_err": hidden[0]["mean"],
        "rows": [layer_row(i, e, h) for i, (e, h) in enumerate(zip(errors, hidden[1:], strict=True))],
        **next_token_kl(model, dense, tca, chunk),
    }


def _mean(values: list) -> float | list:
    """Mean of numbers, or element-wise mean of equal-length lists."""
    if isinstance(values[0], list):
        return np.mean(np.array(values), axis=0).tolist()
    return float(np.mean(values))


def average_results(results: list[dict]) -> dict:
    """Average ``error_accumulation`` results over inputs. Counts (``violations``,
    ``elem_violations``, ``checked``) are summed; everything else is a mean."""
    summed = {"violations", "elem_violations", "checked"}

    def combine(key: str, values: list):
        if key in summed:
            return int(sum(values))
        if key == "layer":
            return values[0]
        return _mean(values)

    rows = []
    for layer_rows in zip(*(r["rows"] for r in results), strict=True):
        row = {k: combine(k, [r[k] for r in layer_rows]) for k in layer_rows[0] if k != "heads"}
        row["heads"] = {k: _mean([r["heads"][k] for r in layer_rows]) for k in layer_rows[0]["heads"]}
        rows.append(row)
    scalars = ("input_rel_err", "kl_last", "kl_second_half_mean")
    return {
        "inputs": len(results),
        **{k: _mean([r[k] for r in results]) for k in scalars},
        "kl_last_per_input": [r["kl_last"] for r in results],
        "rows": rows,
    }
