"""``tca eval``: every method on the long-context task suite, one JSON line per sample (resumable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import UserError, add_model_options, check_folder, check_model, load


def add_parser(commands: Any) -> None:
    from ..eval.spec import ALL_METHODS, CALIBRATIONS, EvalSpec  # light: no torch

    default = EvalSpec()
    evaluate = commands.add_parser(
        "eval",
        help="every method on a long-context task suite (JSON lines, resumable)",
        description="Answer seeded long-context tasks (RULER-style) and score perplexity under full "
        "attention, TCA at each tau and each baseline at each kept fraction, on the same prompts. One "
        "JSON line per sample is appended to --out as it goes; run the same command again to resume.",
    )
    add_model_options(evaluate)
    evaluate.add_argument(
        "--methods", nargs="+", default=default.methods, help=f"from: {' '.join(ALL_METHODS)}"
    )
    evaluate.add_argument(
        "--tasks", nargs="+", default=default.tasks, help="default: all tasks and perplexity"
    )
    evaluate.add_argument("--lengths", nargs="+", type=int, default=default.lengths)
    evaluate.add_argument("--samples", type=int, default=default.samples, help="samples per task and length")
    evaluate.add_argument("--kept-fractions", nargs="+", type=float, default=default.kept_fractions)
    evaluate.add_argument("--taus", nargs="+", type=float, default=default.taus, help="TCA thresholds")
    evaluate.add_argument(
        "--settings",
        nargs="+",
        help="run exactly these settings, in order (e.g. full tca@tau0.9 snapkv@0.3) instead of "
        "--methods x --taus x --kept-fractions; a tca setting may change TCAConfig fields: "
        "tca@tau0.9,local_window=256,retrieval_threshold=off",
    )
    evaluate.add_argument("--seed", type=int, default=default.seed, help="first sample seed")
    evaluate.add_argument(
        "--batch-size", type=int, default=default.batch_size, help="samples per batch (tasks mixed)"
    )
    evaluate.add_argument(
        "--batch-tokens", type=int, help="also cap each batch at this many prompt tokens (e.g. 262144)"
    )
    evaluate.add_argument(
        "--profile",
        help="profile JSON to reuse for the tca setting whose tau and options it was made with "
        "(default: the model's bundled profile where it fits; any other tca setting is calibrated)",
    )
    evaluate.add_argument(
        "--calibration", default=default.calibration, choices=CALIBRATIONS, help="text kind to calibrate on"
    )
    evaluate.add_argument("--out", required=True, help="JSON lines file (appended to; resumed)")
    evaluate.add_argument("--plots", help="folder for the summary, table and plots after the run")
    evaluate.set_defaults(func=run)


def spec_of(args: argparse.Namespace) -> Any:
    """The checked ``EvalSpec`` of the command line."""
    from ..eval.spec import EvalSpec

    spec = EvalSpec(
        methods=args.methods,
        tasks=args.tasks,
        lengths=args.lengths,
        samples=args.samples,
        kept_fractions=args.kept_fractions,
        taus=args.taus,
        seed=args.seed,
        batch_size=args.batch_size,
        batch_tokens=args.batch_tokens,
        only=args.settings,
        calibration=args.calibration,
    )
    spec.check()
    return spec


def check_out(path: str) -> Path:
    """``--out`` as a Path: its folder exists and it is not itself a folder (checked before any work)."""
    out = check_folder(path, "--out")
    if out.is_dir():
        raise UserError(f"--out {path} is a folder; pass a file name such as {out / 'results.jsonl'}.")
    return out


def reusable_profiles(args: argparse.Namespace, spec: Any, model: Any) -> list[tuple[Any, str]]:
    """``(profile, source)`` pairs the run may reuse: ``--profile``, or the bundled model's profile
    when it was calibrated as this run would calibrate (same text kind and token count)."""
    from ..bundled.profiles import bundled_profile_path, bundled_profiles, profile_for
    from ..core.profile import Profile

    if args.profile:
        profile = Profile.load(args.profile)
        profile.check_fits(model)
        return [(profile, args.profile)]
    if args.model in bundled_profiles() and spec.calibration == "prose":
        profile = profile_for(args.model)
        if profile.calibration_tokens == spec.calibration_tokens:
            return [(profile, f"bundled {args.model} ({bundled_profile_path(args.model)})")]
    return []


def say_profiles(evaluator: Any, spec: Any, given: str | None) -> dict[str, str]:
    """Print, per tca setting, the profile it reuses or that it is calibrated; returns them by setting."""
    sources = {}
    for setting in spec.settings():
        if setting.method != "tca":
            continue
        fitting = evaluator.reused(setting.tau, setting.options)
        if fitting is None:
            sources[setting.key] = f"calibrated on the bundled {spec.calibration} text"
            sources[setting.key] += f" ({spec.calibration_tokens} tokens)"
        else:
            sources[setting.key] = f"profile {fitting[1]}"
        print(f"{setting.key}: {sources[setting.key]}", flush=True)
    if given and not any(s.startswith("profile ") for s in sources.values()):
        config = evaluator.given[0][0].config
        print(
            f"note: --profile {given} (tau {config.tau:g}, window {config.local_window}, block "
            f"{config.block_size}) fits no tca setting of this run; pass --settings with its tau and options."
        )
    return sources


def print_summary(out: Path, spec: Any) -> None:
    """The results table of this run's settings, tasks and lengths, from every row in ``out``."""
    from ..eval.rows import load_rows
    from ..eval.summary import results_table, summarize

    keys = {setting.key for setting in spec.settings()}
    rows = [
        row
        for row in load_rows(out)
        if row["setting"] in keys and row["task"] in spec.tasks and row["length"] in spec.lengths
    ]
    if not rows:
        return
    print(f"\nsummary of {out} (score: mean over tasks; KV: fraction of the dense KV cache kept):")
    print(results_table(summarize(rows), spec.lengths), end="")


def run(args: argparse.Namespace) -> int:
    """Run the suite into ``--out`` (printing each row and a summary), then ``--plots``; exit status 0."""
    from ..eval.plots import write_all
    from ..eval.provenance import eval_config, provenance
    from ..eval.rows import exclusive
    from ..eval.runner import Evaluator

    spec = spec_of(args)
    check_model(args.model)
    out = check_out(args.out)
    with exclusive(out):
        model, tokenizer = load(args)
        evaluator = Evaluator(model, tokenizer, spec, profiles=reusable_profiles(args, spec, model))
        sources = say_profiles(evaluator, spec, args.profile)
        pending = evaluator.pending(out)
        if pending == 0:
            print(f"nothing left to do: every sample of this run is already in {out}")
        else:
            with out.with_name(out.name + ".runs.jsonl").open("a") as log:  # who ran what: a line per run
                record = provenance(args.device, eval_config(spec, model)) | {
                    "model": args.model,
                    "dtype": args.dtype,
                    "profiles": sources,
                    "samples": pending,
                }
                log.write(json.dumps(record) + "\n")
            for row in evaluator.run(out):
                shown = {k: row[k] for k in ("setting", "task", "length", "seed", "score", "kv_fraction")}
                print(json.dumps(shown), flush=True)
    print_summary(out, spec)
    if args.plots:
        for path in write_all(out, Path(args.plots)):
            print(f"wrote {path}")
    return 0
