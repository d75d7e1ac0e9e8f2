"""TCA's gap to full attention over every fresh-seed prompt of the committed runs.

    python benchmarks/eval_pooled.py --out benchmarks/results/eval-pooled-2026-11-26.json

Pools the grid (seeds 100-119, ``eval-2026-11-25/``) and the confirmation run (seeds 200-279,
``eval-2026-11-26/``): 1,100 prompts per length, the 11 tasks (perplexity left out). Rows are
pooled by what ran, not by the key they ran under: each input's provenance record
(``<file>.runs.jsonl``) holds the resolved configuration of its setting, rows with the same
configuration are pooled, and a group is named ``tca@tauT`` plus the options in which it differs
from the other TCA groups (the grid's ``tca@tau0.9`` and the confirmation run's
``tca@tau0.9,retrieval_threshold=0.03`` are one configuration: today's defaults). Each gap row
carries that configuration. An input without a resolved configuration is refused. The
development seeds 0-19, which chose settings, are not pooled.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from tca.eval.compare import gaps_to_full
from tca.eval.provenance import provenance
from tca.eval.spec import TCA_OPTIONS
from tca.eval.summary import load_rows

RESULTS = Path(__file__).parent / "results"
INPUTS = [  # the fresh-seed answers of full attention and of TCA at tau 0.9 with the defaults
    "eval-2026-11-25/runs/main/full.jsonl",
    "eval-2026-11-25/runs/tca/tca@tau0.9-*.jsonl",
    "eval-2026-11-26/runs/full-*.jsonl",
    "eval-2026-11-26/runs/tca@tau0.9,retrieval_threshold=0.03-*.jsonl",
]


def resolved_setting(path: Path, key: str) -> dict:
    """What setting ``key`` of the `tca eval` output ``path`` ran, from its provenance records
    (every record of the file must say the same)."""
    records = [json.loads(line) for line in Path(f"{path}.runs.jsonl").read_text().splitlines()]
    found = {json.dumps(r.get("config", {}).get("settings", {}).get(key), sort_keys=True) for r in records}
    if len(found) != 1 or found == {"null"}:
        raise SystemExit(f"{path}.runs.jsonl: no single resolved configuration of {key!r}; not pooling")
    return json.loads(found.pop())


def names(configs: list[dict]) -> list[str]:
    """A name per distinct configuration: the method (``full``, ``snapkv@0.3``) or ``tca@tauT``
    with every option in which TCA configurations of that tau differ, and the calibration text."""
    out = []
    for config in configs:
        if config["method"] != "tca":
            fraction = config.get("kept_fraction")
            out.append(config["method"] if fraction is None else f"{config['method']}@{fraction:g}")
            continue
        others = [c for c in configs if c["method"] == "tca" and c["tau"] == config["tau"]]
        differ = [n for n in TCA_OPTIONS if len({json.dumps(c["tca"][n]) for c in others}) > 1]
        name = f"tca@tau{config['tau']:g}" + "".join(f",{n}={config['tca'][n]}" for n in differ)
        kinds = {c["calibration"] for c in others}
        out.append(name + (f"/{config['calibration']}" if len(kinds) > 1 else ""))
    return out


def pooled_rows() -> tuple[list[dict], list[str], dict[str, dict]]:
    """The task rows of every input named by what ran, the files read, and each name's configuration."""
    loaded, files = [], []
    for pattern in INPUTS:
        for path in sorted(glob.glob(str(RESULTS / pattern))):
            if path.endswith(".runs.jsonl"):  # a provenance record, read beside its answers
                continue
            files.append(str(Path(path).relative_to(RESULTS.parent.parent)))
            rows = [row for row in load_rows(path) if row["task"] != "perplexity"]
            loaded += [(row, resolved_setting(Path(path), row["setting"])) for row in rows]
    configs = list({json.dumps(c, sort_keys=True): c for _, c in loaded}.values())
    named = dict(zip((json.dumps(c, sort_keys=True) for c in configs), names(configs), strict=True))
    rows = [row | {"setting": named[json.dumps(c, sort_keys=True)]} for row, c in loaded]
    return rows, files, {named[json.dumps(c, sort_keys=True)]: c for c in configs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    rows, files, configs = pooled_rows()
    keys = [(r["setting"], r["task"], r["length"], r["seed"]) for r in rows]
    if len(keys) != len(set(keys)):
        raise SystemExit("the inputs repeat a (setting, task, length, seed): not pooling")
    kv: dict[tuple, list[float]] = {}
    for r in rows:
        kv.setdefault((r["setting"], r["length"]), []).append(r["kv_fraction"])
    gaps = [
        g | {"kv_fraction": sum(kv[g["setting"], g["length"]]) / len(kv[g["setting"], g["length"]])}
        for g in gaps_to_full(rows)
    ]
    info = provenance("cpu", config={"args": vars(args), "inputs": INPUTS, "settings": configs})
    for key in ("backend", "device"):  # of this process, which only adds up committed answers
        info.pop(key)
    result = {**info, "inputs": files, "gaps_to_full": gaps}
    args.out.write_text(json.dumps(result, indent=1))
    for g in gaps:
        low, high = g["ci95"]
        print(
            f"{g['setting']:22} {g['length']:5} n={g['prompts']:4} gap {g['gap']:+.1f} "
            f"({low:+.1f}, {high:+.1f}) KV {g['kv_fraction']:.2f}"
        )


if __name__ == "__main__":
    main()
