"""How much do TCA's per-head budgets depend on the calibration text? (left open by the paper)

Calibrates SmolLM2 three times with the default configuration, on the first 4096 tokens of three
kinds of text: prose (the bundled calibration novel), docs (the Python tutorial) and code
(CPython's _pyio.py). It then compares the three profiles:

1. per (layer, KV head) keep ratios at each ``--ratio-lengths``: means, pairwise mean absolute
   difference and Pearson correlation, dense and retrieval heads and the Jaccard overlap of those
   sets between profiles; and the cross-retention matrix (each profile's chosen budgets scored on
   every calibration text's measured attention: does a budget fitted on prose still keep tau on code?);
2. each profile's fidelity to dense attention on the same held-out windows of evaluation prose
   (never a calibration text): last-position KL, perplexity ratio over the second half, kept fraction;
3. a JSON (with provenance) and a PNG beside it: keep-ratio heatmaps and per-head scatter plots.

Each calibration is exactly ``tca.calibrate`` (the same three steps), with the per-layer retention
kept for the cross-retention matrix.

    python benchmarks/calibration_sensitivity.py --lengths 2048 --windows 3 \
        --out benchmarks/results/calibration-sensitivity-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tca.bundled import texts
from tca.bundled.models import load_model
from tca.core.budgets import candidate_grid
from tca.core.calibration import calibration_ids, profile_from_retention
from tca.core.config import TCAConfig
from tca.eval.fidelity import evaluate_profile, prose_windows, score_window
from tca.eval.provenance import provenance
from tca.integrations.transformers import measure_retention, measure_retrieval

KINDS = ("prose", "docs", "code")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048], help="fidelity window lengths")
    parser.add_argument("--windows", type=int, default=3, help="evaluation-prose windows per length")
    parser.add_argument(
        "--ratio-lengths", type=int, nargs="+", default=[2048, 4096], help="lengths for keep ratios"
    )
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/calibration-sensitivity-cpu.json")
    )
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


# ---------------------------------------------------------------------------------------------- texts


def only_text(kind: str) -> tuple[str, str]:
    """(file name, text) of the single bundled evaluation text of ``kind``; several is an error."""
    found = texts.evaluation_texts(kind)
    if len(found) != 1:
        raise ValueError(f"expected one bundled {kind!r} text, found {sorted(found)}")
    return next(iter(found.items()))


def calibration_sources() -> dict[str, tuple[str, str]]:
    """Per kind, (file name, text) to calibrate on: the default prose and the docs and code texts."""
    prose = next(e["file"] for e in texts.manifest() if e["role"] == "calibration")
    return {"prose": (prose, texts.calibration_text()), "docs": only_text("docs"), "code": only_text("code")}


# ---------------------------------------------------------------------------------------------- calibration


def calibrate_keeping_retention(model, tokenizer, text: str, config: TCAConfig, max_tokens: int):
    """``tca.calibrate`` step by step; returns (profile, per-layer retention, tokens, seconds)."""
    start = time.perf_counter()
    ids = calibration_ids(tokenizer, text, config, max_tokens)
    retention = measure_retention(model, ids, config)
    retrieval = measure_retrieval(model, ids, config)
    profile = profile_from_retention(retention, model, config, ids.shape[-1], text, retrieval)
    return profile, retention, int(ids.shape[-1]), time.perf_counter() - start


def candidate_indices(profile, grid: list[tuple[float, float]]) -> np.ndarray:
    """(n_layers, G) index into ``grid`` of each head's configuration; -1 for a dense head."""
    index = {pair: i for i, pair in enumerate(grid)}
    return np.array(
        [
            [-1 if math.isinf(mu) else index[(mu, sigma)] for mu, sigma in zip(mus, sigmas, strict=True)]
            for mus, sigmas in zip(profile.mu, profile.sigma, strict=True)
        ]
    )


def cross_retained(profile, retention, grid: list[tuple[float, float]]) -> np.ndarray:
    """(n_layers, G) retained mass of ``profile``'s budgets on the text ``retention`` was measured on.

    A dense head retains everything (1.0).
    """
    chosen = candidate_indices(profile, grid)
    out = np.ones(chosen.shape)
    for layer, stats in enumerate(retention):
        for head, choice in enumerate(chosen[layer]):
            if choice >= 0:
                out[layer, head] = float(stats.retained[choice, head])
    return out


