"""The version is written once (``tca.__version__``); pyproject.toml and the changelog agree with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import tca

ROOT = Path(__file__).parents[1]


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml writes a version: read tca.__version__"
    assert "version" in project["project"].get("dynamic", [])
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tca.__version__"}


def test_the_version_is_a_literal_setuptools_can_read_without_importing():
    """setuptools reads ``attr: tca.__version__`` statically when it is a plain string assignment
    (no import of torch at build time); that string is what ``import tca`` gives."""
    tree = ast.parse((ROOT / "src" / "tca" / "__init__.py").read_text())
    written = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert written == [tca.__version__]


def test_changelog_has_an_entry_for_this_version():
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings and headings[0] == tca.__version__, (
        f"CHANGELOG.md's newest entry is {headings[:1]}, tca.__version__ is {tca.__version__}: "
        "a changed default needs a new version and an entry saying what changed"
    )
