"""Aggregation of the evaluation runner's JSONL results: loading, summary rows and the Markdown table.

Each input line is one (setting, task, length, sample) record. :func:`summarize` groups them by
(method, setting, task, length) and adds one suite-average row (task ``"average"``) per setting and
length; ``tca.eval.plots`` draws from that summary and :func:`results_table` writes it as Markdown.
Nothing here draws, so nothing here imports matplotlib.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from .rows import load_rows as load_rows  # re-exported: where the readers found it
from .spec import PERPLEXITY
from .tasks import TASKS

AVERAGE = "average"
NEEDLE_TASKS = ("niah_single_number", "niah_single_word", "niah_single_uuid")
DEPTH_BINS = 5


# ---------------------------------------------------------------------------------------------- loading


# ---------------------------------------------------------------------------------------------- ordering


def _none_last(value: float | None) -> tuple[int, float]:
    """A sort key that puts ``None`` after every number."""
    return (1, 0.0) if value is None else (0, float(value))


def setting_key(row: dict[str, Any]) -> tuple:
    """Sort key for settings: full attention, then TCA by tau, then baselines by method and kept fraction."""
    method, setting = row["method"], row["setting"]
    if method == "full":
        return (0, "", (0, 0.0), setting)
    if method == "tca":
        return (1, "", _none_last(row.get("tau")), setting)
    return (2, method, _none_last(row.get("kept_fraction")), setting)


def task_key(task: str) -> tuple[int, int, str]:
    """Sort key for tasks: the suite's order, unknown tasks by name, then the average, then perplexity."""
    if task in TASKS:
        return (0, TASKS.index(task), task)
    if task == AVERAGE:
        return (2, 0, task)
    if task == PERPLEXITY:
        return (3, 0, task)
    return (1, 0, task)


def _summary_key(row: dict[str, Any]) -> tuple:
    """Deterministic order of summary rows: by length, then setting, then task."""
    return (row["length"], setting_key(row), task_key(row["task"]))


def length_label(length: int) -> str:
    """A compact context-length label: ``4096`` -> ``"4K"``, other values unchanged."""
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


# ---------------------------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean (correctly rounded, so independent of order), or ``None`` for no values."""
    return math.fsum(values) / len(values) if values else None


def _first(values: Iterable[Any]) -> Any:
    """The first value that is not ``None``, or ``None``."""
    return next((v for v in values if v is not None), None)


def _group_score(task: str, rows: list[dict[str, Any]]) -> float | None:
    """Mean score of a group, or for perplexity the token-pooled ``exp(sum nll / sum tokens)``."""
    if task == PERPLEXITY:
        tokens = sum(r["tokens"] for r in rows if r.get("tokens"))
        nll = math.fsum(r["nll"] for r in rows if r.get("tokens"))
        return math.exp(nll / tokens) if tokens else None
    return _mean([r["score"] for r in rows if r.get("score") is not None])


