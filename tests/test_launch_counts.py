"""TCA's own device work per layer does not grow with the KV heads, the batch or the context.

On a GPU every device operation costs a launch gap of 3-4 us between kernels, whatever its size: an
8K prefill of Llama-3.1-8B under TCA paid for about 120 of them a layer before its cache was built
in one gather for all heads (``benchmarks/NOTES-kernels.md``, "The 8K first token"). These tests
count, with a dispatch mode, the aten operations that TCA's own code issues outside ``tca.ops`` (the
cache's bookkeeping and the statistics; the ops of ``tca.ops``, attention, selection, cache entries
and dropped mass, are Triton kernels on a GPU and PyTorch references here) and check that a
prefill's count per layer, and a decode step's, are the same for 1 and 4 KV heads, 1 and 3 rows, and
two context lengths (one at a time: with several rows and heads at once, a batched matmul may copy a
strided operand, a layout effect, not a loop): a loop over heads, rows or blocks would make them
differ.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tp_scenarios import random_ids, sparse_profile, tiny_lm

import tca
from tca.integrations.transformers import apply

SEED = 3
TCA = str(Path(tca.__file__).parent)  # the package these tests import
OPS = str(Path(TCA) / "ops")
WRAPPERS = ("generate.py",)  # tca frames that only call the model: its operations are the model's
# aten operations that launch nothing (views, metadata, allocation, host scalars)
NO_LAUNCH = {
    "view", "_unsafe_view", "_reshape_alias", "as_strided", "expand", "slice", "select", "unsqueeze",
    "squeeze", "transpose", "t", "permute", "unbind", "split", "split_with_sizes", "narrow", "alias",
    "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense",
    "scalar_tensor", "resolve_conj", "resolve_neg", "is_nonzero",
}  # fmt: skip


class TcaOperations(TorchDispatchMode):
    """Counts the launching aten operations whose innermost ``tca`` frame is TCA's own code."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            frames = [f.filename for f in traceback.extract_stack() if f.filename.startswith(TCA)]
            if frames and not frames[-1].endswith(WRAPPERS) and not any(f.startswith(OPS) for f in frames):
                self.count += 1
                self.sites[f"{Path(frames[-1]).name} {name}"] += 1
        return func(*args, **(kwargs or {}))


def model_with(kv_heads: int):
    """The tiny Llama with ``kv_heads`` KV heads (2 query heads each) and a sparse random profile."""
    model = tiny_lm("llama", SEED, num_key_value_heads=kv_heads, num_attention_heads=2 * kv_heads)
    return model, sparse_profile(model, SEED)


def generate_operations(model, profile, rows: int, length: int, new_tokens: int) -> TcaOperations:
    """TCA's operations over one greedy generate of ``new_tokens`` (after an identical warm-up)."""
    ids = torch.stack([random_ids(SEED + row, length) for row in range(rows)])
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad(), apply(model, profile):
        model.generate(ids, **options)
        with TcaOperations() as counted:
            model.generate(ids, **options)
    return counted


def per_layer(counted: TcaOperations, model) -> float:
    return counted.count / model.config.num_hidden_layers


@pytest.mark.parametrize("kv_heads, rows, length", [(4, 1, 300), (1, 3, 300), (1, 1, 460)])
def test_a_prefill_costs_the_same_operations_per_layer_whatever_the_heads_rows_or_length(
    kv_heads, rows, length
):
    reference_model, reference_profile = model_with(1)
    reference = generate_operations(reference_model, reference_profile, 1, 300, 1)
    model, profile = model_with(kv_heads)
    counted = generate_operations(model, profile, rows, length, 1)
    where = f"{kv_heads} KV heads, {rows} rows, {length} tokens against 1, 1, 300 (seed {SEED})"
    assert per_layer(counted, model) == per_layer(reference, reference_model), (
        f"{where}: {counted.sites - reference.sites} more, {reference.sites - counted.sites} fewer"
    )
    assert per_layer(reference, reference_model) > 0, "the count must see TCA's own operations"


@pytest.mark.parametrize("kv_heads, rows, length", [(4, 1, 300), (1, 3, 300), (1, 1, 460)])
def test_a_decode_step_costs_the_same_operations_per_layer_whatever_the_heads_rows_or_length(
    kv_heads, rows, length
):
    """Four decode steps against none (no block leaves the window in them: the first is due a block,
    16 tokens, after the prompt), per layer."""

    def per_step(kv: int, batch: int, tokens: int) -> tuple[float, collections.Counter]:
        model, profile = model_with(kv)
        one, five = (generate_operations(model, profile, batch, tokens, n) for n in (1, 5))
        return (per_layer(five, model) - per_layer(one, model)) / 4, five.sites - one.sites

    expected, expected_sites = per_step(1, 1, 300)
    got, sites = per_step(kv_heads, rows, length)
    where = f"{kv_heads} KV heads, {rows} rows, {length} tokens against 1, 1, 300 (seed {SEED})"
    assert got == expected, f"{where}: {got} against {expected} per step ({sites} against {expected_sites})"
    assert expected > 0, "a decode step must be seen"
