"""Which (layer, KV head) this process manages: the one place that answers it.

Under transformers' tensor parallelism (``from_pretrained(path, tp_plan="auto")`` under
``torchrun``) every attention layer's q/k/v projections are column-sharded: each parameter is a
DTensor placed ``Shard(0)`` on the tensor-parallel device mesh, and the attention function of a
rank receives only the heads of its rows (8 query / 4 KV heads on 2 ranks: 4 and 2 per rank). The
layout reads those rows from the projections' own placements, so budgets, caches and statistics
index the right global heads; ``config`` keeps the global head counts, which a profile's
fingerprint is checked against. A model that is not sharded (one process, or one full replica per
rank) manages every head and gathers nothing.

TCA keeps each KV head whole on one rank: a world size that does not divide the KV heads is an
error raised by every rank while building the layout, before any collective, so no rank waits.

The layers TCA manages are the model's full-attention layers: all of them for Llama, Qwen2/3 and
Mistral without a window; on a model that mixes sliding-window and full-attention layers (Gemma 3:
five sliding layers of 512 tokens, then one full) the sliding layers keep their window attention
(on a GPU their prefill through TCA's window kernel, ``sliding``) and transformers' own cache, and
TCA selects, prunes and compresses on the full ones only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ...core.profile import full_attention_layers, model_fingerprint, text_config
from .registration import UnsupportedModelError, attention_modules

T = TypeVar("T")


class HeadLayoutError(ValueError):
    """The model's tensor-parallel layout splits heads in a way TCA cannot serve."""


@dataclass(frozen=True)
class HeadLayout:
    """The (layer, KV head) pairs one process manages, in global indices.

    Attributes:
        n_layers, n_heads, n_kv_heads: the whole model's counts (its config).
        kv_heads: the global KV heads whose keys this process computes, ascending; its query heads
            are each KV head's group, in the same order.
        layers: the layers TCA manages, ascending: the full-attention ones (every layer but on
            models that mix in sliding-window layers).
        sliding_window: the window of the layers TCA does not manage (None when it manages all).
        rank, world_size: this process's place in the tensor-parallel group (0 and 1: unsharded).
        process_group: the tensor-parallel group statistics are gathered over (None: unsharded).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    kv_heads: tuple[int, ...]
    layers: tuple[int, ...]
    sliding_window: int | None = None
    rank: int = 0
    world_size: int = 1
    process_group: Any = field(default=None, compare=False, repr=False)

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def local_kv_heads(self) -> int:
        """How many KV heads this process holds."""
        return len(self.kv_heads)

    @property
    def local_heads(self) -> int:
        """How many query heads this process holds."""
        return len(self.kv_heads) * self.group

    @property
    def query_heads(self) -> tuple[int, ...]:
        """Global indices of this process's query heads, in the order its attention sees them."""
        return tuple(g * self.group + i for g in self.kv_heads for i in range(self.group))

    @property
    def sharded(self) -> bool:
        """Whether the heads are split over processes (statistics must then be gathered)."""
        return self.process_group is not None

    def manages(self, layer: int) -> bool:
        """Whether TCA selects and caches for ``layer``."""
        return layer in self.layers

    def gather(self, local: T) -> list[tuple[tuple[int, ...], T]]:
        """Every process's ``local`` object with the KV heads it covers, in rank order.

        One collective over the tensor-parallel group: every rank must call it at the same point.
        Unsharded: ``[(kv_heads, local)]``, no communication.
        """
        if self.process_group is None:
            return [(self.kv_heads, local)]
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, (self.kv_heads, local), group=self.process_group)
        return parts


