"""Decode steps replayed from a CUDA graph: ``tca.apply(model, profile, cuda_graphs=True)``.

An eager decode step spends most of its time on the host at short contexts: Python and kernel
launches for every layer, dense's and TCA's alike. With ``cuda_graphs=True``, ``model.generate``
captures one whole decode forward (every layer) once and replays it for every later token, so
a step costs one replay plus TCA's host bookkeeping, whatever the number of layers.

A step is split in two (``StaticStep``):
- the device side, captured: each layer appends its token to the ragged store and attends
  (``LayerStore.attend_appending``, the position read from a device tensor) and writes the token
  into the host history's staging block at a device index;
- the host side, run after each replay: the counts the eager step keeps on the host (``seen``,
  the stores' host bounds, the history's staged tokens), block compression when a block has left
  the window (with each layer's query of the step, which the graph leaves in its buffers; the cut
  is in place, so the graph stays valid), and the statistics.

The graph lives for one ``generate`` call (one cache and batch; its memory is freed when the call
returns), and for one set of store buffers. The first decode
step of a call runs eagerly (it compiles what the capture needs) and the second is captured; when
a store grows the next step runs eagerly and the one after is captured again. A store grows a
head by an eighth of its entries (16 at the least), as without graphs: the same buffers, so the
same arithmetic bit for bit; a head that keeps every token grows every 1,000 tokens at 8K.

Off CUDA the step runs eagerly, uncaptured: the same arithmetic, no speed-up (the CPU tests check
that it equals the eager ``generate``).

Served: models whose every attention layer TCA manages (Llama, Qwen2/3, Mistral without a window),
batch of any size (left padding included), greedy search and sampling; one process or tensor
parallel. Under tensor parallelism each rank captures its own step, the model's NCCL all-reduces
included (NCCL runs captured collectives as kernels of the graph); ranks whose stores grow at
different steps run that step eagerly while the others replay, which issues the same collectives in
the same order. A forward ``generate`` makes that is not a decode step of the run's cache (prefill,
a new turn) runs as without graphs.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .registration import check_context

# the tensors of a decode forward that the graph takes through its static buffers (the mask it drops:
# a decode step of the compressed cache reads no mask)
STEP_INPUTS = ("input_ids", "position_ids", "cache_position", "attention_mask")


class StaticStep:
    """One decode step split into its device side (``attend``, what a graph captures) and its host
    side (``finish``). ``position`` and ``slot``: one-element int64 device tensors, the token's
    position (index space) and its slot in the history's staging block."""

    def __init__(self, run: Any, device: torch.device):
        self.run = run
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)
        self.queries: dict[int, tuple[torch.Tensor, float]] = {}  # layer -> (its query (B, H, 1, d), scale)

    def layers(self) -> list:
        return [self.run.cache.layers[i] for i in self.run.layout.layers]

    def prepare(self) -> tuple[int, bool]:
        """Host side before the step: the context limit, room in every store, and the step's position
        and staging slot written to the device. Returns (tokens seen, whether a store grew)."""
        layers = self.layers()
        seen = layers[0].seen
        check_context(self.run.model, seen + 1)
        grew = [layer.store.reserve(1) for layer in layers]
        history = layers[0]._history
        self.position.fill_(seen)
        self.slot.fill_(0 if history is None else history.staged)
        return seen, any(grew)

    def attend(self, layer: Any, layer_idx: int, query, key, value, scale: float) -> torch.Tensor:
        """Device side of one layer's step: stage the token in the history, append and attend.
        (B, H, 1, d). Nothing on the host changes (a replay runs none of this Python)."""
        if layer._history is not None:
            layer._history.stage(key, value, self.slot)
        self.queries[layer_idx] = (query, scale)
        return layer.store.attend_appending(query, key, value, self.position, scale)

    def finish(self) -> None:
        """Host side after the step (eager or replayed): what the eager step counts on the host,
        block compression with each layer's query of the step, and the statistics."""
        run = self.run
        for layer_idx in run.layout.layers:
            layer = run.cache.layers[layer_idx]
            if layer._history is not None:
                layer._history.advance()
            layer.seen += 1
            layer.pending = 0
            query, scale = self.queries[layer_idx]
            run.policy.compress(layer, layer_idx, query, scale)
        run._stats.record_cache(run.cache)


