"""How far each setting is from full attention on the same prompts, with a paired bootstrap interval."""

from __future__ import annotations

import random
from typing import Any


def gaps_to_full(rows: list[dict[str, Any]], resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per (setting, length): mean score minus full attention's on the same prompts, with a 95%
    paired bootstrap interval over the prompts.

    Each (setting, length) draws from its own generator, seeded by ``seed`` and its name, over its
    prompts in (task, seed) order: its interval does not depend on the other settings present or
    on the order of the rows."""
    scored = [r for r in rows if r.get("score") is not None]
    full = {(r["task"], r["length"], r["seed"]): r["score"] for r in scored if r["setting"] == "full"}
    diffs: dict[tuple, list[tuple]] = {}
    for r in scored:
        key = (r["task"], r["length"], r["seed"])
        if r["setting"] != "full" and key in full:
            diffs.setdefault((r["setting"], r["length"]), []).append((key, r["score"] - full[key]))
    out = []
    for (setting, length), pairs in sorted(diffs.items()):
        values = [diff for _, diff in sorted(pairs)]
        rng = random.Random(f"{seed}:{setting}:{length}")
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