def head_layout(model: torch.nn.Module) -> HeadLayout:
    """The layout of ``model`` in this process, from its attention projections' placements.

    Raises HeadLayoutError when tensor parallelism splits a KV head (a world size that does not
    divide the KV heads) or when the layers disagree; UnsupportedModelError for a sharding TCA does
    not know (a projection sharded over more than one mesh dimension, e.g. FSDP with TP).
    """
    shape = model_fingerprint(model)
    n_layers, n_heads, n_kv = shape["n_layers"], shape["n_heads"], shape["n_kv_heads"]
    modules = attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"found no attention modules with q_proj in {type(model).__name__}.")
    owned = [_owned_kv_heads(module, n_heads, n_kv, shape["head_dim"]) for module in modules]
    kv_heads, rank, world_size, process_group = owned[0]
    if any(layer[:3] != owned[0][:3] for layer in owned):
        found = sorted({layer[0] for layer in owned})
        raise HeadLayoutError(
            f"the attention layers of this process hold different KV heads {found}; "
            "TCA needs every layer sharded alike."
        )
    layers = tuple(full_attention_layers(model))
    return HeadLayout(
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        kv_heads=kv_heads,
        layers=layers,
        sliding_window=None if len(layers) == n_layers else text_config(model).sliding_window,
        rank=rank,
        world_size=world_size,
        process_group=process_group,
    )


def _owned_kv_heads(
    module: torch.nn.Module, n_heads: int, n_kv: int, head_dim: int
) -> tuple[tuple[int, ...], int, int, Any]:
    """(global KV heads, rank, world size, process group) of one attention module's shards."""
    head_dim = getattr(module, "head_dim", None) or head_dim
    group = n_heads // n_kv
    rows = {name: _owned_rows(getattr(module, name).weight) for name in ("q_proj", "k_proj", "v_proj")}
    first, stop, rank, world_size, process_group = rows["k_proj"]
    if n_kv % world_size:
        divisors = ", ".join(str(d) for d in range(1, n_kv + 1) if n_kv % d == 0)
        raise HeadLayoutError(
            f"tensor parallelism over {world_size} processes splits the model's {n_kv} KV heads "
            f"({n_kv / world_size:g} per process), but TCA keeps each KV head whole on one process: "
            f"run with a number of processes that divides {n_kv} ({divisors})."
        )
    per_rank = n_kv // world_size
    kv_first = first // head_dim
    expected = {
        "k_proj": (kv_first * head_dim, (kv_first + per_rank) * head_dim),
        "v_proj": (kv_first * head_dim, (kv_first + per_rank) * head_dim),
        "q_proj": (kv_first * group * head_dim, (kv_first + per_rank) * group * head_dim),
    }
    found = {name: (r[0], r[1]) for name, r in rows.items()}
    if found != expected or any(r[3] != world_size for r in rows.values()):
        raise HeadLayoutError(
            f"layer {module.layer_idx}: the projections' rows {found} on process {rank} of {world_size} "
            f"are not whole heads {expected} (head_dim {head_dim}, {group} query heads per KV head); "
            "TCA needs q, k and v sharded by whole KV-head groups."
        )
    return tuple(range(kv_first, kv_first + per_rank)), rank, world_size, process_group


def _owned_rows(weight: torch.Tensor) -> tuple[int, int, int, int, Any]:
    """(first row, end row, rank, world size, process group) of a projection weight (out, in) held here."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return 0, weight.shape[0], 0, 1, None
    mesh, placements = weight.device_mesh, weight.placements
    sharded = [dim for dim, placement in enumerate(placements) if not placement.is_replicate()]
    if not sharded:
        return 0, weight.shape[0], 0, 1, None
    if len(sharded) > 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
        raise UnsupportedModelError(
            f"a projection weight is placed {tuple(placements)} on mesh {mesh}; TCA supports tensor "
            "parallelism that shards q/k/v by output rows over one mesh dimension (tp_plan='auto')."
        )
    (dim,) = sharded
    rows = _local_rows(weight, mesh, placements)
    return rows[0], rows[1], mesh.get_local_rank(dim), mesh.size(dim), mesh.get_group(dim)


def _local_rows(weight: Any, mesh: Any, placements: Sequence[Any]) -> tuple[int, int]:
    """The global rows [first, end) of this process's shard, as DTensor places them."""
    # the function transformers' own sharded loading uses (torch keeps it in a private module)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    return offset[0], offset[0] + local_shape[0]
