"""Synthetic evaluation-runner rows with known values, and their summary recomputed with plain loops.

Shared by ``test_summary.py`` and ``test_plots.py``; nothing here imports ``tca``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

LENGTHS = (1024, 4096)
TASKS = ("niah_single_number", "niah_single_word", "niah_single_uuid", "variable_tracking")
SETTINGS = (  # (setting, method, nominal kept fraction, tau)
    ("snapkv@0.5", "snapkv", 0.5, None),
    ("tca@tau0.9", "tca", None, 0.9),
    ("full", "full", None, None),
    ("snapkv@0.2", "snapkv", 0.2, None),
    ("tca@tau0.8", "tca", None, 0.8),
    ("streaming@0.3", "streaming", 0.3, None),
)
SAMPLES = 4


def _kv(method: str, kept: float | None, tau: float | None, rng: random.Random) -> float:
    """A plausible measured KV fraction for one sample."""
    if method == "full":
        return 1.0
    base = kept if kept is not None else tau - 0.5
    return round(base + rng.uniform(-0.05, 0.05), 4)


def _skipped(setting: str, task: str, length: int) -> bool:
    """One task missing for one setting and length, to test averages over the tasks present."""
    return setting == "snapkv@0.2" and task == "variable_tracking" and length == 4096


def make_rows(seed: int = 0, perplexity: bool = True) -> list[dict]:
    """Synthetic runner rows: seeded random scores, depths and KV fractions, plus perplexity rows."""
    rng = random.Random(seed)
    rows = []
    for setting, method, kept, tau in SETTINGS:
        calibration = "prose" if method == "tca" else None
        common = {"setting": setting, "method": method, "kept_fraction": kept, "tau": tau}
        common["calibration"] = calibration
        for length in LENGTHS:
            for task in TASKS:
                if _skipped(setting, task, length):
                    continue
                for sample in range(SAMPLES):
                    rows.append(
                        {
                            **common,
                            "task": task,
                            "length": length,
                            "seed": sample,
                            "score": rng.choice([0.0, 50.0, 100.0, rng.uniform(0, 100)]),
                            "kv_fraction": _kv(method, kept, tau, rng),
                            "depth": rng.random() if task.startswith("niah") else None,
                            "answer": "x",
                            "seconds": 0.1,
                        }
                    )
            if perplexity:
                for sample in range(2):
                    rows.append(
                        {
                            **common,
                            "task": "perplexity",
                            "length": length,
                            "seed": sample,
                            "score": None,
                            "nll": rng.uniform(2.0, 3.0) * length,
                            "tokens": length - rng.randrange(10),
                            "kv_fraction": _kv(method, kept, tau, rng),
                            "depth": None,
                            "answer": "",
                            "seconds": 0.2,
                        }
                    )
    for row in rows:  # rows of a model with unmanaged layers carry both fractions; older rows one
        if rng.random() < 0.5:
            row["managed_kv_fraction"] = row["kv_fraction"] * rng.uniform(0.5, 1.0)
    return rows


def expected_summary(rows: list[dict]) -> dict[tuple, dict]:
    """Plain-Python reference: per-group means, pooled perplexity and suite averages, by key."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["setting"], row["task"], row["length"])].append(row)
    expected = {}
    for key, members in groups.items():
        kv = sum(r["kv_fraction"] for r in members) / len(members)
        managed = sum(r.get("managed_kv_fraction", r["kv_fraction"]) for r in members) / len(members)
        if key[2] == "perplexity":
            score = math.exp(sum(r["nll"] for r in members) / sum(r["tokens"] for r in members))
        else:
            score = sum(r["score"] for r in members) / len(members)
        nominal = members[0]["kept_fraction"]
        expected[key] = {
            "kv_fraction": kv,
            "managed_kv_fraction": managed,
            "kept_fraction": nominal if nominal is not None else kv,
            "tau": members[0]["tau"],
            "samples": len(members),
            "score": score,
        }
    per_setting = defaultdict(list)
    for (method, setting, task, length), values in expected.items():
        if task != "perplexity":
            per_setting[(method, setting, length)].append(values)
    for (method, setting, length), tasks in per_setting.items():
        kv = sum(t["kv_fraction"] for t in tasks) / len(tasks)
        nominal = tasks[0]["kept_fraction"] if method not in ("tca", "full") else None
        expected[(method, setting, "average", length)] = {
            "kv_fraction": kv,
            "managed_kv_fraction": sum(t["managed_kv_fraction"] for t in tasks) / len(tasks),
            "kept_fraction": nominal if nominal is not None else kv,
            "tau": tasks[0]["tau"],
            "samples": sum(t["samples"] for t in tasks),
            "score": sum(t["score"] for t in tasks) / len(tasks),
        }
    return expected
