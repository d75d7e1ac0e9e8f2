"""``tca eval``: every method on the long-context task suite, one JSON line per sample (resumable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import add_model_options, check_folder, load


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
    evaluate.add_argument("--calibration", default=default.calibration, choices=CALIBRATIONS)
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


def run(args: argparse.Namespace) -> int:
    """Run the suite into ``--out`` (printing each row), then ``--plots``; exit status 0."""
    from ..eval.plots import write_all
    from ..eval.provenance import eval_config, provenance
    from ..eval.runner import Evaluator

    spec = spec_of(args)
    out = check_folder(args.out, "--out")
    model, tokenizer = load(args)
    with out.with_name(out.name + ".runs.jsonl").open("a") as log:  # who ran what, where: one line per run
        record = provenance(args.device, eval_config(spec, model)) | {
            "model": args.model,
            "dtype": args.dtype,
        }
        log.write(json.dumps(record) + "\n")
    for row in Evaluator(model, tokenizer, spec).run(out):
        shown = {k: row[k] for k in ("setting", "task", "length", "seed", "score", "kv_fraction")}
        print(json.dumps(shown), flush=True)
    if args.plots:
        for path in write_all(out, Path(args.plots)):
            print(f"wrote {path}")
    return 0
