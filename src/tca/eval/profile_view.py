"""A profile, shown: per layer and KV head keep ratios as a text table and as a PNG heatmap.

``tca profile show`` prints the table and writes the heatmap; ``benchmarks/eval_report.py`` draws
the heatmap beside its figures. numpy and matplotlib are imported inside the functions, so
importing this module is cheap (the CLI's ``--help`` stays instant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def retrieval_note(profile: Any) -> str:
    """`` (N retrieval heads, score >= T)`` with retrieval scores and a threshold, else ``""``."""
    if profile.retrieval is None or profile.config.retrieval_threshold is None:
        return ""
    count = int((profile.retrieval >= profile.config.retrieval_threshold).sum())
    return f" ({count} retrieval heads, score >= {profile.config.retrieval_threshold})"


def profile_table(profile: Any, length: int) -> str:
    """Per layer: each KV head's keep ratio at ``length`` tokens, min / median / max, dense heads."""
    import numpy as np

    ratios = profile.keep_ratios(length)  # (n_layers, n_kv_heads)
    dense = np.isinf(profile.mu)
    n_kv = ratios.shape[1]
    fingerprint, config = profile.fingerprint, profile.config
    lines = [
        f"{fingerprint['architecture']}: {fingerprint['n_layers']} layers, "
        f"{fingerprint['n_heads']} query heads, "
        f"{n_kv} KV heads; tau {config.tau}, window {config.local_window}, block {config.block_size}; "
        f"calibrated on {profile.calibration_tokens:,} tokens",
        *_managed_note(profile),
        f"keep ratio (KV entries kept / context, window included) at {length:,} tokens:",
        "layer " + " ".join(f"{'kv' + str(g):>6}" for g in range(n_kv)) + "    min median    max  dense",
    ]
    for layer, row, dense_heads in zip(profile.managed_layers, ratios, dense, strict=True):
        heads = " ".join(f"{r:6.3f}" for r in row)
        spread = f"{row.min():6.3f} {np.median(row):6.3f} {row.max():6.3f}"
        lines.append(f"{layer:5d} {heads} {spread} {int(dense_heads.sum()):6d}")
    lines.append(
        f"all   mean {ratios.mean():.3f}, min {ratios.min():.3f}, median {np.median(ratios):.3f}, "
        f"max {ratios.max():.3f}; dense heads {int(dense.sum())} of {dense.size}" + retrieval_note(profile)
    )
    return "\n".join(lines)


def _managed_note(profile: Any) -> list[str]:
    """A line naming the layers TCA manages, when it leaves some (sliding-window) layers alone."""
    n_layers, managed = profile.fingerprint["n_layers"], profile.managed_layers
    if len(managed) == n_layers:
        return []
    return [
        f"TCA manages the {len(managed)} full-attention layers {', '.join(map(str, managed))}; the other "
        f"{n_layers - len(managed)} keep their own sliding-window attention and cache (not shown)"
    ]


def profile_heatmap(profile: Any, length: int, out: Path) -> None:
    """Write a PNG heatmap of keep ratios at ``length`` tokens, layers (rows) by KV heads (columns).

    Drawn on the Agg canvas (no display, no global backend change); needs matplotlib
    (``ModuleNotFoundError`` without it).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratios = profile.keep_ratios(length)
    n_layers, n_kv = ratios.shape
    figure = Figure(figsize=(2.0 + 0.9 * n_kv, 1.5 + 0.22 * n_layers))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow(ratios, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    if n_kv * n_layers <= 400:
        for (layer, head), value in np.ndenumerate(ratios):
            colour = "black" if value > 0.6 else "white"
            axes.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
    axes.set_xticks(range(n_kv))
    axes.set_yticks(range(n_layers), [str(layer) for layer in profile.managed_layers])
    axes.set_xlabel("KV head")
    axes.set_ylabel("layer")
    axes.set_title(f"TCA keep ratio at {length:,} tokens (tau {profile.config.tau})", fontsize=9)
    figure.colorbar(image, ax=axes, label="keep ratio")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
