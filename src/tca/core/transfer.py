"""Values between host and device with as few waits for the device as can be."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host ``array`` as a ``dtype`` tensor on ``device``; on CUDA through pinned memory without
    blocking, so the host does not wait for the work already queued (a plain copy would)."""
    tensor = torch.as_tensor(np.asarray(array), dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def host_ints(tensor: torch.Tensor) -> tuple[int, ...]:
    """A small integer tensor's values on the host, read from the device once per tensor object and
    kept on it (a prefill's padding, ``key_start``, is read by every layer: one synchronisation, not
    one per layer). For tensors that are never written after they are made."""
    values = getattr(tensor, "_tca_host_ints", None)
    if values is None:
        values = tuple(int(v) for v in tensor.tolist())
        tensor._tca_host_ints = values
    return values
