"""The one sharding driver of `tca eval` runs (``benchmarks/eval_sharded.py``): the processes it
plans are the ones the committed runs recorded, and its scheduler keeps to --per-gpu."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_script

from tca.cli import build_parser as tca_parser

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"


driver = load_script("eval_sharded")


def planned(argv: list[str]) -> list[list[str]]:
    """The `tca eval` arguments of every process ``eval_sharded.py ARGV`` starts."""
    args = driver.parse(argv)
    chunks = {int(n): int(c) for n, c in (item.split("=") for item in args.chunks)}
    jobs = driver.plan(args.settings, args.lengths, chunks, args.seed, args.samples)
    return [job.arguments(args.out_dir, args.passed) for job in jobs]


def as_run(arguments: list[str]) -> tuple:
    """What a `tca eval` process computes: its parsed options, the output file's name but not its folder."""
    options = vars(tca_parser().parse_args(["eval", *arguments]))
    options["out"] = Path(options["out"]).name
    options.pop("func")
    return tuple(sorted((key, json.dumps(value)) for key, value in options.items()))


def recorded(pattern: str) -> set[tuple]:
    """The runs recorded in the ``.runs.jsonl`` files matching ``pattern`` under benchmarks/results."""
    runs = set()
    for path in sorted(RESULTS.glob(pattern)):
        for line in path.read_text().splitlines():
            words = shlex.split(json.loads(line)["command"])
            runs.add(as_run(words[words.index("eval") + 1 :]))
    assert runs, f"no provenance records match {pattern}"
    return runs


def test_the_tca_rows_of_the_grid_are_exactly_this_drivers_processes():
    # the re-run of every TCA grid row with retrieval threshold 0.03, done by eval_sharded.sh
    argv = ["--out-dir", "/root/tcarows", "--seconds", "520", "--seed", "100", "--samples", "20"]
    argv += ["--settings", "tca@tau0.9", "tca@tau0.7", "tca@tau0.5", "tca@tau0.3"]
    argv += ["tca@tau0.9/docs", "tca@tau0.9/code"]
    assert {as_run(a) for a in planned(argv)} == recorded("eval-2026-11-25/runs/tca/*.runs.jsonl")


def test_the_confirmation_run_is_the_confirm_preset():
    # the committed settings of the confirmation run; its `tca@tau0.9` (0.05 then) is archived,
    # and the preset spells that setting out as tca@tau0.9,retrieval_threshold=0.05
    runs = {as_run(a) for a in planned(["--preset", "confirm", "--out-dir", "/root/confirm"])}
    assert recorded("eval-2026-11-26/runs/*.runs.jsonl") <= runs
    spelled_out = {r for r in runs if ("settings", '["tca@tau0.9,retrieval_threshold=0.05"]') in r}
    assert len(runs) == 4 * len(spelled_out) == 4 * 7


def test_processes_split_the_seeds_and_name_their_files():
    argv = ["--out-dir", "out", "--seed", "200", "--samples", "8", "--settings", "full", "snapkv@0.3/docs"]
    argv += ["--lengths", "2048", "8192", "--", "--tasks", "qa_document"]
    names = [a[a.index("--out") + 1] for a in planned(argv)]
    assert names == [
        f"out/{name}.jsonl"
        for name in (
            *(f"{s}-8192-{seed}" for seed in (200, 202, 204, 206) for s in ("full", "snapkv@0.3+docs")),
            "full-2048-200",
            "snapkv@0.3+docs-2048-200",
        )
    ]
    first = planned(argv)[1]
    assert first[first.index("--calibration") + 1] == "docs" and first[-2:] == ["--tasks", "qa_document"]


def test_samples_that_do_not_split_are_refused():
    with pytest.raises(SystemExit, match="does not split into 4"):
        planned(["--out-dir", "o", "--seed", "0", "--samples", "10", "--settings", "full"])


def test_a_setting_is_needed_without_a_preset():
    with pytest.raises(SystemExit, match="--settings is needed"):
        driver.parse(["--out-dir", "o", "--seed", "0", "--samples", "4"])


def test_a_finished_process_is_not_started_again(tmp_path):
    arguments = planned(["--out-dir", str(tmp_path), "--seed", "3", "--samples", "2", "--settings", "full",
                         "--lengths", "2048", "--", "--tasks", "qa_document", "common_words"])[0]  # fmt: skip
    job = driver.Job("full", 2048, 3, 2)
    out = Path(arguments[arguments.index("--out") + 1])
    rows = [
        {"setting": "full", "task": t, "length": 2048, "seed": s} for t in ("qa_document",) for s in (3, 4)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert not driver.finished(job, arguments)  # common_words is missing
    row = {"setting": "full", "task": "common_words", "length": 2048, "seed": 3}
    out.write_text(out.read_text() + json.dumps(row) + "\n" + json.dumps(row | {"seed": 4}) + "\n")
    assert driver.finished(job, arguments)


def test_scheduler_keeps_to_per_gpu_and_uses_every_gpu(tmp_path, monkeypatch):
    """Processes that record when they ran and on which GPU: never more than per_gpu at once on one."""
    log = tmp_path / "ran.jsonl"

    def start(arguments, env):
        record = f"import json,time;a=time.time();time.sleep(0.5);open({str(log)!r},'a').write("
        record += f"json.dumps([{env['CUDA_VISIBLE_DEVICES']!r},a,time.time()])+'\\n')"
        return subprocess.Popen([sys.executable, "-c", record])

    monkeypatch.setattr(driver, "start", start)
    monkeypatch.setattr(driver, "POLL_SECONDS", 0.05)
    jobs = [(driver.Job("full", 2048, seed, 1), []) for seed in range(6)]
    assert driver.run(jobs, ["3", "5"], 2, "reference", None) == 0
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    # The first four start two per GPU; the last two go to whichever slots free first (timing decides).
    assert len(ran) == 6 and all(sum(g == gpu for g, _, _ in ran) >= 2 for gpu in ("3", "5")), ran
    for gpu, began, _ in ran:  # when each started, how many ran on its GPU
        at_once = sum(g == gpu and start <= began < end for g, start, end in ran)
        assert at_once <= 2, f"{at_once} processes at once on GPU {gpu}"