class DecodeGraph:
    """Serves ``generate``'s decode forwards of one run from a captured CUDA graph (module docstring)."""

    def __init__(self, run: Any):
        self._run = weakref.ref(run)  # the run holds this object: no cycle, so the run (its cache, its
        # pinned history) is freed as soon as its last reference goes, without waiting for the collector
        self.step: StaticStep | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False  # an eager step ran since the last change: the next one may be captured
        self.inputs: dict[str, torch.Tensor] = {}  # static input buffers of the graph
        self.output: Any = None  # the graph's output (its logits are overwritten by each replay)
        self.capturable = True  # False once a capture failed (until the generate ends)
        self.steps = 0  # decode steps served (eager or replayed)
        self.replays = 0
        self.captures = 0

    @property
    def run(self) -> Any:
        return self._run()

    def wrap(self, forward: Callable) -> Callable:
        """``forward`` that serves the run's decode steps here and everything else as before."""
        takes_cache_position = "cache_position" in inspect.signature(forward).parameters

        @functools.wraps(forward)  # generate reads the signature (which arguments it may pass)
        def graphed_forward(*args, **kwargs):
            if args or not self.serves(kwargs):
                return forward(*args, **kwargs)
            return self(forward, kwargs, takes_cache_position)

        return graphed_forward

    def release(self) -> None:
        """Free the graph and its memory (the end of a ``generate``: a graph lives for one call)."""
        self.graph, self.output, self.warm = None, None, False
        self.step, self.inputs, self.capturable = None, {}, True

    def serves(self, kwargs: dict) -> bool:
        """Whether this forward is a decode step of the run's current cache (one new token per row)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids")
        if cache is None or cache is not self.run.cache or ids is None or ids.shape[-1] != 1:
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if any(isinstance(v, torch.Tensor) for k, v in kwargs.items() if k not in STEP_INPUTS):
            return False  # an input the graph would freeze (inputs_embeds, ...)
        layers = [cache.layers[i] for i in self.run.layout.layers]
        return all(layer.seen > 0 and layer.store is not None for layer in layers)

    def __call__(self, forward: Callable, kwargs: dict, takes_cache_position: bool):
        ids = kwargs["input_ids"]
        if self.step is None or self.step.position.device != ids.device:
            self.step = StaticStep(self.run, ids.device)
        seen, grew = self.step.prepare()
        if grew:  # new store buffers: the graph's addresses are stale
            self.graph, self.output, self.warm = None, None, False  # its memory goes back first
        inputs = self._static_inputs(ids, kwargs.get("position_ids"), seen, takes_cache_position)
        call = {k: v for k, v in kwargs.items() if k not in STEP_INPUTS} | inputs
        output = None
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            output = self.output
        elif ids.device.type == "cuda" and self.warm and self.capturable:
            output = self._capture(forward, call)  # None when the capture failed
        if output is None:  # the first step of a call or after a growth, every step off CUDA, or no capture
            output = self._eager(forward, call)
            self.warm = True
        self.step.finish()
        self.steps += 1
        return output

    def _static_inputs(self, ids, position_ids, seen: int, takes_cache_position: bool) -> dict:
        """The step's inputs copied into the graph's static buffers: ids (B, 1), position_ids (B, 1)
        (transformers' own, or ``seen`` for every row as transformers computes them when absent) and,
        for transformers versions that take it, cache_position (1,)."""
        batch = ids.shape[0]
        if self.inputs.get("input_ids") is None or self.inputs["input_ids"].shape != ids.shape:
            self.inputs = {
                "input_ids": torch.empty_like(ids),
                "position_ids": torch.empty(batch, 1, dtype=torch.int64, device=ids.device),
            }
            if takes_cache_position:
                self.inputs["cache_position"] = torch.empty(1, dtype=torch.int64, device=ids.device)
        self.inputs["input_ids"].copy_(ids)
        if position_ids is None:
            self.inputs["position_ids"].fill_(seen)
        else:
            self.inputs["position_ids"].copy_(position_ids.expand(batch, 1))
        if takes_cache_position:
            self.inputs["cache_position"].fill_(seen)
        return self.inputs

    def _eager(self, forward: Callable, call: dict):
        """The static step run eagerly (the first after a change, and every step off CUDA)."""
        self.run.static = self.step
        try:
            return forward(**call)
        finally:
            self.run.static = None

    def _capture(self, forward: Callable, call: dict):
        """Capture the step and replay it (the capture itself runs nothing). None, with a warning,
        when the capture fails (something in the forward cannot be captured): this ``generate``
        then decodes eagerly (the capture ran nothing, so the step is still to do)."""
        graph = torch.cuda.CUDAGraph()
        self.run.static = self.step
        # tensor parallel: the process group's watchdog thread polls its events during the capture
        errors = "thread_local" if self.run.layout.sharded else "global"
        try:
            with torch.cuda.graph(graph, capture_error_mode=errors):
                output = forward(**call)
        except RuntimeError as error:
            self.capturable = False
            warnings.warn(
                f"cuda_graphs: the decode step could not be captured ({str(error)[:200]}); this generate "
                "decodes without graphs (the same tokens).",
                stacklevel=2,
            )
            return None
        finally:
            self.run.static = None
        graph.replay()
        self.graph, self.output = graph, output
        self.captures += 1
        self.replays += 1
        return output
