"""The layout's two rules, checked on the source: small modules (Triton kernel sources aside), and
an algorithm core that does not import transformers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "tca"
LONGEST = 450
KERNEL_SOURCES = {SRC / "ops" / "triton" / "kernels.py"}
MODULES = sorted(p for p in SRC.rglob("*.py") if p not in KERNEL_SOURCES)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SRC)) for p in MODULES])
def test_a_module_stays_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= LONGEST, (
        f"{path.relative_to(SRC)} has {lines} lines (at most {LONGEST}): split it by concern"
    )


@pytest.mark.parametrize("path", sorted((SRC / "core").rglob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_no_transformers(path):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "transformers" for name in imported), path.name
