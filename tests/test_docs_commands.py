"""Every benchmark and ``tca`` command in the docs' and the README's shell blocks parses with
today's scripts (``build_parser()``), so a GPU session can run them as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_results import parse_command

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """The commands of ``page``'s ```bash blocks that run a benchmark script or the tca CLI, one per
    command (continuation lines joined, comments dropped, ``<sha>``-style placeholders kept)."""
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```$", page.read_text(), flags=re.M | re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command.startswith("#") or not re.search(r"benchmarks/\w+\.py|-m tca\.cli|^tca ", command):
                continue
            found.extend(
                part.strip() for part in command.split("&&") if "benchmarks/" in part or "tca" in part
            )
    return found


CASES = [(page.relative_to(ROOT), command) for page in PAGES for command in commands(page)]


def test_the_gpu_pages_have_commands():
    pages = {str(page) for page, _ in CASES}
    assert {"docs/gemma3.md", "docs/multi-gpu.md"} <= pages


@pytest.mark.parametrize(("page", "command"), CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_a_documented_command_parses_with_todays_script(page, command):
    try:
        parse_command(command)
    except SystemExit as error:
        pytest.fail(f"{page}: does not parse ({error}): {command}")
