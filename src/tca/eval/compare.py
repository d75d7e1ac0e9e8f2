"""How far each setting is from full attention on the same prompts, with a paired bootstrap interval."""

from __future__ import annotations

import random
from typing import Any


def gaps_to_full(rows: list[dict[str, Any]], resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per (setting, length): mean score minus full attention's on the same prompts, with a 95%
    paired bootstrap interval over the prompts."""
    rng = random.Random(seed)
    scored = [r for r in rows if r.get("score") is not None]
    full = {(r["task"], r["length"], r["seed"]): r["score"] for r in scored if r["setting"] == "full"}
    diffs: dict[tuple, list[float]] = {}
    for r in scored:
        key = (r["task"], r["length"], r["seed"])
        if r["setting"] != "full" and key in full:
            diffs.setdefault((r["setting"], r["length"]), []).append(r["score"] - full[key])
    out = []
    for (setting, length), values in sorted(diffs.items()):
        means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
        out.append(
            {
                "setting": setting,
                "length": length,
                "prompts": len(values),
                "gap": sum(values) / len(values),
                "ci95": [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]],
            }
        )
    return out
