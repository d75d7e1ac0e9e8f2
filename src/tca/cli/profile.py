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
    show.add_argument(
        "path",
        nargs="?",
        default="smollm2",
        help="profile JSON, or a bundled model's name for its bundled profile (default: smollm2)",
    )
    show.add_argument("--png", help="also write a heatmap PNG here")
    show.add_argument("--length", type=int, help="context length in tokens (default: the calibration length)")
    show.set_defaults(func=run_show)


def _profile(path: str) -> tuple[Any, str]:
    """The profile at ``path`` (a file) or the bundled one of the model named ``path``, and its source."""
    from ..bundled.profiles import bundled_profile_path, bundled_profiles, profile_for
    from ..core.profile import Profile

    if path in bundled_profiles() and not Path(path).is_file():
        return profile_for(path), f"bundled {path} ({bundled_profile_path(path)})"
    return Profile.load(path), path


def run_show(args: argparse.Namespace) -> int:
    """Print the table (``tca.eval.profile_view``) and write the heatmap with ``--png``; exit status 0."""
    from ..eval.profile_view import profile_heatmap, profile_table

    profile, source = _profile(args.path)
    if args.length is not None and args.length < 1:
        raise UserError(f"--length must be >= 1, got {args.length}.")
    if args.length is None and profile.calibration_tokens < 1:
        raise UserError(
            f"{source}: its calibration_tokens is {profile.calibration_tokens} (must be >= 1): the file "
            "is damaged; pass --length N, or calibrate again with `tca calibrate`."
        )
    length = args.length or profile.calibration_tokens
    print(f"profile: {source}")
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
