"""``model.generate`` under ``tca.apply``: which cache it uses, which generation modes that cache
serves (a clear error for the others), and where it stops (the model's context limit)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .cache import TCACache


class StopAtContextLimit(StoppingCriteria):
    """Stops ``generate`` before the model would read a token past its context limit
    (``max_position_embeddings``), with a warning, keeping what was generated.

    The model reads at most ``limit`` tokens, so a sequence ends at ``limit + 1`` tokens (the last
    one predicted from the first ``limit``). Dense attention would go on reading positions the
    model was not trained on; TCA stops, where ``ContextTooLongError`` would lose the output.
    """

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = input_ids.shape[-1] > self.limit
        if done:
            warnings.warn(
                f"generation stopped at the model's context limit (max_position_embeddings = "
                f"{self.limit}); the output keeps the {input_ids.shape[-1]} tokens generated so far.",
                stacklevel=2,
            )
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _requested_length(options: GenerationConfig, args: tuple, kwargs: dict) -> int | None:
    """The sequence length ``generate`` was asked for via ``max_new_tokens`` (None: not known here)."""
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if options.max_new_tokens is None or not isinstance(inputs, torch.Tensor):
        return None
    return inputs.shape[-1] + options.max_new_tokens


# generation modes the compressed cache serves: each step appends one token to every row
_SERVED_MODES = ("greedy_search", "sample")
# options that choose another generation mode (transformers' GenerationConfig names)
_MODE_OPTIONS = (
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "constraints",
    "force_words_ids",
    "prompt_lookup_num_tokens",
    "assistant_early_exit",
    "use_mtp",
    "dola_layers",
)


def _generation_options(model: torch.nn.Module, kwargs: dict) -> GenerationConfig:
    """The options ``generate(**kwargs)`` runs with: kwargs over ``generation_config`` over the model's."""
    options = copy.deepcopy(kwargs.get("generation_config") or model.generation_config or GenerationConfig())
    for name, value in kwargs.items():
        if name != "generation_config" and hasattr(options, name):
            setattr(options, name, value)  # no validation here: generate validates (and warns) itself
    return options


def _check_cache_serves(options: GenerationConfig, kwargs: dict) -> None:
    """Raise ValueError naming the option when ``generate`` would need a cache that the compressed
    one is not (beams reorder it, assisted decoding crops it, contrastive search branches it)."""
    mode = options.get_generation_mode(kwargs.get("assistant_model"))
    if mode in _SERVED_MODES:
        return
    assistant = kwargs.get("assistant_model")
    chosen = [f"assistant_model={type(assistant).__name__}"] if assistant is not None else []
    for name in _MODE_OPTIONS:
        value = getattr(options, name, None)
        if value not in (None, False, 0, 1):
            chosen.append(f"{name}={value!r}")
    raise ValueError(
        f"generate({', '.join(chosen) or mode}) runs {mode.replace('_', ' ')}, which the TCA cache cannot "
        "serve (its heads cannot be reordered or cropped): use greedy search or sampling (num_beams=1), "
        "or pass use_cache=False (every step is then a TCA prefill of the whole sequence)."
    )


def generate_with_cache(run: Any, generate: Callable) -> Callable:
    """``model.generate`` for a ``TCARun``: with the run's compressed cache unless the caller passes
    a cache (or ``use_cache=False``: then every step is an independent TCA prefill), for the
    generation modes that cache serves, stopping at the model's context limit."""
    # newer transformers call it ``cache`` (``past_key_values`` deprecated); 5.17 knows only the old name
    name = "cache" if "cache" in inspect.signature(type(run.model).forward).parameters else "past_key_values"
    limit = getattr(run.model.config, "max_position_embeddings", None)

    def tca_generate(*args, **kwargs):
        options = _generation_options(run.model, kwargs)
        given = kwargs.get("past_key_values", kwargs.get("cache"))
        if isinstance(given, TCACache) or (given is None and options.use_cache is not False):
            _check_cache_serves(options, kwargs)
            if given is None:
                kwargs[name] = run.new_cache()
            else:
                run.set_cache(given)
        requested = _requested_length(options, args, kwargs)
        if limit is not None and (requested is None or requested > limit + 1):
            criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
            kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, StopAtContextLimit(limit)])
        with _decode_graph(run):
            output = generate(*args, **kwargs)
        run.gather_stats()  # the cache sizes after decoding, from every rank (tensor parallel)
        return output

    return tca_generate


@contextlib.contextmanager
def _decode_graph(run: Any) -> Iterator[None]:
    """Inside the block the model's forward serves the run's decode steps from its ``DecodeGraph``
    (``cuda_graphs=True``; nothing otherwise); the forward in place before is restored after."""
    if run.decode_graph is None:
        yield
        return
    model = run.model
    previous = model.__dict__.get("forward")  # an instance forward (accelerate's hooks) stays
    model.forward = run.decode_graph.wrap(model.forward)
    try:
        yield
    finally:
        run.decode_graph.release()
        if previous is None:
            del model.forward
        else:
            model.forward = previous
