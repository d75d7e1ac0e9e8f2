"""Fidelity of TCA prefill to dense attention on a bundled model and real prose (issue 4's check
and frontier; issue 16 on Gemma 3).

For each local window: calibrate once on the bundled calibration text, threshold the measured
retention at each tau, and compare TCA with dense attention on windows of the bundled evaluation
prose (other books than the calibration text): last-position KL, perplexity ratio over the
second half and by quarter, kept and pairs fractions (of the layers TCA manages: Gemma 3's
full-attention layers). A window starts with the BOS token when the tokenizer puts one before
every text (Gemma), as a document does.

    python benchmarks/prefill_quality.py --out R.json                       # SmolLM2, the defaults
    python benchmarks/prefill_quality.py --model gemma3-270m --lengths 8192 --out R.json
    python benchmarks/prefill_quality.py --frontier --device cuda --out R.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tca.bundled import texts
from tca.bundled.models import BUNDLED, load_model
from tca.bundled.profiles import bundled_profiles, profile_for
from tca.core.calibration import calibration_ids, profile_from_retention
from tca.core.config import TCAConfig
from tca.eval.fidelity import document_windows, evaluate_profile, score_window
from tca.eval.provenance import provenance
from tca.integrations.transformers import measure_retention, measure_retrieval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=sorted(BUNDLED), help="a bundled model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--windows", type=int, default=4, help="prose windows per length")
    parser.add_argument("--frontier", action="store_true", help="sweep local windows and taus")
    parser.add_argument("--local-windows", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--observation-queries", type=int, default=None)
    parser.add_argument("--observation-max", type=float, default=None, help="TCAConfig.observation_max")
    parser.add_argument("--continuation", type=float, default=None, help="TCAConfig.continuation")
    parser.add_argument(
        "--retrieval-thresholds",
        nargs="+",
        default=None,
        help="retrieval scores from which a head keeps every token, each a number or 'off', thresholding "
        "one calibration (default: TCAConfig's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def same_as_bundled(profile, model: str) -> bool | None:
    """Whether ``profile`` has the bundled profile's configuration and head budgets (None: none bundled)."""
    if model not in bundled_profiles():
        return None
    bundled = profile_for(model)
    return bool(
        bundled.config == profile.config
        and np.array_equal(bundled.mu, profile.mu)
        and np.array_equal(bundled.sigma, profile.sigma)
    )


def head_spread(profile, lengths):
    """min / median / max of per-head keep ratios at each length."""
    spread = {}
    for length in lengths:
        ratios = profile.keep_ratios(length)
        spread[str(length)] = {
            "min": float(ratios.min()),
            "median": float(np.median(ratios)),
            "max": float(ratios.max()),
        }
    return spread


MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)",
    "gemma3-270m": "Gemma 3 270M base (Q4_K_M GGUF, de-quantised)",
}


def retrieval_thresholds(args: argparse.Namespace, default: TCAConfig) -> list[float | None]:
    """The retrieval thresholds to threshold each calibration at (None: off)."""
    if args.retrieval_thresholds is None:
        return [default.retrieval_threshold]
    return [None if value == "off" else float(value) for value in args.retrieval_thresholds]


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    options = ("observation_queries", "observation_max", "continuation")
    overrides = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    default = TCAConfig.for_model(model, **overrides)
    configs = (
        [default]
        if not args.frontier
        else [
            default.replace(local_window=w, block_size=min(128, max(16, w // 8))) for w in args.local_windows
        ]
    )
    taus = [default.tau] if not args.frontier else args.taus
    windows = {n: document_windows(tokenizer, n, args.windows, args.seed) for n in args.lengths}
    dense = {n: [score_window(model, w) for w in tqdm(ws, desc=f"dense {n}")] for n, ws in windows.items()}
    calibration = texts.calibration_text()
    rows = []
    for config in configs:
        ids = calibration_ids(tokenizer, calibration, config, args.calibration_tokens)
        retention = measure_retention(model, ids, config)
        retrieval = measure_retrieval(model, ids, config)
        for tau, threshold in [(t, r) for t in taus for r in retrieval_thresholds(args, default)]:
            chosen = config.replace(tau=tau, retrieval_threshold=threshold)
            profile = profile_from_retention(retention, model, chosen, ids.shape[-1], calibration, retrieval)
            for length in args.lengths:
                result = evaluate_profile(model, profile, windows[length], dense[length])
                row = {
                    "local_window": config.local_window,
                    "block_size": config.block_size,
                    "tau": tau,
                    "retrieval_threshold": threshold,
                    "observation_max": config.observation_max,
                    "continuation": config.continuation,
                    "length": length,
                    **result,
                    "dense_heads": int(np.isinf(profile.mu).sum()),
                    "head_keep_ratios": head_spread(profile, [length]),
                    "is_default": chosen == default,
                    "same_as_bundled_profile": same_as_bundled(profile, args.model),
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "head_keep_ratios"}), flush=True)
    out = {
        **provenance(args.device, config={"args": vars(args), "tca": default.to_dict()}),
        "model": MODELS[args.model],
        "managed_layers": list(profile.managed_layers),
        "dtype": args.dtype,
        "texts": sorted(texts.evaluation_texts()),
        "windows_per_length": args.windows,
        "calibration_tokens": args.calibration_tokens,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