def _summary_row(key: tuple, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary row for the records of one (method, setting, task, length) group."""
    method, setting, task, length = key
    kv = _mean([r["kv_fraction"] for r in rows if r.get("kv_fraction") is not None])
    nominal = _first(r.get("kept_fraction") for r in rows)
    return {
        "method": method,
        "setting": setting,
        "task": task,
        "length": length,
        "kept_fraction": nominal if nominal is not None else kv,
        "kv_fraction": kv,
        "managed_kv_fraction": _managed_kv(rows),
        "tau": _first(r.get("tau") for r in rows),
        "samples": len(rows),
        "score": _group_score(task, rows),
    }


def _managed_kv(rows: list[dict[str, Any]]) -> float | None:
    """Mean KV fraction over the managed layers (rows written before it was recorded: their
    ``kv_fraction``, which then covered only managed layers: every model then had only those)."""
    return _mean(
        [r.get("managed_kv_fraction", r.get("kv_fraction")) for r in rows if r.get("kv_fraction") is not None]
    )


def _average_row(task_rows: list[dict[str, Any]], nominal: float | None) -> dict[str, Any] | None:
    """The suite-average row over one setting and length's scored (non-perplexity) task rows."""
    scored = [r for r in task_rows if r["task"] != PERPLEXITY and r["score"] is not None]
    if not scored:
        return None
    kv = _mean([r["kv_fraction"] for r in scored if r["kv_fraction"] is not None])
    return {
        "method": scored[0]["method"],
        "setting": scored[0]["setting"],
        "task": AVERAGE,
        "length": scored[0]["length"],
        "kept_fraction": nominal if nominal is not None else kv,
        "kv_fraction": kv,
        "managed_kv_fraction": _managed_kv(scored),
        "tau": scored[0]["tau"],
        "samples": sum(r["samples"] for r in scored),
        "score": _mean([r["score"] for r in scored]),
    }


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-(method, setting, task, length) means plus one ``"average"`` row per setting and length.

    Each row has ``method, setting, task, length, kept_fraction, kv_fraction, tau, samples, score``:
    ``score`` is the mean score (for perplexity the token-pooled perplexity), ``kv_fraction`` the mean
    measured KV fraction and ``kept_fraction`` the nominal one (for methods without one, the measured
    mean). The average is the mean of the non-perplexity tasks' mean scores over the tasks present.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["setting"], row["task"], row["length"])].append(row)
    summary = [_summary_row(key, members) for key, members in groups.items()]
    by_setting: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    nominal: dict[tuple, float | None] = {}
    for (method, setting, _, length), members in groups.items():
        key = (method, setting, length)
        nominal[key] = _first([nominal.get(key), *(r.get("kept_fraction") for r in members)])
    for row in summary:
        by_setting[(row["method"], row["setting"], row["length"])].append(row)
    averages = [_average_row(members, nominal[key]) for key, members in by_setting.items()]
    summary.extend(a for a in averages if a is not None)
    return sorted(summary, key=_summary_key)


def rows_of_task(summary: Iterable[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The summary rows of one task, in summary order."""
    return [r for r in summary if r["task"] == task]


def distinct_lengths(rows: Iterable[dict[str, Any]]) -> list[int]:
    """The distinct lengths, ascending."""
    return sorted({r["length"] for r in rows})


def perplexity_ratios(summary: Iterable[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Perplexity divided by full attention's at the same length, keyed by (setting, length)."""
    rows = [r for r in rows_of_task(summary, PERPLEXITY) if r["score"] is not None]
    full = {r["length"]: r["score"] for r in rows if r["method"] == "full"}
    return {(r["setting"], r["length"]): r["score"] / full[r["length"]] for r in rows if r["length"] in full}


# ---------------------------------------------------------------------------------------------- needles


def depth_bin(depth: float) -> int:
    """The index of ``depth`` among ``DEPTH_BINS`` equal bins over [0, 1] (1.0 in the last bin)."""
    return min(max(int(depth * DEPTH_BINS), 0), DEPTH_BINS - 1)


def needle_grid(rows: list[dict[str, Any]], lengths: list[int]) -> list[list[float]]:
    """Mean score per (depth bin, length); NaN where a cell has no samples."""
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for row in rows:
        cells[(depth_bin(row["depth"]), row["length"])].append(row["score"])
    return [[_mean(cells[(b, n)]) if cells[(b, n)] else math.nan for n in lengths] for b in range(DEPTH_BINS)]


# ---------------------------------------------------------------------------------------------- table


def _fmt(value: float | None, digits: int) -> str:
    """A number with ``digits`` decimals, or ``"-"`` when missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _setting_kv(summary: list[dict[str, Any]], setting: str, length: int) -> float | None:
    """A setting's measured KV fraction at a length: from its average row, else its perplexity row."""
    for task in (AVERAGE, PERPLEXITY):
        for row in summary:
            if row["task"] == task and row["setting"] == setting and row["length"] == length:
                return row["kv_fraction"]
    return None


def results_table(summary: list[dict[str, Any]], lengths: Sequence[int] | None = None) -> str:
    """A Markdown table: one row per setting, per length its suite-average score and KV fraction.

    Settings are ordered full attention first, then TCA by tau, then baselines by method and kept
    fraction. A perplexity-ratio column (perplexity / full's) is added for lengths with perplexity
    rows. Scores have 1 decimal, fractions 2, ratios 3; missing cells are ``-``.
    """
    lengths = list(lengths) if lengths is not None else distinct_lengths(summary)
    ratios = perplexity_ratios(summary)
    with_ppl = {r["length"] for r in rows_of_task(summary, PERPLEXITY)}
    averages = {(r["setting"], r["length"]): r["score"] for r in rows_of_task(summary, AVERAGE)}
    settings = sorted({r["setting"]: r for r in summary if r["length"] in lengths}.values(), key=setting_key)
    header, align = ["setting"], ["---"]
    for length in lengths:
        label = length_label(length)
        header += [f"score {label}", f"KV {label}"] + ([f"PPL ratio {label}"] if length in with_ppl else [])
        align += ["---:", "---:"] + (["---:"] if length in with_ppl else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in settings:
        name = row["setting"]
        cells = [name]
        for length in lengths:
            cells += [_fmt(averages.get((name, length)), 1), _fmt(_setting_kv(summary, name, length), 2)]
            if length in with_ppl:
                cells.append(_fmt(ratios.get((name, length)), 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
