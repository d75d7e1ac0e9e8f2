"""Run `tca eval` settings on the GPUs of one host: one process per (setting, length, seed range).

    python benchmarks/eval_sharded.py --out-dir OUT --seconds 540 --seed 100 --samples 20 \
        --settings full tca@tau0.9 tca@tau0.9/docs snapkv@0.3 [-- MORE_TCA_EVAL_ARGS...]
    python benchmarks/eval_sharded.py --preset grid --out-dir OUT --seconds 540      # the grid
    python benchmarks/eval_sharded.py --preset confirm --out-dir OUT --seconds 540   # confirmation
    python benchmarks/eval_sharded.py --preset confirm --out-dir OUT --dry-run       # the commands

Each process is ``tca eval --device cuda --dtype bfloat16 --lengths L --samples N/C --seed S
--batch-size 256 --batch-tokens 204800 --settings KEY --calibration KIND --out
OUT/<KEY>-<L>-<S>.jsonl`` plus the arguments after ``--``, with ``TCA_BACKEND=--backend``, and
writes its own JSONL (and ``.log``), so the same ``--out-dir`` resumes every process; a process
whose file already holds all its answers is not started again. ``--chunks`` splits the seeds of
a length over C processes (8K, the costliest, gets the most). A setting ``tca@tau0.9/docs`` runs
TCA calibrated on the bundled docs text (file ``tca@tau0.9+docs-...``). Processes go to the
visible GPUs in turn, costliest first; ``--per-gpu`` caps how many run at once on one GPU (the
rest wait; default: all at once). At ``--seconds`` every process is stopped; whole batches
already written are kept. ``benchmarks/eval_report.py`` merges the files. Each invocation
appends its provenance (command, commit, resolved options, the processes' commands) to
``OUT/eval_sharded.runs.jsonl``.

Presets (the committed runs, ``benchmarks/results/README.md``): ``grid`` is the task-suite grid
of ``eval-2026-11-25`` (seeds 100-119, every method); ``confirm`` the confirmation run of
``eval-2026-11-26`` fixed in docs/choices.md (seeds 200-279, 11 tasks), with TCA's defaults of
then spelled out (``retrieval_threshold=0.05``) beside the variant chosen beforehand (0.03).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 2.0  # how often the driver looks at its processes
DEVICE = ["--device", "cuda", "--dtype", "bfloat16"]
BATCHES = ["--batch-size", "256", "--batch-tokens", "204800"]
BASELINES = ("streaming", "snapkv", "vertical_slash", "flexprefill", "xattention", "topk_last", "random")
CONFIRM_TASKS = [
    "niah_single_number",
    "niah_single_word",
    "niah_single_uuid",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "multi_turn_needle",
    "qa_document",
]
PRESETS = {
    "grid": {
        "seed": 100,
        "samples": 20,
        "settings": [
            "full",
            *(f"tca@tau{tau}" for tau in (0.9, 0.7, 0.5, 0.3)),
            *(f"{method}@{fraction}" for method in BASELINES for fraction in (0.1, 0.3, 0.5)),
            "tca@tau0.9/docs",
            "tca@tau0.9/code",
        ],
        "passed": [],
    },
    "confirm": {
        "seed": 200,
        "samples": 80,
        "settings": [
            "full",
            "tca@tau0.9,retrieval_threshold=0.05",
            "tca@tau0.9,retrieval_threshold=0.03",
            "flexprefill@0.5",
        ],
        "passed": ["--tasks", *CONFIRM_TASKS],
    },
}


@dataclass(frozen=True)
class Job:
    """One `tca eval` process: ``setting`` (``KEY`` or ``KEY/KIND``) at ``length``, ``samples`` seeds
    from ``seed``."""

    setting: str
    length: int
    seed: int
    samples: int

    @property
    def name(self) -> str:
        return f"{self.setting.replace('/', '+')}-{self.length}-{self.seed}"

    def arguments(self, out_dir: Path, passed: list[str]) -> list[str]:
        """The `tca eval` arguments of this process (after ``eval``)."""
        key, _, kind = self.setting.partition("/")
        return [
            *DEVICE,
            *["--lengths", str(self.length), "--samples", str(self.samples), "--seed", str(self.seed)],
            *BATCHES,
            *["--settings", key, "--calibration", kind or "prose"],
            *["--out", str(out_dir / f"{self.name}.jsonl")],
            *passed,
        ]


def plan(
    settings: list[str], lengths: list[int], chunks: dict[int, int], seed: int, samples: int
) -> list[Job]:
    """Every process, costliest first: longest length first, then seed range, then setting."""
    jobs = []
    for length in sorted(lengths, reverse=True):
        count = chunks.get(length, 1)
        if samples % count:
            raise SystemExit(f"--samples {samples} does not split into {count} processes at length {length}")
        per = samples // count
        for first in range(seed, seed + samples, per):
            jobs += [Job(setting, length, first, per) for setting in settings]
    return jobs


def finished(job: Job, arguments: list[str]) -> bool:
    """Whether the job's JSONL already holds every (task, seed) answer it would write."""
    from tca.cli import build_parser
    from tca.eval.runner import read_done
    from tca.eval.spec import Setting

    args = build_parser().parse_args(["eval", *arguments])
    key = Setting.parse(args.settings[0]).key
    wanted = {
        (key, task, job.length, s) for task in args.tasks for s in range(job.seed, job.seed + job.samples)
    }
    return wanted <= read_done(Path(args.out))


