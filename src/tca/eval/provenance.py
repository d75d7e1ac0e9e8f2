"""Where a result came from: device, versions, date and command, stored with every result file."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from typing import Any

import torch


def device_name(device: str | torch.device) -> str:
    """A human name for the device: the GPU's name, or the CPU's architecture."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: str | torch.device) -> dict[str, Any]:
    """Device, library versions, UTC date and the command line of this process."""
    import transformers

    from .. import __version__

    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tca": __version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info
