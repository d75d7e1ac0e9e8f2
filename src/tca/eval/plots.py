"""Figures from the summary of the evaluation runner's results (``tca.eval.summary``); drawing only.

The plotting functions read :func:`tca.eval.summary.summarize` rows (the needle heatmap the raw
rows); :func:`write_all` writes the summary, every figure that has data and the table. Matplotlib is
imported inside the functions and drawn on the Agg canvas, so importing this module is cheap and
needs no display.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import summary as _summary
from .spec import PERPLEXITY
from .summary import (
    AVERAGE,
    DEPTH_BINS,
    NEEDLE_TASKS,
    distinct_lengths,
    length_label,
    load_rows,
    needle_grid,
    perplexity_ratios,
    results_table,
    rows_of_task,
    setting_key,
    summarize,
)

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def __getattr__(name: str) -> Any:
    """The aggregation names this module held before ``tca.eval.summary`` (kept for one release)."""
    if not name.startswith("__") and hasattr(_summary, name):
        warnings.warn(
            f"tca.eval.plots.{name} moved to tca.eval.summary.{name}; the old path goes away in the next "
            "release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        # below the panels: at the upper right it can reach into the title of a narrow figure
        columns = min(len(handles), 4)
        fig.legend(
            handles.values(), handles.keys(), loc="outside lower center", ncols=columns, fontsize="small"
        )


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
    rows = rows_of_task(summary, AVERAGE)
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
    lengths = distinct_lengths(rows)
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
    lengths = distinct_lengths(needles)
    settings = sorted({(r["method"], r["setting"]): r for r in needles}.values(), key=setting_key)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    cols = min(len(settings), 4)
    fig, axes = _figure(len(settings), max_cols=cols, panel_size=(1.0 + 0.8 * len(lengths), 3.0))
    image = None
    for i, (ax, first) in enumerate(zip(axes, settings, strict=True)):
        mine = [r for r in needles if r["setting"] == first["setting"] and r["method"] == first["method"]]
        image = _draw_heatmap(ax, needle_grid(mine, lengths), lengths, cmap, y_label=i % cols == 0)
        ax.set_title(first["setting"], fontsize=10)
    fig.colorbar(image, ax=axes, label="mean score (0-100)", shrink=0.9)
    ran = sorted({r["task"] for r in needles}, key=list(tasks).index)  # only the tasks in the rows
    fig.suptitle("Needle retrieval by depth and context length\n" + ", ".join(ran), fontsize=10)
    _save(fig, out_png)
    return len(axes)


def tau_sweep_plot(summary: list[dict[str, Any]], out_png: str | Path) -> int | bool:
    """TCA's suite-average score and measured KV fraction against tau, one line per length.

    Two panels; full attention's score at each length is a dashed line in that length's colour.
    Returns the number of panels, or ``False`` (and writes nothing) with fewer than two taus.
    """
    from matplotlib import colormaps

    averages = rows_of_task(summary, AVERAGE)
    tca = [r for r in averages if r["method"] == "tca" and r["tau"] is not None]
    if len({r["tau"] for r in tca}) < 2:  # one tau is no sweep
        return False
    lengths = distinct_lengths(tca)
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
    ratios = perplexity_ratios(summary)
    rows = [
        dict(r, ratio=ratios[(r["setting"], r["length"])])
        for r in rows_of_task(summary, PERPLEXITY)
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
