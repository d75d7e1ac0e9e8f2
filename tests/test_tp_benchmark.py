"""``benchmarks/tp.py`` end to end on the CPU, and its result file.

The script runs in one process (here), then under ``torchrun`` with 2 gloo ranks (about 30 s on 2
busy cores, mostly the ranks' start-up), on a tiny random Llama (8 query / 4 KV heads, 2 layers) at
256 and 512 tokens, both runs writing the same ``--out``: the file must hold dense and TCA rows of
both world sizes with sane figures, each run's provenance, the checks, and commands that parse with
the script's ``build_parser()``. Merging, the checks' targets and the GPU commands of
docs/multi-gpu.md are checked in this process, without torchrun.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "tp.py"
LENGTHS = (256, 512)
TINY_ARGS = ["--shape", "tiny-llama", "--device", "cpu", "--lengths", "256,512", "--new-tokens", "4"]
tp = load_script("tp")


def torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node world benchmarks/tp.py ARGS`` on CPU ranks (gloo), from the
    repository root; a hang fails after a timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    started = time.perf_counter()
    result = subprocess.run(
        [*command, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=240
    )
    print(f"tp.py under torchrun with {world} ranks: {time.perf_counter() - started:.1f} s")
    return result


def in_this_process(*args: str) -> None:
    """``python benchmarks/tp.py ARGS`` (one process: what torchrun with one process runs) here,
    on one thread as torchrun's ranks are (two threads of a busy 2-core CPU run it 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tp.main(list(args))
    finally:
        torch.set_num_threads(threads)


