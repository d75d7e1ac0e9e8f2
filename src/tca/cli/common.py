"""What every ``tca`` command shares: the user-error type, model options and loading, text files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
MIB = 1024 * 1024


class UserError(Exception):
    """A mistake in the command line or its inputs, reported as one line."""


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu.")
    return device


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from ``--model``, ``--device`` and ``--dtype``."""
    from ..bundled.models import load_model

    check_model(args.model)
    device = check_device(args.device)
    return load_model(args.model, dtype=torch_dtype(args.dtype), device=device)


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of file ``path`` (option ``what``); a missing or binary file is a UserError."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {path}: no such file.")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text.") from None


def check_folder(path: str, option: str) -> Path:
    """``path`` as a Path whose folder exists (a UserError naming ``option`` otherwise)."""
    out = Path(path)
    if not out.parent.is_dir():
        raise UserError(f"{option} {path}: the folder {out.parent} does not exist.")
    return out


def check_writable(path: str, option: str) -> Path:
    """``path`` as a Path that can be written (folder exists, not a folder, writable), checked by
    creating and removing a file beside it, so a long run never ends failing to write its result."""
    out = check_folder(path, option)
    if out.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a file name, e.g. {out / 'profile.tca.json'}.")
    probe = out.with_name(f".{out.name}.probe{os.getpid()}")
    try:
        probe.open("w").close()
    except OSError as error:
        raise UserError(
            f"{option} {path}: cannot write there ({error.strerror}); pass a writable path."
        ) from None
    probe.unlink()
    return out


def check_model(name: str) -> None:
    """A UserError when ``--model`` is neither a bundled model nor a local folder."""
    from ..bundled.models import BUNDLED

    if name not in BUNDLED and not Path(name).is_dir():
        raise UserError(
            f"--model {name}: no such model; pass one of {', '.join(sorted(BUNDLED))} (bundled) or the "
            "folder of a local Hugging Face checkpoint (config.json and weights)."
        )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' or 'gemma3-270m' (bundled) or a local HF checkpoint directory",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype")
