"""``tca calibrate``: one forward pass over a calibration text -> a profile JSON."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ..core.config import TCAConfig
from .common import UserError, add_model_options, check_model, check_writable, load, read_text


def add_parser(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="calibrate per-head budgets for a model -> a profile JSON",
        description="One forward pass over a calibration text; writes the profile that `tca generate "
        "--profile` and tca.apply use. Defaults: TCAConfig.for_model(model), tau 0.9, the bundled text.",
    )
    add_model_options(calibrate)
    calibrate.add_argument("--text", help="UTF-8 calibration text (default: the bundled one)")
    calibrate.add_argument("--tau", type=float, help="retained attention threshold in (0, 1] (default: 0.9)")
    calibrate.add_argument("--window", type=int, help="local window in tokens (default: per model)")
    calibrate.add_argument("--block", type=int, help="block size in tokens (default: per model)")
    calibrate.add_argument("--alpha", type=float, help="redundancy weight in [0, 1] (default: 0.5)")
    calibrate.add_argument(
        "--observation-max",
        type=float,
        help="weight in [0, 1] of the strongest observation query in importance (default: 0, the mean)",
    )
    calibrate.add_argument(
        "--continuation",
        type=float,
        help="in [0, 1): importance held forward with this decay, so a value ranks with its key (default: 0)",
    )
    calibrate.add_argument(
        "--retrieval-threshold",
        help="retrieval score from which a head keeps every token, in (0, 1], or 'off' (default: 0.03)",
    )
    calibrate.add_argument(
        "--max-tokens", type=int, default=4096, help="text truncated to this (default: 4096)"
    )
    calibrate.add_argument(
        "--out", default="profile.tca.json", help="where to write (default: profile.tca.json)"
    )
    calibrate.set_defaults(func=run)


def config_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The TCAConfig fields the command line sets (the others keep the model's defaults)."""
    changes = {"tau": args.tau, "local_window": args.window, "block_size": args.block, "alpha": args.alpha}
    changes |= {"observation_max": args.observation_max, "continuation": args.continuation}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.retrieval_threshold == "off":
        changes["retrieval_threshold"] = None
    elif args.retrieval_threshold is not None:
        try:
            changes["retrieval_threshold"] = float(args.retrieval_threshold)
        except ValueError:
            raise UserError(
                f"--retrieval-threshold {args.retrieval_threshold}: expected a number in (0, 1] or 'off'."
            ) from None
    try:  # each field is checked on its own: a bad value is refused before the model loads
        TCAConfig(**changes)
    except ValueError as error:
        raise UserError(str(error)) from None
    return changes


def check_max_tokens(max_tokens: int, config: Any) -> None:
    """A UserError when ``--max-tokens`` is below what ``config`` needs (window + 4 blocks)."""
    needed = config.effective_window + 4 * config.block_size
    if max_tokens < needed:
        raise UserError(
            f"--max-tokens {max_tokens} is too small for this configuration: it needs at least {needed} "
            f"tokens (local window {config.local_window} + 4 blocks of {config.block_size}); raise "
            "--max-tokens or lower --window / --block."
        )


def run(args: argparse.Namespace) -> int:
    """Calibrate, write the profile, and print its shape and mean keep ratio; exit status 0."""
    from ..eval.profile_view import retrieval_note
    from ..integrations.transformers import calibrate

    text = None if args.text is None else read_text(args.text, "--text")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    changes = config_changes(args)
    out = check_writable(args.out, "--out")
    check_model(args.model)
    model, tokenizer = load(args)
    config = TCAConfig.for_model(model).replace(**changes)
    check_max_tokens(args.max_tokens, config)
    start = time.perf_counter()
    profile = calibrate(model, tokenizer, text=text, config=config, max_tokens=args.max_tokens)
    seconds = time.perf_counter() - start
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank holds the same profile: one writes
        profile.save(out)
    shape = profile.mu.shape
    ratio = profile.keep_ratios(profile.calibration_tokens)
    print(
        f"wrote {out}: {shape[0]} managed layers x {shape[1]} KV heads, tau {config.tau}, "
        f"window {config.local_window}, block {config.block_size}, "
        f"{profile.calibration_tokens:,} calibration tokens, {seconds:.1f} s"
    )
    print(
        f"mean keep ratio at {profile.calibration_tokens:,} tokens: {ratio.mean():.3f}; "
        f"dense heads: {int((profile.mu == float('inf')).sum())}" + retrieval_note(profile)
    )
    return 0