def test_one_then_two_ranks_write_their_rows_into_one_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tp-cpu.json"
    args = [*TINY_ARGS, "--repeats", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])  # the command the file records
    in_this_process(*args)
    assert capsys.readouterr().out.count("wrote ") == 1
    result = torchrun(2, *TINY_ARGS, "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-6000:]
    assert result.stdout.count("wrote ") == 1, result.stdout  # rank 0 alone prints
    record = json.loads(out.read_text())

    rows = {(r["world_size"], r["L"], r["mode"]): r for r in record["rows"]}
    assert set(rows) == {(w, n, m) for w in (1, 2) for n in LENGTHS for m in ("dense", "tca")}
    for (world, length, mode), row in rows.items():
        where = f"TP{world} {length} {mode}"
        assert row["ttft_ms"] > 0 and row["decode_ms_per_token"] > 0, where
        assert len(row["ttft_ms_runs"]) == len(row["decode_ms_runs"]) == world, where  # --repeats
        assert row["ttft_stream_ms_runs"] == row["ttft_ms_runs"], where  # one stream: the same wait off a GPU
        assert len(row["peak_gib_per_rank"]) == world and row["peak_gib"] == 0.0, where  # no GPU
        assert len(row["kv_bytes_per_rank"]) == world, where
        assert sum(row["kv_bytes_per_rank"]) == row["kv_bytes"] > 0, where
        assert 0 < row["attention_ms"] and 0 < row["amdahl_ttft_ms"], where  # the slowest rank's
        if mode == "dense":
            assert row["kept_fraction"] == row["pairs_fraction"] == 1.0 and row["kept_target"] is None, where
        else:
            assert row["kept_target"] == 0.1 and 0 < row["kept_fraction"] < 1, where
            assert 0 < row["pairs_fraction"] < 1, where
            assert row["kv_bytes"] < rows[world, length, "dense"]["kv_bytes"], where
            assert row["config"]["local_window"] == 128 and row["config"]["block_size"] == 16, where

    assert set(record["runs"]) == {"1", "2"}
    assert record["runs"]["1"]["world_size"] == 1 and record["runs"]["1"]["config"]["repeats"] == 1
    assert record["command"].startswith("torchrun --standalone --nproc_per_node 2 benchmarks/tp.py ")
    assert record["runs"]["1"]["command"].startswith("python benchmarks/tp.py ")
    for command in (record["command"], record["runs"]["1"]["command"]):
        words = shlex.split(command)
        args = tp.build_parser().parse_args(words[words.index("benchmarks/tp.py") + 1 :])
        assert args.out == str(out) and args.shape == "tiny-llama"
    for field in ("commit", "tca", "config", "date", "device", "torch", "transformers", "model_config"):
        assert record.get(field), field

    checks = {(c["L"], c["name"]): c for c in record["checks"]}
    assert set(checks) == {(n, name) for n in LENGTHS for name in [*tp.TARGETS, "tca_over_dense_ttft_stream"]}
    assert all(c["world_size"] == 2 and c["value"] > 0 and c["target"] is None for c in checks.values())
    shown = result.stdout
    assert "check TP2 512 kept 0.1 tca_ttft_tp_speedup:" in shown and "TP1 256 dense None |" in shown


# ---- in this process: merging, the checks, the documented commands ---------------------------------------


def row(world: int, length: int, mode: str, ttft: float, decode: float) -> dict:
    return dict(
        world_size=world,
        L=length,
        mode=mode,
        kept_target=None if mode == "dense" else 0.1,
        ttft_ms=ttft,
        decode_ms_per_token=decode,
    )


def record(world: int, rows: list[dict], **fields) -> dict:
    return (
        dict(command=f"run {world}", world_size=world, shape="tiny-llama", device="NVIDIA H200", rows=rows)
        | fields
    )


def test_a_run_replaces_its_world_size_and_keeps_the_others():
    first = tp.merge(None, record(1, [row(1, 512, "dense", 10, 1), row(1, 512, "tca", 5, 1)]))
    second = tp.merge(first, record(2, [row(2, 512, "dense", 6, 1)]))
    again = tp.merge(second, record(2, [row(2, 512, "tca", 3, 1)], command="run 2 again"))
    assert [(r["world_size"], r["mode"]) for r in again["rows"]] == [(1, "dense"), (1, "tca"), (2, "tca")]
    assert again["runs"]["1"]["command"] == "run 1" and again["runs"]["2"]["command"] == "run 2 again"
    assert list(again["runs"]) == ["1", "2"] and again["command"] == "run 2 again"


def test_an_out_file_of_another_shape_or_device_is_refused_before_any_work(tmp_path):
    out = tmp_path / "tp.json"
    out.write_text(json.dumps(tp.merge(None, record(1, []))))
    assert tp.previous_result(out, "tiny-llama", "NVIDIA H200")["runs"]
    with pytest.raises(SystemExit, match="pass another --out"):
        tp.previous_result(out, "llama-3.1-8b", "NVIDIA H200")
    with pytest.raises(SystemExit, match="pass another --out"):
        tp.previous_result(out, "tiny-llama", "NVIDIA H100 80GB HBM3")
    out.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no tp.py result"):
        tp.previous_result(out, "tiny-llama", "NVIDIA H200")
    assert tp.previous_result(tmp_path / "none.json", "tiny-llama", "NVIDIA H200") is None


def test_the_issue_checks_at_128k_and_ten_percent_for_two_ranks():
    rows = [
        row(1, 131072, "tca", 1000, 40),
        row(2, 131072, "dense", 1500, 30),
        row(2, 131072, "tca", 600, 31),
        row(4, 131072, "dense", 900, 20),
        row(4, 131072, "tca", 300, 18),
    ]
    found = {(c["world_size"], c["name"]): c for c in tp.checks(rows)}
    assert found[2, "tca_ttft_tp_speedup"]["value"] == pytest.approx(1000 / 600)
    assert found[2, "tca_ttft_tp_speedup"]["met"] is True and found[2, "tca_ttft_tp_speedup"]["target"] == 1.6
    assert found[2, "tca_over_dense_ttft"]["value"] == 2.5 and found[2, "tca_over_dense_ttft"]["met"] is True
    assert found[2, "tca_over_dense_decode"]["met"] is False  # 31 ms against dense's 30: slower
    assert found[4, "tca_ttft_tp_speedup"]["value"] == pytest.approx(1000 / 300)
    assert found[4, "tca_ttft_tp_speedup"]["target"] is None  # the issue sets targets for TP=2
    lines = tp.summary({"rows": [], "checks": tp.checks(rows)})
    assert "check TP2 131072 kept 0.1 tca_over_dense_decode: 0.97x (target >= 1x: NOT met)" in lines
    assert (2, "tca_over_dense_ttft_stream") not in found  # rows measured before the stream time was


def test_the_first_token_on_the_models_stream_is_reported_beside_the_target():
    rows = [
        row(1, 131072, "tca", 1000, 40) | dict(ttft_stream_ms=990),
        row(2, 131072, "dense", 1500, 30) | dict(ttft_stream_ms=1500),
        row(2, 131072, "tca", 760, 31) | dict(ttft_stream_ms=740),
    ]
    found = {c["name"]: c for c in tp.checks(rows)}
    assert found["tca_over_dense_ttft"]["met"] is False  # 1500 / 760 = 1.97x: the target's figure
    stream = found["tca_over_dense_ttft_stream"]
    assert stream["value"] == pytest.approx(1500 / 740) and stream["target"] is None and stream["met"] is None


def test_the_documented_gpu_commands_parse_and_write_one_file():
    doc = (ROOT / "docs" / "multi-gpu.md").read_text()
    commands = [
        line for line in doc.splitlines() if "benchmarks/tp.py" in line and "--nproc_per_node" in line
    ]
    worlds = sorted(int(re.search(r"--nproc_per_node (\d+)", line).group(1)) for line in commands)
    assert worlds == [1, 2, 4], commands
    for line in commands:
        words = shlex.split(line.split("&&")[0])
        args = tp.build_parser().parse_args(words[words.index("benchmarks/tp.py") + 1 :])
        assert args.out == "benchmarks/results/tp-nvidia-h200.json" and args.shape == "llama-3.1-8b"
        assert args.lengths == "32768,131072" and args.kept == "0.1"
