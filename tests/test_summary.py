"""Loading, summarizing and tabulating runner results (``tca.eval.summary``) on synthetic rows with
known values.

Expected summaries are recomputed with plain loops over the raw rows (``synthetic_results``),
independently of ``tca.eval.summary``.
"""

from __future__ import annotations

import json
import random

import pytest
from synthetic_results import SAMPLES, TASKS, expected_summary, make_rows

from tca.eval.summary import load_rows, results_table, summarize


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """The synthetic rows shared by the tests."""
    return make_rows()


@pytest.fixture(scope="module")
def summary(rows) -> list[dict]:
    """The summary of the synthetic rows."""
    return summarize(rows)


# ---------------------------------------------------------------------------------------------- loading


def test_load_rows_skips_truncated_last_line(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows[:10])
    path.write_text(text + "\n" + json.dumps(rows[10])[:37])
    assert load_rows(path) == rows[:10]


def test_load_rows_keeps_complete_last_line_without_newline(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:5]))
    assert load_rows(path) == rows[:5]


def test_load_rows_skips_unreadable_lines_before_the_end_and_reads_on(tmp_path, rows):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{not json\n\n[1, 2]\n" + json.dumps(rows[1]) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 line"):
        assert load_rows(path) == rows[:2]


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
    assert summarize(shuffled) == summary
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
    header, body = _table_cells(results_table(summary))
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
    summary = summarize(make_rows(perplexity=False))
    header, _ = _table_cells(results_table(summary, lengths=[4096]))
    assert header == ["setting", "score 4K", "KV 4K"]
