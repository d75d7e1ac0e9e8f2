"""Every committed result says where it came from, and today's scripts can run its command.

For each JSON under benchmarks/results/ and each provenance record (``*.runs.jsonl``, one line per
`tca eval` process) outside archive/: it has ``command``, ``commit`` (a commit of this repository),
the package version (``tca``) and the resolved configuration (``config``), and its command parses
with the argument parser of the script it names (``build_parser()``). Results that cannot meet
this live in archive/, whose README says why for each file.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from benchmark_scripts import load_script

from tca.cli import build_parser as tca_parser

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARCHIVE = RESULTS / "archive"


def live(pattern: str) -> list[Path]:
    return sorted(p for p in RESULTS.glob(pattern) if ARCHIVE not in p.parents)


def records() -> list[tuple[str, dict]]:
    """(name for messages, record) of every result JSON and every provenance record."""
    out = [(str(p.relative_to(RESULTS)), json.loads(p.read_text())) for p in live("**/*.json")]
    for path in live("**/*.runs.jsonl"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            out.append((f"{path.relative_to(RESULTS)}:{number}", json.loads(line)))
    return out


RECORDS = records()


def parse_command(command: str) -> None:
    """Parse ``command`` with the parser of the script or CLI it runs (SystemExit if it does not)."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        script = re.search(r"(?:^|/)benchmarks/(\w+)\.py$", word)
        if script:
            load_script(script.group(1)).build_parser().parse_args(words[i + 1 :])
            return
        if word == "tca" or word.endswith(("tca/cli.py", "tca/cli/__main__.py")):
            tca_parser().parse_args(words[i + 1 :])
            return
        if word == "-m" and words[i + 1 : i + 2] == ["tca.cli"]:
            tca_parser().parse_args(words[i + 2 :])
            return
    raise AssertionError("names no benchmark script and not the tca command")


def known_commit(commit: str) -> bool | None:
    """Whether ``commit`` is in this repository's history (None: not a git checkout)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
    )
    if done.returncode != 0 and b"not a git repository" in done.stderr:
        return None
    return done.returncode == 0


def test_there_are_results_to_check():
    assert len(RECORDS) > 50


@pytest.mark.parametrize(("name", "record"), RECORDS, ids=[name for name, _ in RECORDS])
def test_a_result_records_command_commit_version_and_configuration(name, record):
    missing = [field for field in ("command", "commit", "tca", "config") if not record.get(field)]
    assert not missing, f"{name} has no {', '.join(missing)}: complete it from git history or archive it"
    assert isinstance(record["config"], dict), f"{name}: config is not the resolved configuration"
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]), f"{name}: commit {record['commit']!r}"
    assert known_commit(record["commit"]) in (True, None), f"{name}: commit {record['commit']} is unknown"


@pytest.mark.parametrize(("name", "record"), RECORDS, ids=[name for name, _ in RECORDS])
def test_a_results_command_parses_with_todays_script(name, record):
    try:
        parse_command(record["command"])
    except (SystemExit, AssertionError) as error:
        pytest.fail(f"{name}: its command does not parse with today's script ({error}): {record['command']}")


def test_every_answer_file_has_its_provenance_record_beside_it():
    answers = [p for p in live("**/*.jsonl") if not p.name.endswith(".runs.jsonl")]
    assert answers
    lacking = [str(p.relative_to(RESULTS)) for p in answers if not Path(f"{p}.runs.jsonl").is_file()]
    assert not lacking, f"answers with no provenance record (<file>.runs.jsonl): {lacking}"


def test_the_archive_says_why_for_every_file():
    named = re.findall(r"`([^`]+)`", (ARCHIVE / "README.md").read_text())
    unexplained = []
    for path in ARCHIVE.rglob("*"):
        if path.is_dir() or path.name == "README.md":
            continue
        relative = path.relative_to(ARCHIVE).as_posix()
        candidates = {
            relative,
            path.name,
            relative.removesuffix(".runs.jsonl"),
            path.name.removesuffix(".runs.jsonl"),
        }
        if not any(
            fnmatch.fnmatch(c, n) or (n.endswith("/") and c.startswith(n)) for c in candidates for n in named
        ):
            unexplained.append(relative)
    assert not unexplained, f"archived files archive/README.md does not explain: {unexplained}"