def cross_retention_matrix(profiles: dict, retentions: dict, config: TCAConfig) -> dict:
    """For each (profile, text): mean and min retained mass over heads and heads below tau."""
    grid = candidate_grid(config.candidates)
    matrix = {}
    for name, profile in profiles.items():
        matrix[name] = {}
        for text_kind, retention in retentions.items():
            retained = cross_retained(profile, retention, grid)
            matrix[name][text_kind] = {
                "mean": float(retained.mean()),
                "min": float(retained.min()),
                "heads_below_tau": int((retained < config.tau - 1e-6).sum()),
            }
    return matrix


# ---------------------------------------------------------------------------------------------- comparison


def head_sets(profile, config: TCAConfig) -> dict[str, np.ndarray]:
    """Boolean (n_layers, G) masks: dense heads, retrieval heads, and dense heads that are not retrieval."""
    dense = np.isinf(profile.mu)
    retrieval = (
        np.zeros_like(dense)
        if profile.retrieval is None or config.retrieval_threshold is None
        else profile.retrieval >= config.retrieval_threshold
    )
    return {"dense": dense, "retrieval": retrieval, "dense_not_retrieval": dense & ~retrieval}


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two flattened arrays; None when either is constant or too short."""
    a, b = np.ravel(a).astype(float), np.ravel(b).astype(float)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    """|A and B| / |A or B| of two boolean masks; None when both are empty."""
    union = int((a | b).sum())
    return None if union == 0 else float((a & b).sum() / union)


def profile_summary(profile, config: TCAConfig, lengths: list[int]) -> dict:
    """Mean/min/median keep ratio per length, head-set counts and the per-head arrays."""
    sets = head_sets(profile, config)
    ratios = {str(n): profile.keep_ratios(n) for n in lengths}
    return {
        "keep_ratio": {
            n: {"mean": float(r.mean()), "median": float(np.median(r)), "min": float(r.min())}
            for n, r in ratios.items()
        },
        "dense_heads": int(sets["dense"].sum()),
        "retrieval_heads": int(sets["retrieval"].sum()),
        "dense_not_retrieval_heads": int(sets["dense_not_retrieval"].sum()),
        "retained_mean": float(profile.retained.mean()),
        "heads": {
            "keep_ratio": {n: r.tolist() for n, r in ratios.items()},
            "mu": [[None if math.isinf(m) else float(m) for m in row] for row in profile.mu],
            "sigma": profile.sigma.tolist(),
            "retrieval": None if profile.retrieval is None else profile.retrieval.tolist(),
        },
    }


def pair_comparison(a, b, config: TCAConfig, lengths: list[int]) -> dict:
    """Agreement of two profiles: keep-ratio differences and correlations, head-set overlaps."""
    sets_a, sets_b = head_sets(a, config), head_sets(b, config)
    sparse_both = ~sets_a["dense"] & ~sets_b["dense"]
    out = {}
    for n in lengths:
        ra, rb = a.keep_ratios(n), b.keep_ratios(n)
        out[str(n)] = {
            "mean_abs_diff": float(np.abs(ra - rb).mean()),
            "max_abs_diff": float(np.abs(ra - rb).max()),
            "pearson": pearson(ra, rb),
            "pearson_sparse_in_both": pearson(ra[sparse_both], rb[sparse_both]),
        }
    return {
        "keep_ratio": out,
        "heads_sparse_in_both": int(sparse_both.sum()),
        "retrieval_jaccard": jaccard(sets_a["retrieval"], sets_b["retrieval"]),
        "dense_jaccard": jaccard(sets_a["dense"], sets_b["dense"]),
        "retrieval_score_pearson": None if a.retrieval is None else pearson(a.retrieval, b.retrieval),
        "same_configuration_heads": int(((a.mu == b.mu) & (a.sigma == b.sigma)).sum()),
    }


# ---------------------------------------------------------------------------------------------- fidelity


def fidelity(model, tokenizer, profiles: dict, lengths: list[int], count: int, seed: int) -> dict:
    """Per length: each profile's ``evaluate_profile`` on the same evaluation-prose windows."""
    prose = texts.evaluation_texts("prose")
    results = {}
    for length in lengths:
        windows = prose_windows(tokenizer, prose, length, count, seed)
        dense = [score_window(model, w) for w in tqdm(windows, desc=f"dense {length}")]
        results[str(length)] = {}
        for name, profile in profiles.items():
            start = time.perf_counter()
            row = evaluate_profile(model, profile, windows, dense)
            row["seconds"] = time.perf_counter() - start
            results[str(length)][name] = row
            print(json.dumps({"length": length, "profile": name, **row}), flush=True)
    return results


