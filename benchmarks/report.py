"""Markdown tables for the README, read from the committed results under benchmarks/results/.

python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def attention_table(name: str = "attention-h100-80gb-hbm3.json", shape: str = "llama-3.1-8b") -> str:
    data = load(name)
    lines = [
        f"Per layer, {shape} shapes, {data['device']}, torch {data['torch']}, Triton {data['triton']} "
        f"(`{data['command']}`, `benchmarks/results/{name}`)",
        "",
        "| phase | L | kept | pairs | dense ms | TCA ms | selection ms | efficiency | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        if row["shape"] != shape or row["L"] < 32768:
            continue
        pairs = f"{row['pairs_fraction']:.2f}"
        lines.append(
            f"| {row['phase']} | {row['L'] // 1024}K | {row['kept_fraction']:.0%} | {pairs} | "
            f"{row['dense_ms']:.3g} | {row['tca_ms']:.3g} | {row['selection_ms']:.3g} | "
            f"{row['efficiency']:.2f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def fidelity_table(name: str) -> str:
    data = load(name)
    lines = [
        f"{data['device']}, {data['dtype']}, {data['windows_per_length']} windows of real prose per length "
        f"(`{data['command']}`, `benchmarks/results/{name}`)",
        "",
        "| window | block | tau | L | last-position KL | ppl ratio (2nd half) | by quarter | kept | pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        quarters = " / ".join(f"{q:.3f}" for q in row["ppl_ratio_by_quarter"])
        lines.append(
            f"| {row['local_window']} | {row['block_size']} | {row['tau']} | {row['length']} | "
            f"{row['kl_last_mean']:.4f} | {row['ppl_ratio_second_half']:.3f} | {quarters} | "
            f"{row['kept_fraction']:.2f} | {row['pairs_fraction']:.2f} |"
        )
    return "\n".join(lines)


def needle_table(names: list[str]) -> str:
    lines = [
        "| profile | task | L | dense right | TCA right | KV bytes (TCA / dense, max) | file |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        data = load(name)
        label = (
            data["command"].split("--set", 1)[1].split("--profile")[0].strip()
            if "--set" in data["command"]
            else "default"
        )
        for key, part in data["summary"].items():
            task, length = key.split("@")
            lines.append(
                f"| {label} | {task} | {length} | {part['dense_correct']}/{part['samples']} | "
                f"{part['tca_correct']}/{part['samples']} | {part['kv_ratio_max']:.2f} | `{name}` |"
            )
    return "\n".join(lines)


def eval_tables(name: str) -> str:
    """The task-suite tables: every setting, then every setting on the prompts all of them answered."""
    from tca.eval.summary import results_table

    data = load(name)
    tables = [results_table(data["rows"])]
    if "same_prompts" in data:
        tables.append(f"same prompts (seeds {data['same_prompts']['seeds']}):")
        tables.append(results_table(data["same_prompts"]["rows"]))
    return f"{data['device']}, `{name}`\n\n" + "\n\n".join(tables)


if __name__ == "__main__":
    print(attention_table(), "\n")
    print(fidelity_table("prefill-quality-cpu.json"), "\n")
    print(fidelity_table("prefill-frontier-h100.json"), "\n")
    print(needle_table(["needle-h100-retrieval.json", "needle-h100-default.json"]), "\n")
    print(eval_tables("eval-2026-11-25.json"))
