"""Host values to the device without making the host wait for the device."""

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
