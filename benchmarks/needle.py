"""Needle-in-a-haystack on real prose with a bundled model: dense vs TCA on the same prompts (issue 5's
check; issue 16's on Gemma 3).

Tasks: a single needle, three needles asked for one, and a needle given in turn 1 of a chat and
asked for in turn 2 (the TCA cache re-selects from its host history at turn 2); the samples are
made by the task suite's needle code (``tca.eval.needle``), a length is the context in tokens.
Reports, per task and length, how many answers are right with each, and the KV bytes the TCA
cache held against a dense cache for the same tokens.

    python benchmarks/needle.py --profile PATH --out benchmarks/results/needle-cpu.json
    python benchmarks/needle.py --model gemma3-270m --profile src/tca/data/profiles/gemma3-270m.json \
        --lengths 8192 16384 32768 --device cuda --dtype bfloat16 --out R.json

Gemma 3 270M is a base model: it is asked through the plain template ``tca.load_model`` gives it
(the document, the question, "Answer:").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tca.bundled.models import BUNDLED, load_model
from tca.core.profile import Profile
from tca.eval.chat import ask, ask_two_turns
from tca.eval.needle import TASKS, make_sample, score
from tca.eval.provenance import provenance
from tca.integrations.transformers import apply


def run_sample(model, tokenizer, sample, profile: Profile | None) -> dict:
    """Answer one sample, dense (profile None) or with TCA; returns the answer, score and KV bytes."""
    started = time.perf_counter()
    stats = None
    if profile is None:
        answer = _answer(model, tokenizer, sample, None)
    else:
        with apply(model, profile) as run:
            answer = _answer(model, tokenizer, sample, run)
        stats = run.stats
    row = {"answer": answer, "score": score(sample, answer), "seconds": time.perf_counter() - started}
    if stats is not None:
        row.update(
            kv_bytes=stats.kv_bytes,
            dense_kv_bytes=stats.dense_kv_bytes,
            host_kv_bytes=stats.host_kv_bytes,
            kept_fraction=stats.kept_fraction,
        )
    return row


def _answer(model, tokenizer, sample, run) -> str:
    if sample.task == "two_turn":
        cache = run.new_cache() if run is not None else None
        return ask_two_turns(
            model, tokenizer, sample.document, sample.first_turn, sample.question, cache=cache
        )[1]
    return ask(model, tokenizer, sample.document, sample.question)


def build_parser() -> argparse.ArgumentParser:
    """The command line (a committed result's ``command`` parses with it)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=sorted(BUNDLED), help="a bundled model")
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--samples", type=int, default=3, help="samples per task and length")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="when calibrating here: TCAConfig fields to change, e.g. tau=0.95 pool_kernel=7",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if not args.profile.exists():  # calibrate with the defaults, as `tca calibrate` does
        from tca.core.config import TCAConfig
        from tca.integrations.transformers import calibrate

        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        calibrate(model, tokenizer, config=TCAConfig.for_model(model, **overrides)).save(args.profile)
    profile = Profile.load(args.profile)
    rows = []
    jobs = [(t, n, s) for t in args.tasks for n in args.lengths for s in range(args.samples)]
    for task, length, seed in tqdm(jobs, desc="needles"):
        sample = make_sample(tokenizer, task, length, seed)
        row = {
            "task": task,
            "length": length,
            "seed": seed,
            "text": sample.book,
            "expected": sample.answer,
            "depths": sample.depths,
            "dense": run_sample(model, tokenizer, sample, None),
            "tca": run_sample(model, tokenizer, sample, profile),
        }
        rows.append(row)
        print(
            json.dumps(
                {k: row[k] for k in ("task", "length", "seed", "expected")}
                | {
                    "dense": row["dense"]["score"],
                    "tca": row["tca"]["score"],
                    "kv_ratio": row["tca"]["kv_bytes"] / max(row["tca"]["dense_kv_bytes"], 1),
                }
            ),
            flush=True,
        )
    summary = {}
    for task in args.tasks:
        for length in args.lengths:
            part = [r for r in rows if r["task"] == task and r["length"] == length]
            summary[f"{task}@{length}"] = {
                "dense_correct": sum(r["dense"]["score"] > 0 for r in part),
                "tca_correct": sum(r["tca"]["score"] > 0 for r in part),
                "tca_misses_where_dense_right": sum(r["dense"]["score"] > r["tca"]["score"] for r in part),
                "samples": len(part),
                "kv_ratio_max": max(r["tca"]["kv_bytes"] / r["tca"]["dense_kv_bytes"] for r in part),
            }
    out = {
        **provenance(args.device, config={"args": vars(args), "tca": profile.config.to_dict()}),
        "model": {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M base"}[args.model],
        "dtype": args.dtype,
        "profile": str(args.profile),
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
