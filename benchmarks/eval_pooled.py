"""TCA's gap to full attention over every fresh-seed prompt we have, with each retrieval threshold.

    python benchmarks/eval_pooled.py --out benchmarks/results/eval-pooled-2026-11-26.json

Pools the grid (seeds 100-119, `eval-2026-11-25/`) and the confirmation run (seeds 200-279,
`eval-2026-11-26/`): 1,100 prompts per length, the 11 tasks (perplexity left out). The two runs
name the same configuration differently (the default changed between them), so rows are renamed
by what ran: ``tca, retrieval 0.05`` and ``tca, retrieval 0.03`` (tau 0.9 both). The development
seeds 0-19, which chose settings, are not pooled.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from tca.eval.compare import gaps_to_full
from tca.eval.summary import load_rows

RESULTS = Path(__file__).parent / "results"
# (file pattern, setting in those files, name by what ran)
SOURCES = [
    ("eval-2026-11-25/runs/main/full.jsonl", "full", "full"),
    ("eval-2026-11-25/runs-retrieval-0.05/tca@tau0.9.jsonl", "tca@tau0.9", "tca, retrieval 0.05"),
    ("eval-2026-11-25/runs/tca/tca@tau0.9-*.jsonl", "tca@tau0.9", "tca, retrieval 0.03"),
    ("eval-2026-11-26/runs/full-*.jsonl", "full", "full"),
    ("eval-2026-11-26/runs/tca@tau0.9-*.jsonl", "tca@tau0.9", "tca, retrieval 0.05"),
    ("eval-2026-11-26/runs/tca@tau0.9,retrieval_threshold=0.03-*.jsonl", None, "tca, retrieval 0.03"),
]


def pooled_rows() -> tuple[list[dict], list[str]]:
    """The renamed task rows of every source, and the files read."""
    rows, files = [], []
    for pattern, setting, name in SOURCES:
        for path in sorted(glob.glob(str(RESULTS / pattern))):
            if path.endswith(".runs.jsonl"):
                continue
            files.append(str(Path(path).relative_to(RESULTS.parent.parent)))
            for row in load_rows(path):
                if row["task"] != "perplexity" and (setting is None or row["setting"] == setting):
                    rows.append(row | {"setting": name})
    return rows, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, files = pooled_rows()
    keys = [(r["setting"], r["task"], r["length"], r["seed"]) for r in rows]
    if len(keys) != len(set(keys)):
        raise SystemExit("the sources repeat a (setting, task, length, seed): not pooling")
    kv: dict[tuple, list[float]] = {}
    for r in rows:
        kv.setdefault((r["setting"], r["length"]), []).append(r["kv_fraction"])
    gaps = [
        g | {"kv_fraction": sum(kv[g["setting"], g["length"]]) / len(kv[g["setting"], g["length"]])}
        for g in gaps_to_full(rows)
    ]
    result = {
        "command": f"python benchmarks/eval_pooled.py --out {args.out}",
        "inputs": files,
        "gaps_to_full": gaps,
    }
    args.out.write_text(json.dumps(result, indent=1))
    for g in gaps:
        low, high = g["ci95"]
        print(
            f"{g['setting']:22} {g['length']:5} n={g['prompts']:4} gap {g['gap']:+.1f} "
            f"({low:+.1f}, {high:+.1f}) KV {g['kv_fraction']:.2f}"
        )


if __name__ == "__main__":
    main()
