"""The README's code runs as written: its Python blocks parse, and the Python API example, run as a
script on the bundled model, answers the bundled question and prints its statistics."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> dict[str, str]:
    """Each ```python block of the README, keyed by the heading it sits under."""
    blocks, heading = {}, ""
    for part in re.split(r"(^#+ [^\n]*$|^```python\n.*?^```$)", README.read_text(), flags=re.M | re.S):
        if part.startswith("#"):
            heading = part.lstrip("# ").strip()
        elif part.startswith("```python"):
            blocks[heading] = part.removeprefix("```python\n").removesuffix("```")
    return blocks


def test_the_readme_has_the_examples_a_newcomer_needs():
    assert {"Python API", "Your own model, start to end"} <= set(python_blocks())


@pytest.mark.parametrize("heading", sorted(python_blocks()))
def test_every_python_block_parses(heading):
    ast.parse(python_blocks()[heading], filename=f"README.md, {heading}")


def test_the_python_api_example_runs_and_answers(model_cache, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(python_blocks()["Python API"])
    env = dict(os.environ, TCA_CACHE_DIR=str(model_cache[0]))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from tca.bundled.demo import DEMO_ANSWER

    lines = result.stdout.splitlines()
    assert DEMO_ANSWER in lines[0], result.stdout
    kept = float(re.fullmatch(r"kept fraction: ([\d.]+)", lines[1]).group(1))
    ratio = float(re.fullmatch(r"KV cache vs dense: ([\d.]+)", lines[2]).group(1))
    assert 0 < kept < 1 and 0 < ratio < 1, result.stdout
