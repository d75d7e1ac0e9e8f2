"""Result summaries, figures and the Markdown table, on synthetic runner output with known values.

Expected summaries are recomputed here with plain loops over the raw rows, independently of
``tca.eval.plots``.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import pytest

from tca.eval import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    return rows


def expected_summary(rows: list[dict]) -> dict[tuple, dict]:
    """Plain-Python reference: per-group means, pooled perplexity and suite averages, by key."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["setting"], row["task"], row["length"])].append(row)
    expected = {}
    for key, members in groups.items():
        kv = sum(r["kv_fraction"] for r in members) / len(members)
        if key[2] == "perplexity":
            score = math.exp(sum(r["nll"] for r in members) / sum(r["tokens"] for r in members))
        else:
            score = sum(r["score"] for r in members) / len(members)
        nominal = members[0]["kept_fraction"]
        expected[key] = {
            "kv_fraction": kv,
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
            "kept_fraction": nominal if nominal is not None else kv,
            "tau": tasks[0]["tau"],
            "samples": sum(t["samples"] for t in tasks),
            "score": sum(t["score"] for t in tasks) / len(tasks),
        }
    return expected


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """The synthetic rows shared by the tests."""
    return make_rows()


@pytest.fixture(scope="module")
def summary(rows) -> list[dict]:
    """The summary of the synthetic rows."""
    return plots.summarize(rows)


def _assert_png(path, min_width: int = 300) -> None:
    """The file is a non-empty PNG that reads back at a sensible size."""
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= 200


# ---------------------------------------------------------------------------------------------- loading


def test_load_rows_skips_truncated_last_line(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows[:10])
    path.write_text(text + "\n" + json.dumps(rows[10])[:37])
    assert plots.load_rows(path) == rows[:10]


def test_load_rows_keeps_complete_last_line_without_newline(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:5]))
    assert plots.load_rows(path) == rows[:5]


def test_load_rows_rejects_corruption_before_the_end(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        plots.load_rows(path)


# ---------------------------------------------------------------------------------------------- summary


def test_summarize_matches_plain_python(rows, summary):
    expected = expected_summary(rows)
    got = {(r["method"], r["setting"], r["task"], r["length"]): r for r in summary}
    assert len(summary) == len(got) == len(expected)
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        row = got[key]
        assert set(row) == {"method", "setting", "task", "length", *values}
        for name, value in values.items():
            assert row[name] == (pytest.approx(value) if isinstance(value, float) else value), (key, name)


def test_average_uses_only_tasks_present(summary, rows):
    average = next(
        r for r in summary if r["setting"] == "snapkv@0.2" and r["task"] == "average" and r["length"] == 4096
    )
    niah = [r for r in rows if r["setting"] == "snapkv@0.2" and r["length"] == 4096 and r["task"] in TASKS]
    means = [
        sum(r["score"] for r in niah if r["task"] == t) / SAMPLES for t in TASKS if t != "variable_tracking"
    ]
    assert average["score"] == pytest.approx(sum(means) / 3)
    assert average["samples"] == 3 * SAMPLES
    assert average["kept_fraction"] == 0.2


def test_summarize_is_deterministic_and_ordered(rows, summary):
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    assert plots.summarize(shuffled) == summary
    first = [r["setting"] for r in summary if r["length"] == 1024 and r["task"] == "average"]
    assert first == ["full", "tca@tau0.8", "tca@tau0.9", "snapkv@0.2", "snapkv@0.5", "streaming@0.3"]
    tasks = [r["task"] for r in summary if r["length"] == 1024 and r["setting"] == "full"]
    assert tasks == [*TASKS, "average", "perplexity"]


# ---------------------------------------------------------------------------------------------- table


def _table_cells(table: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and body rows (keyed by setting) of a Markdown table."""
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()]
    assert set(lines[1][0]) <= {"-", ":"}
    return lines[0], {line[0]: line for line in lines[2:]}


def test_results_table_places_known_values(rows, summary):
    expected = expected_summary(rows)
    header, body = _table_cells(plots.results_table(summary))
    assert list(body) == ["full", "tca@tau0.8", "tca@tau0.9", "snapkv@0.2", "snapkv@0.5", "streaming@0.3"]
    score = expected[("tca", "tca@tau0.9", "average", 4096)]["score"]
    kv = expected[("snapkv", "snapkv@0.5", "average", 1024)]["kv_fraction"]
    ppl = expected[("snapkv", "snapkv@0.2", "perplexity", 4096)]["score"]
    full_ppl = expected[("full", "full", "perplexity", 4096)]["score"]
    assert body["tca@tau0.9"][header.index("score 4K")] == f"{score:.1f}"
    assert body["snapkv@0.5"][header.index("KV 1K")] == f"{kv:.2f}"
    assert body["snapkv@0.2"][header.index("PPL ratio 4K")] == f"{ppl / full_ppl:.3f}"
    assert body["full"][header.index("PPL ratio 1K")] == "1.000"


def test_results_table_length_filter_and_no_perplexity():
    summary = plots.summarize(make_rows(perplexity=False))
    header, _ = _table_cells(plots.results_table(summary, lengths=[4096]))
    assert header == ["setting", "score 4K", "KV 4K"]


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
    assert plots.perplexity_plot(plots.summarize(make_rows(perplexity=False)), empty) is False
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
    assert json.loads(written[0].read_text()) == plots.summarize(rows)
    assert written[-1].read_text() == plots.results_table(plots.summarize(rows))


def test_import_does_not_load_matplotlib():
    import subprocess
    import sys

    code = "import sys, tca.eval.plots; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
