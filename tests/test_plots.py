"""Figures from runner results (``tca.eval.plots``) on synthetic rows: each writes a PNG that reads
back, or nothing when it has no data.
"""

from __future__ import annotations

import json

import pytest
from synthetic_results import LENGTHS, SETTINGS, make_rows

from tca.eval import plots
from tca.eval.summary import results_table, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """The synthetic rows shared by the tests."""
    return make_rows()


@pytest.fixture(scope="module")
def summary(rows) -> list[dict]:
    """The summary of the synthetic rows."""
    return summarize(rows)


def _assert_png(path, min_width: int = 300) -> None:
    """The file is a non-empty PNG that reads back at a sensible size."""
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= 200


# ---------------------------------------------------------------------------------------------- figures


def test_pareto_plot_writes_png(tmp_path, summary):
    out = tmp_path / "pareto.png"
    assert plots.pareto_plot(summary, out) == len(LENGTHS)
    _assert_png(out)


def test_needle_heatmap_writes_png(tmp_path, rows):
    out = tmp_path / "needles.png"
    assert plots.needle_heatmap(rows, out) == len(SETTINGS)
    _assert_png(out)


def test_needle_heatmap_without_needles_writes_nothing(tmp_path, rows):
    out = tmp_path / "needles.png"
    assert plots.needle_heatmap(rows, out, tasks=("no_such_task",)) is False
    assert not out.exists()


def test_tau_sweep_plot_writes_png(tmp_path, summary):
    out = tmp_path / "tau.png"
    assert plots.tau_sweep_plot(summary, out) == 2
    _assert_png(out)


def test_tau_sweep_plot_needs_two_taus(tmp_path, summary):
    one_tau = [r for r in summary if r["method"] != "tca" or r["tau"] == 0.9]
    out = tmp_path / "sweep.png"
    assert plots.tau_sweep_plot(one_tau, out) is False
    assert not out.exists()


def test_gap_plot_draws_one_panel_per_length(tmp_path):
    gaps = [
        {"setting": s, "length": n, "prompts": 9, "gap": g, "ci95": [g - 1.0, g + 0.5]}
        for s, g in (("tca@tau0.9", -0.7), ("snapkv@0.3", -12.0))
        for n in (1000, 3000)
    ]
    out = tmp_path / "gaps.png"
    assert plots.gap_plot(gaps, out) == 2
    assert out.stat().st_size > 0
    assert plots.gap_plot([], tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_perplexity_plot_writes_png_or_nothing(tmp_path, summary):
    out = tmp_path / "ppl.png"
    assert plots.perplexity_plot(summary, out) == len(LENGTHS)
    _assert_png(out)
    empty = tmp_path / "none.png"
    assert plots.perplexity_plot(summarize(make_rows(perplexity=False)), empty) is False
    assert not empty.exists()


def test_write_all(tmp_path, rows):
    source = tmp_path / "results.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"setting": "fu')
    written = plots.write_all(source, tmp_path / "out")
    names = [p.name for p in written]
    assert names == [
        "summary.json",
        "pareto.png",
        "needle_heatmap.png",
        "tau_sweep.png",
        "perplexity.png",
        "results.md",
    ]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert json.loads(written[0].read_text()) == summarize(rows)
    assert written[-1].read_text() == results_table(summarize(rows))


def test_import_does_not_load_matplotlib():
    import subprocess
    import sys

    code = "import sys, tca.eval.plots; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _drawn(monkeypatch, draw) -> object:
    """The figure ``draw()`` saves, drawn (its text laid out), instead of a file."""
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: saved.append(fig))
    draw()
    (fig,) = saved
    fig.canvas.draw()
    return fig


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_pareto_legend_stays_clear_of_the_titles(monkeypatch, summary):
    fig = _drawn(monkeypatch, lambda: plots.pareto_plot(summary, "unused.png"))
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    titles = [fig._suptitle] + [ax.title for ax in fig.axes]
    assert not any(_overlap(legend, title.get_window_extent(renderer)) for title in titles)


def test_needle_heatmap_title_names_only_the_tasks_that_ran_and_fits(monkeypatch, rows):
    ran = [r for r in rows if r["task"] == "niah_single_word"]
    fig = _drawn(monkeypatch, lambda: plots.needle_heatmap(ran, "unused.png"))
    title = fig._suptitle
    assert "niah_single_word" in title.get_text() and "niah_single_number" not in title.get_text()
    box, frame = title.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
