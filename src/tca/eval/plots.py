"""Summaries, figures and a Markdown table from the evaluation runner's JSONL results.

Each input line is one (setting, task, length, sample) record. :func:`summarize` groups them by
(method, setting, task, length) and adds one suite-average row (task ``"average"``) per setting and
length; the plotting functions and :func:`results_table` read that summary. Matplotlib is imported
inside the functions and drawn on the Agg canvas, so importing this module is cheap and needs no
display.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .spec import PERPLEXITY
from .tasks import TASKS

AVERAGE = "average"
NEEDLE_TASKS = ("niah_single_number", "niah_single_word", "niah_single_uuid")
DEPTH_BINS = 5
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


# ---------------------------------------------------------------------------------------------- loading


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL results file, skipping blank lines and a truncated (unparseable) last line.

    A malformed line anywhere else raises ``ValueError`` naming the line, since it is not the
    signature of a run interrupted mid-write.
    """
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                break
            raise ValueError(f"{path}:{number}: malformed JSON line: {error}") from error
    return rows


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
        "tau": _first(r.get("tau") for r in rows),
        "samples": len(rows),
        "score": _group_score(task, rows),
    }


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


def _select(summary: Iterable[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The summary rows of one task, in summary order."""
    return [r for r in summary if r["task"] == task]


def _lengths(rows: Iterable[dict[str, Any]]) -> list[int]:
    """The distinct lengths, ascending."""
    return sorted({r["length"] for r in rows})


def _perplexity_ratios(summary: Iterable[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Perplexity divided by full attention's at the same length, keyed by (setting, length)."""
    rows = [r for r in _select(summary, PERPLEXITY) if r["score"] is not None]
    full = {r["length"]: r["score"] for r in rows if r["method"] == "full"}
    return {(r["setting"], r["length"]): r["score"] / full[r["length"]] for r in rows if r["length"] in full}


# ---------------------------------------------------------------------------------------------- figures


def _figure(panels: int, max_cols: int = 3, panel_size: tuple[float, float] = (4.6, 3.6)):
    """A constrained-layout Figure on the Agg canvas with ``panels`` axes; returns (figure, axes list)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(panels, max_cols))
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(panel_size[0] * cols + 1.6, panel_size[1] * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for line in grid for ax in line]
    for spare in axes[panels:]:
        fig.delaxes(spare)
    return fig, axes[:panels]


def _save(fig, out_png: str | Path) -> None:
    """Write the figure as a PNG, creating the parent folder."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def _method_styles(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A stable colour and marker for each method, full attention in black."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    styles, others = {}, sorted(set(methods) - {"full", "tca"})
    for i, method in enumerate(["tca", *others]):
        styles[method] = {"color": palette[i % len(palette)], "marker": _MARKERS[i % len(_MARKERS)]}
    styles["full"] = {"color": "black", "marker": "*"}
    return styles


def _curve_key(row: dict[str, Any]) -> float:
    """Order of points along a method's curve: tau for TCA, the nominal kept fraction otherwise."""
    value = row["tau"] if row["method"] == "tca" else row["kept_fraction"]
    return math.inf if value is None else value


def _figure_legend(fig, axes) -> None:
    """One legend for the whole figure, collected from all panels without duplicates."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")


def _method_key(method: str) -> tuple[int, str]:
    """Order of methods in plots: full attention, TCA, then baselines by name."""
    return ({"full": 0, "tca": 1}.get(method, 2), method)


def _draw_method_curves(ax, rows: list[dict[str, Any]], y_of, styles: dict[str, dict[str, Any]]) -> None:
    """Plot y (from ``y_of``) against measured KV fraction, one line per method; full as a reference."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["kv_fraction"] is not None and y_of(row) is not None:
            by_method[row["method"]].append(row)
    for method, members in sorted(by_method.items(), key=lambda item: _method_key(item[0])):
        style = styles[method]
        if method == "full":
            for row in members:
                ax.axhline(y_of(row), color=style["color"], linestyle="--", linewidth=1, alpha=0.7)
                ax.plot([1.0], [y_of(row)], linestyle="none", markersize=11, label="full attention", **style)
            continue
        members.sort(key=_curve_key)
        xs, ys = [r["kv_fraction"] for r in members], [y_of(r) for r in members]
        ax.plot(xs, ys, linewidth=1.6, markersize=6, label=method, **style)
        if method == "tca":
            for row, x, y in zip(members, xs, ys, strict=True):
                if row["tau"] is not None:
                    ax.annotate(
                        f"τ={row['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                    )


def pareto_plot(summary: list[dict[str, Any]], out_png: str | Path) -> int | bool:
    """Suite-average score against measured KV fraction, one panel per length, one curve per method.

    Baselines connect their kept fractions in order, TCA its taus; full attention is a dashed
    horizontal reference with a marker at x = 1. Returns the number of panels, or ``False`` (and
    writes nothing) when there are no average rows.
    """
    rows = _select(summary, AVERAGE)
    if not rows:
        return False
    return _kv_panels(
        rows,
        lambda r: r["score"],
        "suite-average score (0-100)",
        "Accuracy vs KV-cache memory (up and left is better)",
        out_png,
        ylim=(0, 102),
    )


def _kv_panels(rows, y_of, y_label: str, title: str, out_png: str | Path, ylim=None) -> int:
    """One panel per length: ``y_of(row)`` against measured KV fraction, a curve per method."""
    lengths = _lengths(rows)
    styles = _method_styles(r["method"] for r in rows)
    fig, axes = _figure(len(lengths))
    for ax, length in zip(axes, lengths, strict=True):
        _draw_method_curves(ax, [r for r in rows if r["length"] == length], y_of, styles)
        ax.set_title(f"context {length_label(length)} ({length:,} tokens)")
        ax.set_xlabel("KV cache kept (measured fraction of dense bytes)")
        ax.set_ylabel(y_label)
        ax.set_xlim(0, 1.05)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    _figure_legend(fig, axes)
    _save(fig, out_png)
    return len(axes)


def _depth_bin(depth: float) -> int:
    """The index of ``depth`` among ``DEPTH_BINS`` equal bins over [0, 1] (1.0 in the last bin)."""
    return min(max(int(depth * DEPTH_BINS), 0), DEPTH_BINS - 1)


def _needle_grid(rows: list[dict[str, Any]], lengths: list[int]) -> list[list[float]]:
    """Mean score per (depth bin, length); NaN where a cell has no samples."""
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for row in rows:
        cells[(_depth_bin(row["depth"]), row["length"])].append(row["score"])
    return [[_mean(cells[(b, n)]) if cells[(b, n)] else math.nan for n in lengths] for b in range(DEPTH_BINS)]


def _draw_heatmap(ax, grid: list[list[float]], lengths: list[int], cmap, y_label: bool):
    """Draw and annotate one depth x length panel; returns the image for the colour bar."""
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for b, line in enumerate(grid):
        for j, value in enumerate(line):
            text = "-" if math.isnan(value) else f"{value:.0f}"
            colour = "black" if math.isnan(value) or value >= 50 else "white"
            ax.text(j, b, text, ha="center", va="center", fontsize=8, color=colour)
    edges = [i / DEPTH_BINS for i in range(DEPTH_BINS + 1)]
    ax.set_yticks(range(DEPTH_BINS), [f"{edges[b]:.1f}-{edges[b + 1]:.1f}" for b in range(DEPTH_BINS)])
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    if y_label:
        ax.set_ylabel("needle depth (fraction of context)")
    return image


def needle_heatmap(
    rows: list[dict[str, Any]], out_png: str | Path, tasks: Sequence[str] = NEEDLE_TASKS
) -> int | bool:
    """Mean needle score by depth bin (5 bins over [0, 1]) x length, one annotated panel per setting.

    Uses the raw rows of ``tasks`` that have a depth and a score; all panels share a 0-100 colour
    scale and one colour bar. Returns the number of panels, or ``False`` (and writes nothing) when
    there are no such rows.
    """
    from matplotlib import colormaps

    needles = [
        r for r in rows if r["task"] in tasks and r.get("depth") is not None and r.get("score") is not None
    ]
    if not needles:
        return False
    lengths = _lengths(needles)
    settings = sorted({(r["method"], r["setting"]): r for r in needles}.values(), key=setting_key)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    cols = min(len(settings), 4)
    fig, axes = _figure(len(settings), max_cols=cols, panel_size=(1.0 + 0.8 * len(lengths), 3.0))
    image = None
    for i, (ax, first) in enumerate(zip(axes, settings, strict=True)):
        mine = [r for r in needles if r["setting"] == first["setting"] and r["method"] == first["method"]]
        image = _draw_heatmap(ax, _needle_grid(mine, lengths), lengths, cmap, y_label=i % cols == 0)
        ax.set_title(first["setting"], fontsize=10)
    fig.colorbar(image, ax=axes, label="mean score (0-100)", shrink=0.9)
    fig.suptitle("Needle retrieval by depth and context length (" + ", ".join(tasks) + ")", fontsize=10)
    _save(fig, out_png)
    return len(axes)


def tau_sweep_plot(summary: list[dict[str, Any]], out_png: str | Path) -> int | bool:
    """TCA's suite-average score and measured KV fraction against tau, one line per length.

    Two panels; full attention's score at each length is a dashed line in that length's colour.
    Returns the number of panels, or ``False`` (and writes nothing) with fewer than two taus.
    """
    from matplotlib import colormaps

    averages = _select(summary, AVERAGE)
    tca = [r for r in averages if r["method"] == "tca" and r["tau"] is not None]
    if len({r["tau"] for r in tca}) < 2:  # one tau is no sweep
        return False
    lengths = _lengths(tca)
    palette = colormaps["tab10"].colors
    fig, (ax_score, ax_kv) = _figure(2, max_cols=2)
    for i, length in enumerate(lengths):
        colour, label = palette[i % len(palette)], f"{length_label(length)} tokens"
        points = sorted((r for r in tca if r["length"] == length), key=lambda r: r["tau"])
        taus = [r["tau"] for r in points]
        ax_score.plot(taus, [r["score"] for r in points], marker="o", color=colour, label=f"TCA, {label}")
        ax_kv.plot(taus, [r["kv_fraction"] for r in points], marker="o", color=colour, label=f"TCA, {label}")
        for full in (r for r in averages if r["method"] == "full" and r["length"] == length):
            ax_score.axhline(full["score"], color=colour, linestyle="--", linewidth=1, label=f"full, {label}")
    ax_score.set_ylabel("suite-average score (0-100)")
    ax_score.set_ylim(0, 102)
    ax_score.set_title("accuracy")
    ax_kv.set_ylabel("KV cache kept (measured fraction of dense bytes)")
    ax_kv.set_ylim(0, 1.05)
    ax_kv.set_title("memory")
    for ax in (ax_score, ax_kv):
        ax.set_xlabel("τ (attention mass kept)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("TCA threshold sweep")
    _figure_legend(fig, (ax_score, ax_kv))
    _save(fig, out_png)
    return 2


def gap_plot(gaps: list[dict[str, Any]], out_png: str | Path, margin: float = 2.0) -> int | bool:
    """Each setting's paired gap to full attention with its 95% interval, one panel per length.

    ``gaps`` are ``tca.eval.compare.gaps_to_full`` rows. Zero is a solid line and ``-margin`` a
    dotted one, so a reader sees at once which settings are within the margin and how sure that is.
    Returns the number of panels, or ``False`` (and writes nothing) without gaps.
    """
    if not gaps:
        return False
    lengths = sorted({g["length"] for g in gaps})
    method_of = {g["setting"]: g["setting"].split("@")[0] for g in gaps}  # tca variants share TCA's colour
    settings = sorted(method_of, key=lambda s: setting_key({"method": method_of[s], "setting": s}))
    styles = _method_styles(method_of.values())
    by_key = {(g["setting"], g["length"]): g for g in gaps}
    fig, axes = _figure(len(lengths), panel_size=(4.6, 0.9 + 0.35 * len(settings)))
    for ax, length in zip(axes, lengths, strict=True):
        for y, setting in enumerate(settings):
            g = by_key.get((setting, length))
            if g is None:
                continue
            low, high = g["ci95"]
            error = [[g["gap"] - low], [high - g["gap"]]]
            ax.errorbar(g["gap"], y, xerr=error, linestyle="none", capsize=3, **styles[method_of[setting]])
        ax.axvline(0.0, color="black", linewidth=1)
        ax.axvline(-margin, color="grey", linestyle=":", linewidth=1)
        ax.set_yticks(range(len(settings)), settings, fontsize="small")
        ax.invert_yaxis()
        ax.set_title(f"context {length_label(length)} ({length:,} tokens)")
        ax.set_xlabel("score minus full attention (points)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Gap to full attention on the same prompts (95% paired bootstrap; dotted: -{margin:g})")
    _save(fig, out_png)
    return len(lengths)


def perplexity_plot(summary: list[dict[str, Any]], out_png: str | Path) -> int | bool:
    """Perplexity relative to full attention against measured KV fraction, one panel per length.

    Only lengths with a full-attention perplexity are drawn. Returns the number of panels, or
    ``False`` (and writes nothing) when there are no perplexity rows to compare.
    """
    ratios = _perplexity_ratios(summary)
    rows = [
        dict(r, ratio=ratios[(r["setting"], r["length"])])
        for r in _select(summary, PERPLEXITY)
        if (r["setting"], r["length"]) in ratios
    ]
    if not rows:
        return False
    return _kv_panels(
        rows,
        lambda r: r["ratio"],
        "perplexity / full-attention perplexity",
        "Language-modelling cost of a smaller KV cache (lower is better, 1 = full attention)",
        out_png,
    )


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
    lengths = list(lengths) if lengths is not None else _lengths(summary)
    ratios = _perplexity_ratios(summary)
    with_ppl = {r["length"] for r in _select(summary, PERPLEXITY)}
    averages = {(r["setting"], r["length"]): r["score"] for r in _select(summary, AVERAGE)}
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


# ---------------------------------------------------------------------------------------------- all


def write_all(jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Summarize a JSONL results file into ``out_dir``: summary JSON, every figure that has data, table.

    Returns the paths written, in the order written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(jsonl_path)
    summary = summarize(rows)
    written = [out / "summary.json"]
    written[0].write_text(json.dumps(summary, indent=2) + "\n")
    figures = {
        "pareto.png": lambda p: pareto_plot(summary, p),
        "needle_heatmap.png": lambda p: needle_heatmap(rows, p),
        "tau_sweep.png": lambda p: tau_sweep_plot(summary, p),
        "perplexity.png": lambda p: perplexity_plot(summary, p),
    }
    for name, draw in figures.items():
        if draw(out / name):
            written.append(out / name)
    table = out / "results.md"
    table.write_text(results_table(summary))
    written.append(table)
    return written
