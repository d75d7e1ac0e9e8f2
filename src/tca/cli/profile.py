"""``tca profile show``: a profile's keep ratios per layer and KV head, as a table and a PNG heatmap."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import UserError, check_folder


def add_parser(commands: Any) -> None:
    profile = commands.add_parser("profile", help="inspect profiles", description="Inspect profiles.")
    profile_commands = profile.add_subparsers(dest="profile_command", metavar="COMMAND", required=True)
    show = profile_commands.add_parser(
        "show",
        help="keep ratios per layer and KV head: a table, and a PNG heatmap",
        description="Print each layer's keep ratios per KV head at a context length (min / median / max, "
        "dense heads) and optionally write a heatmap (needs matplotlib).",
    )
    show.add_argument("path", help="profile JSON")
    show.add_argument("--png", help="also write a heatmap PNG here")
    show.add_argument("--length", type=int, help="context length in tokens (default: the calibration length)")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    """Print the table (``tca.eval.profile_view``) and write the heatmap with ``--png``; exit status 0."""
    from ..core.profile import Profile
    from ..eval.profile_view import profile_heatmap, profile_table

    profile = Profile.load(args.path)
    length = args.length or profile.calibration_tokens
    if length < 1:
        raise UserError(f"--length must be >= 1, got {length}.")
    if args.png:
        check_folder(args.png, "--png")
    print(profile_table(profile, length))
    if args.png:
        try:
            profile_heatmap(profile, length, Path(args.png))
        except ModuleNotFoundError as error:
            if error.name != "matplotlib":
                raise
            raise UserError(
                "--png needs matplotlib, which is not installed: `pip install matplotlib` "
                "(or `pip install -e '.[dev]'`)."
            ) from None
        print(f"wrote {args.png}")
    return 0
