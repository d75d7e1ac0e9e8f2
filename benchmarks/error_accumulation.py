"""Does TCA's attention error build up with depth? SmolLM2 with its bundled profile, on real prose.

For each window of the bundled evaluation prose (``tca.eval.error_accumulation``):

- isolated: each layer gets the dense model's inputs. The output of TCA's sparse prefill is
  compared with dense attention (L1 error of each query's output), against Theorem 1's bound
  ``2 gamma ||V||_inf``. Figures are for the last query and as a mean over all queries, with the
  number of (head, query) pairs above the bound.
- compounded: the whole model runs under ``tca.apply``. For each layer, the relative L2 error of
  the hidden state after that layer, against the dense run. Then KL(dense || tca) of the
  next-token distributions.

Writes a JSON with provenance (per-layer rows averaged over windows) and a PNG beside it.

    python benchmarks/error_accumulation.py --lengths 2048 --windows 2 --device cpu \\
        --out benchmarks/results/error-accumulation-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tca.bundled import texts
from tca.bundled.models import load_model
from tca.bundled.profiles import profile_for
from tca.eval.error_accumulation import average_results, error_accumulation
from tca.eval.fidelity import prose_windows
from tca.eval.provenance import provenance


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--windows", type=int, default=2, help="prose windows per length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=256, help="queries processed at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def summary(length: int, result: dict) -> dict:
    """A one-line view of one averaged length: ranges over layers, and the KLs."""
    rows = result["rows"]

    def span(key: str) -> list[float]:
        return [min(r[key] for r in rows), max(r[key] for r in rows)]

    return {
        "length": length,
        "isolated_err_last": span("isolated_err_last"),
        "bound_last": span("bound_last"),
        "isolated_err_mean": span("isolated_err_mean"),
        "bound_mean": span("bound_mean"),
        "violations": sum(r["violations"] for r in rows),
        "hidden_rel_err_mean_first_last_layer": [
            rows[0]["hidden_rel_err_mean"],
            rows[-1]["hidden_rel_err_mean"],
        ],
        "kl_last": result["kl_last"],
        "kl_second_half_mean": result["kl_second_half_mean"],
    }


def draw(ax, rows: list[dict], key: str, label: str, **style) -> None:
    """One per-layer line of ``key``."""
    ax.plot(
        [r["layer"] for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=label, **style
    )


def plot_length(left, right, result: dict) -> None:
    """One length: isolated error and bound (left), compounded hidden-state error (right)."""
    rows, length = result["rows"], result["length"]
    draw(left, rows, "isolated_err_last", "error, last query", color="C0")
    draw(left, rows, "bound_last", "bound 2γ‖V‖∞, last query", color="C0", linestyle="--")
    draw(left, rows, "isolated_err_mean", "error, mean over queries", color="C1")
    draw(left, rows, "bound_mean", "bound, mean over queries", color="C1", linestyle="--")
    left.set_title(f"isolated: L1 error of the attention output (dense inputs), L={length}", fontsize=10)
    draw(right, rows, "hidden_rel_err_last", "hidden state, last position", color="C2")
    draw(right, rows, "hidden_rel_err_mean", "hidden state, mean over positions", color="C3")
    draw(right, rows, "hidden_rel_err_mean_past_window", "hidden state, mean past the window", color="C4")
    draw(right, rows, "isolated_rel_err_mean", "isolated attention output, mean", color="C7", linestyle=":")
    right.set_title(
        f"compounded: relative L2 error after each layer, L={length}\n"
        f"KL(dense||tca) last {result['kl_last']:.2g}, 2nd-half mean {result['kl_second_half_mean']:.2g}",
        fontsize=10,
    )
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)


def plot(results: list[dict], path: Path) -> None:
    """Per length, a row of two panels (``plot_length``); log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.5 * len(results)), squeeze=False)
    for (left, right), result in zip(axes, results, strict=True):
        plot_length(left, right, result)
    fig.suptitle(f"TCA error through the layers (mean over query heads and {results[0]['inputs']} windows)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Measure every length, write the JSON and the plot."""
    args = parse_args()
    model, tokenizer = load_model("smollm2", dtype=getattr(torch, args.dtype), device=args.device)
    profile = profile_for("smollm2")
    results = []
    for length in args.lengths:
        windows = prose_windows(tokenizer, texts.evaluation_texts(), length, args.windows, args.seed)
        per_window = []
        for i, ids in enumerate(windows):
            start = time.perf_counter()
            per_window.append(error_accumulation(model, profile, ids, args.chunk))
            print(f"length {length} window {i}: {time.perf_counter() - start:.0f} s", flush=True)
        result = {"length": length, **average_results(per_window)}
        results.append(result)
        print(json.dumps(summary(length, result)), flush=True)
    out = {
        **provenance(args.device, config={"args": vars(args), "tca": profile.config.to_dict()}),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)",
        "dtype": args.dtype,
        "profile": "bundled smollm2",
        "texts": sorted(texts.evaluation_texts()),
        "windows_per_length": args.windows,
        "seed": args.seed,
        "bounds": {
            "bound": "2 * gamma * max_k ||v_k||_1 on the L1 norm of a query's output error",
            "elem_bound": "2 * gamma * max|V| on its largest element error (tca.error_bound.theorem1_bound)",
        },
        "summary": [summary(r["length"], r) for r in results],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