def visible_gpus() -> list[str]:
    """The ids to put in each process's ``CUDA_VISIBLE_DEVICES``: this process's visible GPUs."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise SystemExit("no CUDA GPU is visible: eval_sharded.py runs every process on a GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:count] if visible else [str(i) for i in range(count)]


def run(
    jobs: list[tuple[Job, list[str]]],
    gpus: list[str],
    per_gpu: int | None,
    backend: str,
    deadline: float | None,
) -> int:
    """Start each job, in order, on the GPU running the fewest (at most ``per_gpu`` at once on one),
    wait for them all, stop them all at ``deadline``. Returns 0, or 1 if a process failed."""
    environment = os.environ | {"TCA_BACKEND": backend, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    waiting = list(jobs)
    running: list[tuple[str, Job, subprocess.Popen]] = []  # (gpu, job, process)
    failed = False
    while waiting or running:
        if deadline is not None and time.monotonic() > deadline:
            for _, _, process in running:
                process.terminate()
            for _, _, process in running:
                process.wait()
            break
        while waiting:
            load = {gpu: sum(g == gpu for g, _, _ in running) for gpu in gpus}
            gpu = min(gpus, key=load.__getitem__)
            if per_gpu is not None and load[gpu] >= per_gpu:
                break
            job, arguments = waiting.pop(0)
            running.append((gpu, job, start(arguments, environment | {"CUDA_VISIBLE_DEVICES": gpu})))
        for entry in list(running):
            _, job, process = entry
            if process.poll() is not None:
                running.remove(entry)
                if process.returncode != 0:
                    failed = True
                    print(f"{job.name} failed (exit {process.returncode}): see its .log", flush=True)
        time.sleep(POLL_SECONDS)
    return 1 if failed else 0


def start(arguments: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``tca eval ARGUMENTS`` in the background, its output appended to the .log beside its --out."""
    command = [sys.executable, "-m", "tca.cli", "eval", *arguments]
    log_path = Path(arguments[arguments.index("--out") + 1]).with_suffix(".log")
    with log_path.open("a") as log:  # the child keeps its own handle
        log.write(shlex.join(command) + "\n")
        log.flush()
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="the settings, seeds and tasks of a committed run"
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seconds", type=float, help="stop every process after this long")
    parser.add_argument("--seed", type=int, help="first seed")
    parser.add_argument("--samples", type=int, help="samples per task and length, split over --chunks")
    parser.add_argument("--settings", nargs="+", help="setting keys, KEY/KIND to calibrate on another text")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument(
        "--chunks",
        nargs="+",
        default=["2048=1", "4096=2", "8192=4"],
        metavar="LENGTH=COUNT",
        help="processes per (setting, length); a length not named gets 1",
    )
    parser.add_argument("--per-gpu", type=int, help="processes at once per GPU (default: all at once)")
    parser.add_argument("--backend", default="reference", help="TCA_BACKEND of every process")
    parser.add_argument("--dry-run", action="store_true", help="print the processes' commands, run nothing")
    parser.add_argument("passed", nargs="*", metavar="-- TCA_EVAL_ARGS", help="more `tca eval` arguments")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Our options with the preset's filled in; ``passed``: the preset's and the given `tca eval`
    arguments (after ``--``)."""
    args = build_parser().parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for name in ("seed", "samples", "settings"):
        if getattr(args, name) is None:
            if name not in preset:
                raise SystemExit(f"--{name} is needed (or a --preset)")
            setattr(args, name, preset[name])
    args.passed = [*preset.get("passed", []), *args.passed]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    passed = args.passed
    chunks = {int(length): int(count) for length, count in (item.split("=") for item in args.chunks)}
    jobs = plan(args.settings, args.lengths, chunks, args.seed, args.samples)
    commands = [(job, job.arguments(args.out_dir, passed)) for job in jobs]
    if args.dry_run:
        for _, arguments in commands:
            print(shlex.join(["tca", "eval", *arguments]))
        return 0
    from tca.bundled.models import load_model
    from tca.eval.provenance import provenance

    args.out_dir.mkdir(parents=True, exist_ok=True)
    load_model("smollm2")  # writes the de-quantised cache once, before the processes read it
    pending = [(job, arguments) for job, arguments in commands if not finished(job, arguments)]
    config = {"args": vars(args), "processes": [shlex.join(["tca", "eval", *a]) for _, a in commands]}
    with (args.out_dir / "eval_sharded.runs.jsonl").open("a") as log:
        log.write(json.dumps(provenance("cuda", config=config)) + "\n")
    gpus = visible_gpus()
    print(f"{len(pending)} of {len(commands)} processes to run on {len(gpus)} GPUs", flush=True)
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    return run(pending, gpus, args.per_gpu, args.backend, deadline)


if __name__ == "__main__":
    sys.exit(main())
