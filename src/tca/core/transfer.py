"""Values between host and device with as few waits for the device as can be."""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

# Small pinned tensors are carved from slabs of this size. A new turn pins dozens of small pieces
# (every layer's new tokens) that live as long as the conversation, so PyTorch's caching host
# allocator seldom has a freed block for them, and each cudaHostAlloc costs a fixed part besides
# its bytes (H200 host, 32K turn: 131 calls took 13.9 ms, 2 slabs 8.6 ms; next-turn-5919cf3 log).
SLAB_BYTES = 8 * 2**20
_ALIGN = 256  # bytes: every carved tensor starts at a multiple (any dtype's alignment, and a DMA's)


class PinnedSlabs:
    """Pinned host tensors of at most ``SLAB_BYTES // 4`` carved one after another from shared pinned
    slabs (one ``cudaHostAlloc`` a slab, not one a tensor); larger ones are pinned on their own.

    A carved tensor is a view of its slab: the slab goes back to PyTorch's caching host allocator when
    its last view is gone, and that allocator waits for the copies recorded on any of its views
    before it hands the slab out again. Nothing is ever carved twice from the same bytes.
    """

    def __init__(self, slab_bytes: int = SLAB_BYTES):
        self.slab_bytes = slab_bytes
        self.slab: torch.Tensor | None = None  # (slab_bytes,) uint8, pinned
        self.used = 0
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous pinned tensor of ``shape`` and ``dtype``."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.slab_bytes // 4:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        with self.lock:
            start = -(-self.used // _ALIGN) * _ALIGN
            if self.slab is None or start + nbytes > self.slab_bytes:
                self.slab, start = torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=True), 0
            self.used = start + nbytes
            return self.slab[start : start + nbytes].view(dtype).view(shape)


PINNED = PinnedSlabs()


def to_device(array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host ``array`` as a ``dtype`` tensor on ``device``; on CUDA through pinned memory without
    blocking, so the host does not wait for the work already queued (a plain copy would)."""
    tensor = torch.as_tensor(np.asarray(array), dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    pinned = PINNED.empty(tuple(tensor.shape), dtype)
    pinned.copy_(tensor)
    return pinned.to(device, non_blocking=True)


def is_pinned(tensor: torch.Tensor) -> bool:
    """``tensor.is_pinned()`` (a driver call), asked once per tensor object and kept on it: a host
    history's pieces are asked by every layer of every turn."""
    pinned = getattr(tensor, "_tca_pinned", None)
    if pinned is None:
        pinned = tensor._tca_pinned = tensor.is_pinned()
    return pinned


def host_ints(tensor: torch.Tensor) -> tuple[int, ...]:
    """A small integer tensor's values on the host, read from the device once per tensor object and
    kept on it (a prefill's padding, ``key_start``, is read by every layer: one synchronisation, not
    one per layer). For tensors that are never written after they are made."""
    values = getattr(tensor, "_tca_host_ints", None)
    if values is None:
        values = tuple(int(v) for v in tensor.tolist())
        tensor._tca_host_ints = values
    return values