# ---------------------------------------------------------------------------------------------- figure


def draw_heatmaps(fig, axes, profiles: dict, length: int) -> None:
    """One layer x KV-head keep-ratio heatmap per profile, on a shared colour scale with one colour bar."""
    ratios = {name: p.keep_ratios(length) for name, p in profiles.items()}
    low = min(float(r.min()) for r in ratios.values())
    image = None
    for i, (ax, (name, grid)) in enumerate(zip(axes, ratios.items(), strict=True)):
        image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name} ({grid.mean():.3f} mean)", fontsize=10)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("KV head")
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label=f"keep ratio at {length} tokens", shrink=0.9)


def draw_scatter(ax, profiles: dict, length: int) -> None:
    """Per-head keep ratios of docs and code against prose, with the diagonal for reference."""
    base = profiles["prose"].keep_ratios(length).ravel()
    for name, marker in (("docs", "o"), ("code", "^")):
        other = profiles[name].keep_ratios(length).ravel()
        r = pearson(base, other)
        label = f"{name} (r={r:.2f})" if r is not None else name
        ax.scatter(base, other, s=18, alpha=0.6, marker=marker, label=label)
    low = min(float(base.min()), 0.2)
    ax.plot([low, 1], [low, 1], color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("keep ratio, prose profile")
    ax.set_ylabel("keep ratio, other profile")
    ax.set_title(f"per head, {length} tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot(profiles: dict, length: int, out_png: Path) -> None:
    """Three keep-ratio heatmaps side by side and a prose-vs-other scatter, written to ``out_png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 6), layout="constrained")
    FigureCanvasAgg(fig)
    heat_fig, scatter_fig = fig.subfigures(1, 2, width_ratios=[2.2, 1])
    draw_heatmaps(heat_fig, heat_fig.subplots(1, len(profiles), sharey=True), profiles, length)
    draw_scatter(scatter_fig.subplots(), profiles, length)
    fig.suptitle("SmolLM2 TCA budgets calibrated on prose, docs and code (dense head = 1)")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model("smollm2", dtype=getattr(torch, args.dtype), device=args.device)
    config = TCAConfig.for_model(model)
    profiles, retentions, calibration = {}, {}, {}
    for kind, (file, text) in calibration_sources().items():
        profile, retention, tokens, seconds = calibrate_keeping_retention(
            model, tokenizer, text, config, args.calibration_tokens
        )
        profiles[kind], retentions[kind] = profile, retention
        calibration[kind] = {
            "file": file,
            "tokens": tokens,
            "sha256": profile.text_sha256,
            "seconds": seconds,
        }
        print(f"calibrated on {kind} ({file}, {tokens} tokens) in {seconds:.0f} s", flush=True)
    ratio_lengths = sorted(set(args.ratio_lengths))
    summaries = {k: profile_summary(p, config, ratio_lengths) for k, p in profiles.items()}
    pairs = {
        f"{a}-{b}": pair_comparison(profiles[a], profiles[b], config, ratio_lengths)
        for a, b in itertools.combinations(KINDS, 2)
    }
    cross = cross_retention_matrix(profiles, retentions, config)
    print(json.dumps({"pairs": pairs, "cross_retention": cross}, indent=1), flush=True)
    quality = fidelity(model, tokenizer, profiles, args.lengths, args.windows, args.seed)
    out = {
        **provenance(args.device, config={"args": vars(args), "tca": config.to_dict()}),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)",
        "dtype": args.dtype,
        "calibration": calibration,
        "evaluation_texts": sorted(texts.evaluation_texts("prose")),
        "windows_per_length": args.windows,
        "seed": args.seed,
        "profiles": summaries,
        "pairs": pairs,
        "cross_retention": cross,
        "fidelity": quality,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(profiles, max(ratio_lengths), args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
