"""Every committed needle result's recorded ``command`` still parses with ``benchmarks/needle.py``."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDLE_RESULTS = sorted((ROOT / "benchmarks" / "results").glob("needle-*.json"))
REMOVED_FLAG = "--observation-queries"  # dropped from needle.py in 9f51dd5 (issue 17 archives or restores)


def _needle_parser():
    spec = importlib.util.spec_from_file_location("needle_benchmark", ROOT / "benchmarks" / "needle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("path", NEEDLE_RESULTS, ids=lambda p: p.name)
def test_needle_result_command_parses(path):
    command = json.loads(path.read_text())["command"]
    if REMOVED_FLAG in command:
        pytest.xfail(f"{path.name} records {REMOVED_FLAG}, which needle.py no longer has")
    argv = shlex.split(command)
    script = next(i for i, arg in enumerate(argv) if arg.endswith("needle.py"))
    args = _needle_parser().parse_args(argv[script + 1 :])
    assert args.profile and args.out
