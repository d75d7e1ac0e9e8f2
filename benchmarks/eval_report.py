"""Turn `tca eval` JSON lines into the committed result: eval-<date>.json, plots and a Markdown table.

    python benchmarks/eval_report.py RUNS/*.jsonl --device "NVIDIA H100 80GB HBM3" \
        --command "tca eval ..." --out benchmarks/results/eval-2026-11-25.json

The output holds the provenance of this report (``command``, ``commit``, ``tca``, ``config``), the
run's "device", "versions", "model", "date" and "run_commands", the ``inputs`` read, and "rows":
[{"method", "task", "length", "kept_fraction", "tau", "samples", "score", ...}]
(``tca.eval.summary.summarize``: one row per setting, task and length, plus the suite average),
and, with ``--same-prompts N``, a second summary restricted to seeds below N, where every
setting answered exactly the same prompts.
``gaps_to_full`` gives each setting's score minus full attention's on the same prompts, with a
95% paired bootstrap interval. TCA rows calibrated on docs or code, or with options, become
settings of their own. Plots (with the keep-ratio heatmap of ``--profile`` at each length) and
the table go to a folder beside the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tca.core.profile import Profile
from tca.eval.compare import gaps_to_full
from tca.eval.plots import gap_plot, needle_heatmap, pareto_plot, perplexity_plot, tau_sweep_plot
from tca.eval.profile_view import profile_heatmap
from tca.eval.provenance import provenance
from tca.eval.summary import load_rows, results_table, summarize


def complete(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows of the (setting, length) groups that answered every task full attention answered at that
    length, for the same seeds; and the names of the groups left out (an interrupted run)."""
    wanted: dict[int, set] = {}
    for r in rows:
        if r["setting"] == "full":
            wanted.setdefault(r["length"], set()).add((r["task"], r["seed"]))
    groups: dict[tuple, set] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["length"]), set()).add((r["task"], r["seed"]))
    seeds = {key: {seed for _, seed in done} for key, done in groups.items()}
    kept = {
        key
        for key, done in groups.items()
        if {(t, s) for t, s in wanted.get(key[1], set()) if s in seeds[key]} <= done
        and {t for t, _ in done} == {t for t, _ in wanted.get(key[1], set())}
    }
    dropped = sorted(f"{setting}@{length}" for setting, length in set(groups) - kept)
    return [r for r in rows if (r["setting"], r["length"]) in kept], dropped


def tag_variants(rows: list[dict]) -> list[dict]:
    """TCA rows calibrated on another text than prose, or with TCAConfig options, become their own
    setting and method (``tca@tau0.9/docs``, ``tca/docs``; ``tca,local_window=256``), so the
    calibration-text study and any variant sit beside the rest rather than in TCA's tau sweep."""
    for r in rows:
        if r["method"] != "tca":
            continue
        _, comma, options = r["setting"].partition(",")
        if comma:
            r["method"] = f"tca,{options}"
        kind = r.get("calibration")
        if kind not in (None, "prose"):
            r["setting"], r["method"] = f"{r['setting']}/{kind}", f"{r['method']}/{kind}"
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("jsonl", nargs="+", type=Path)
    parser.add_argument("--device", required=True)
    parser.add_argument("--versions", default="", help="library versions of the run, as recorded")
    parser.add_argument("--date", required=True)
    parser.add_argument(
        "--command", action="append", required=True, help="each command of the run (stored as run_commands)"
    )
    parser.add_argument("--same-prompts", type=int, default=None, help="also summarise seeds < N only")
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)", help="as run, dtype included"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=Path("src/tca/data/profiles/smollm2.json"),
        help="keep-ratio heatmap of it",
    )
    parser.add_argument("--out", type=Path, required=True)
    return parser


def report_provenance(args: argparse.Namespace, inputs: list[Path]) -> dict:
    """This script's command, commit and options, with the run's device and date (``--device``,
    ``--date``); the libraries of the run are in ``--versions`` and each input's ``.runs.jsonl``."""
    info = provenance("cpu", config={"args": vars(args)})
    for key in ("backend", "torch", "transformers", "triton", "python"):  # this process's, not the run's
        info.pop(key, None)
    return info | {"device": args.device, "date": args.date, "inputs": [str(p) for p in inputs]}


def main() -> None:
    args = build_parser().parse_args()
    paths = [path for path in args.jsonl if not path.name.endswith(".runs.jsonl")]  # not provenance
    rows = tag_variants([row for path in paths for row in load_rows(path)])
    keys = [(r["setting"], r["task"], r["length"], r["seed"]) for r in rows]
    if len(keys) != len(set(keys)):
        raise SystemExit("the inputs repeat a (setting, task, length, seed): not merging")
    rows, dropped = complete(rows)
    result = {
        **report_provenance(args, paths),
        "versions": args.versions,
        "model": args.model,
        "run_commands": args.command,
        "rows": summarize(rows),
        "gaps_to_full": gaps_to_full(rows),
        "left_out_incomplete": dropped,
    }
    figures = args.out.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    tables = [results_table(result["rows"])]
    if args.same_prompts is not None:
        same = [r for r in rows if r["seed"] < args.same_prompts]
        result["same_prompts"] = {"seeds": f"0-{args.same_prompts - 1}", "rows": summarize(same)}
        tables.append(results_table(result["same_prompts"]["rows"]))
        pareto_plot(result["same_prompts"]["rows"], figures / "pareto-same-prompts.png")
    pareto_plot(result["rows"], figures / "pareto.png")
    gap_plot(result["gaps_to_full"], figures / "gaps.png")
    needle_heatmap(rows, figures / "needle-heatmap.png")
    tau_sweep_plot(result["rows"], figures / "tau-sweep.png")
    perplexity_plot(result["rows"], figures / "perplexity.png")
    profile = Profile.load(args.profile)
    for length in sorted({r["length"] for r in rows}):  # where TCA's budget goes, per layer and head
        profile_heatmap(profile, length, figures / f"keep-ratio-{length}.png")
    (figures / "results.md").write_text("\n\n".join(tables) + "\n")
    args.out.write_text(json.dumps(result, indent=1))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
