"""Values between host and device with as few waits for the device as can be."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch

# Small pinned tensors are carved from slabs of this size: pinning memory (cudaHostAlloc) costs the
# host tens to hundreds of microseconds a call, whatever the size, and a new turn pins dozens of
# small pieces (every layer's new tokens) that live as long as the conversation, so PyTorch's
# caching host allocator has no freed block to give them.
SLAB_BYTES = 8 * 2**20
_ALIGN = 256  # bytes: every carved tensor starts at a multiple (any dtype's alignment, and a DMA's)
# How PyTorch pins host memory once TCA pins its first block, unless the process has pinned some
# already or PYTORCH_CUDA_ALLOC_CONF names a pinned_ option: pages allocated, then registered with
# the driver by several threads (cudaHostRegister), instead of one cudaHostAlloc a block; on an
# H200 host 5.9 GiB/s instead of 1.4 (benchmarks/probes/pinned_alloc.py), which a first prompt's
# host history pays (8 GiB a 64K prompt of an 8B model).
FAST_PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
_pinning = {"decided": False, "fast": False}


def pin_faster() -> bool:
    """Switch PyTorch to ``FAST_PINNING`` where that is safe; returns whether it is in force.

    Safe only before the process's first pinned block: PyTorch frees a block the way the setting in
    force then says, so a block pinned by ``cudaHostAlloc`` before the switch would be freed wrongly.
    Decided once per process; a user's own ``pinned_`` setting always wins (set
    ``PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:False`` to keep PyTorch's default)."""
    if _pinning["decided"]:
        return _pinning["fast"]
    _pinning["decided"] = True
    if "pinned_" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") or not torch.cuda.is_available():
        return False
    stats = torch.cuda.host_memory_stats()
    if stats.get("num_host_alloc", 1) != 0:  # something was pinned already (or the count is unknown)
        return False
    setting = FAST_PINNING.format(threads=max(1, min(8, os.cpu_count() or 1)))
    apply_setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if apply_setting is None:
        apply_setting = torch.cuda.memory._set_allocator_settings
    apply_setting(setting)
    _pinning["fast"] = True
    return True


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
        pin_faster()
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
