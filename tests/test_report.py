"""The README's result tables are the ones benchmarks/report.py writes from the committed results."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_scripts import load_script

report = load_script("report")
README = Path(__file__).parents[1] / "README.md"


def test_readme_tables_are_what_report_py_writes():
    assert report.main(["--check"]) == 0, "README.md's tables differ: run python benchmarks/report.py"


def test_every_table_of_the_results_section_is_written_by_report_py():
    text = README.read_text()
    results = text[text.index("## Results") : text.index("\n## ", text.index("## Results") + 1)]
    outside = report.BLOCK.sub("", results)
    pasted = [line for line in outside.splitlines() if line.startswith("|")]
    assert not pasted, f"tables in README.md's Results pasted by hand, not in a report block: {pasted[:3]}"
    assert {m["name"] for m in report.BLOCK.finditer(results)} == set(report.TABLES)


def test_render_rewrites_only_between_matching_markers(monkeypatch):
    monkeypatch.setattr(report, "TABLES", {"a": lambda: "| new |", "b-2": lambda: "| two |"})
    text = "\n".join(
        ["keep", "<!-- report:a -->", "| old |", "|---|", "<!-- /report:a -->", "middle"]
        + ["<!-- report:b-2 -->", "<!-- /report:b-2 -->", ""]
    )
    assert report.render(text) == "\n".join(
        ["keep", "<!-- report:a -->", "| new |", "<!-- /report:a -->", "middle"]
        + ["<!-- report:b-2 -->", "| two |", "<!-- /report:b-2 -->", ""]
    )
    assert report.render(report.render(text)) == report.render(text)
    with pytest.raises(SystemExit, match="'c'"):
        report.render("<!-- report:c -->\n<!-- /report:c -->")


def test_check_fails_and_write_fixes_a_changed_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text().replace("| 0.62 | 1.94x |", "| 0.62 | 9.99x |"))
    assert report.main(["--check", "--readme", str(readme)]) == 1
    assert report.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == README.read_text()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (239.302, "239"),
        (18.985, "19.0"),
        (7.2779, "7.28"),
        (0.09611, "0.096"),
        (0.12005, "0.120"),
        (0.0604, "0.060"),
    ],
)
def test_milliseconds_keep_three_digits_and_three_decimals_at_most(value, text):
    assert report.milliseconds(value) == text


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("full", "full attention"),
        ("snapkv@0.5", "SnapKV-style, 50%"),
        ("tca@tau0.7", "TCA, tau 0.7"),
        ("tca@tau0.9,retrieval_threshold=0.03", "TCA, tau 0.9, retrieval threshold 0.03 (default)"),
        ("tca@tau0.9,retrieval_threshold=0.05", "TCA, tau 0.9, retrieval threshold 0.05"),
    ],
)
def test_setting_labels(key, label):
    assert report.setting_label(key) == label


def test_ranges():
    assert report.ranges({100, 101, 102, 200, 201, 5}) == "5-5, 100-102, 200-201"
