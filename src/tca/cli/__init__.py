"""The ``tca`` command: a thin layer over the library.

    tca generate                     answer a question about a long document with TCA
    tca calibrate --out P.json       calibrate a model -> a profile
    tca profile show P.json          keep ratios per layer and KV head (table, PNG heatmap)
    tca eval --out R.jsonl           every method on a long-context task suite (resumable)
    tca doctor                       versions, devices, backend, cache and bundled files (alias: info)

One module per command (``generate``, ``calibrate``, ``profile``, ``evaluate``, ``doctor``), each with its
``add_parser`` and its ``run``; ``common`` holds what they share. Errors a user can cause are
printed as one line, ``tca: error: ...``, with exit status 2. Heavy imports (torch,
transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..eval.profile_view import profile_heatmap, profile_table  # re-exported: `from tca.cli import ...`
from . import calibrate, doctor, evaluate, generate, profile
from .common import UserError

__all__ = ["UserError", "build_parser", "main", "profile_heatmap", "profile_table"]

# the commands' names when the CLI was one module, kept for one release
cmd_generate = generate.run
cmd_calibrate = calibrate.run
cmd_profile_show = profile.run_show
cmd_eval = evaluate.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tca",
        description="TCA-Attention: sparse attention and a smaller KV cache for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"tca-attention {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (generate, calibrate, profile, evaluate, doctor):
        command.add_parser(commands)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    message = str(error) or type(error).__name__
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tca`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone prints; errors print on every rank
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except (UserError, ValueError, ModuleNotFoundError, OSError) as error:
        # ValueError covers ProfileError, UnsupportedModelError, ContextTooLongError, bad configs
        print(f"tca: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tca: interrupted", file=sys.stderr)
        return 130
