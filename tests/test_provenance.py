"""What every result file records about where it came from (``tca.eval.provenance``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import tca
from tca.core.config import TCAConfig
from tca.eval.provenance import REPO, command_line, eval_config, git_commit, plain, provenance
from tca.eval.spec import EvalSpec


def test_the_repository_root_holds_this_package():
    assert (REPO / "src" / "tca" / "__init__.py").is_file()
    assert (REPO / "benchmarks").is_dir()


def test_commit_is_this_checkouts_head():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    commit, dirty = git_commit()
    assert commit == head.stdout.strip() and len(commit) == 40
    assert isinstance(dirty, bool)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            [str(REPO / "benchmarks" / "needle.py"), "--samples", "3"],
            "python benchmarks/needle.py --samples 3",
        ),
        (
            [str(REPO / "src" / "tca" / "cli" / "__main__.py"), "eval", "--out", "r.jsonl"],
            "tca eval --out r.jsonl",
        ),
        (["/usr/local/bin/tca", "calibrate", "--out", "p.json"], "tca calibrate --out p.json"),
        (["/elsewhere/run.py", "--set", "tau=0.95 x"], "python /elsewhere/run.py --set 'tau=0.95 x'"),
    ],
)
def test_command_line_is_what_one_types_from_the_repository_root(argv, expected):
    assert command_line(argv) == expected


def test_plain_turns_configs_paths_and_tuples_into_json():
    config = TCAConfig(tau=0.8, local_window=256, block_size=32)
    value = plain({"tca": config, "out": Path("a/b.json"), "options": (("alpha", 0.5),), "chunks": {8192: 4}})
    assert value == {
        "tca": config.to_dict(),
        "out": "a/b.json",
        "options": [["alpha", 0.5]],
        "chunks": {"8192": 4},
    }
    json.dumps(value)


def test_provenance_records_command_commit_version_and_config(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "needle.py"), "--samples", "2"])
    args = SimpleNamespace(samples=2, out=Path("x.json"))
    info = provenance("cpu", config={"args": vars(args), "tca": TCAConfig()})
    assert info["command"] == "python benchmarks/needle.py --samples 2"
    assert info["tca"] == tca.__version__
    assert info["backend"] == "reference"  # no CUDA tensors, no Triton
    assert info["config"] == {"args": {"samples": 2, "out": "x.json"}, "tca": TCAConfig().to_dict()}
    assert set(info) >= {"commit", "dirty", "date", "device", "torch", "transformers", "python"}
    json.dumps(info)


def test_eval_config_resolves_each_setting():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    spec = EvalSpec(only=["full", "tca@tau0.7,retrieval_threshold=off", "snapkv@0.3"], calibration="docs")
    resolved = eval_config(spec, model)
    assert resolved["eval"]["only"] == spec.only and resolved["eval"]["calibration"] == "docs"
    expected_tca = TCAConfig(tau=0.7, local_window=512, block_size=64, retrieval_threshold=None).to_dict()
    assert resolved["settings"] == {
        "full": {"method": "full"},
        "tca@tau0.7,retrieval_threshold=off": {
            "method": "tca",
            "tau": 0.7,
            "calibration": "docs",
            "tca": expected_tca,
        },
        "snapkv@0.3": {"method": "snapkv", "kept_fraction": 0.3},
    }
