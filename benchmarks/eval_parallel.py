"""Run a `tca eval` grid as several processes on one host's GPUs, each setting in one process.

    python benchmarks/eval_parallel.py --gpus 2 --per-gpu 2 --out-dir $OUT/eval --seconds 540 \
        --settings full tca@tau0.9 snapkv@0.1 ... -- --device cuda --dtype bfloat16 --lengths 2048 4096

SmolLM2-sized models leave an H100 mostly idle (each decode step is kernel launches and
Python), so processes sharing a GPU add up. Settings are dealt to the processes by estimated
cost (longest first); each process writes ``shard-<i>.jsonl`` and ``shard-<i>.log`` under
``--out-dir`` and resumes from them when run again. At ``--seconds`` every process is stopped;
whole batches already written are kept (``benchmarks/eval_report.py`` merges the shards).
``--seed-rows`` continues an earlier run: each shard starts with that run's rows of its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

COST = {"full": 1.0, "tca": 1.6}  # relative time of one setting; baselines 1.3 (measured on the H100)


def deal(settings: list[str], workers: int) -> list[list[str]]:
    """Settings split over ``workers`` lists, longest first onto the least loaded (keeps input order
    within a list)."""
    loads, shards = [0.0] * workers, [[] for _ in range(workers)]
    order = sorted(range(len(settings)), key=lambda i: -COST.get(settings[i].split("@")[0], 1.3))
    for i in order:
        w = loads.index(min(loads))
        shards[w].append(i)
        loads[w] += COST.get(settings[i].split("@")[0], 1.3)
    return [[settings[i] for i in sorted(shard)] for shard in shards if shard]


def seed_rows(source: Path, target: Path, settings: set[str]) -> None:
    """Copy the complete lines of ``source`` whose setting is in ``settings`` to ``target``."""
    with source.open() as rows, target.open("w") as out:
        for line in rows:
            if line.endswith("\n") and json.loads(line)["setting"] in settings:
                out.write(line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ours, passed = argv[:split], argv[split + 1 :]  # ours, then the arguments of every `tca eval`
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--per-gpu", type=int, default=1, help="processes per GPU")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seconds", type=float, help="stop every process after this long")
    parser.add_argument("--settings", nargs="+", required=True, help="setting keys, e.g. full tca@tau0.9")
    parser.add_argument(
        "--seed-rows", help="JSON lines of an earlier run: each new shard starts with its settings' rows"
    )
    args = parser.parse_args(ours)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from tca.models import load_model

    load_model("smollm2")  # writes the de-quantised cache once, before the processes read it
    started, procs = time.monotonic(), []
    for i, shard in enumerate(deal(args.settings, args.gpus * args.per_gpu)):
        shard_out = out / f"shard-{i}.jsonl"
        if args.seed_rows and not shard_out.exists():
            seed_rows(Path(args.seed_rows), shard_out, set(shard))
        env = os.environ | {"CUDA_VISIBLE_DEVICES": str(i % args.gpus)}
        command = [sys.executable, "-m", "tca.cli", "eval", *passed, "--settings", *shard]
        command += ["--out", str(shard_out)]
        log = (out / f"shard-{i}.log").open("a")
        log.write(" ".join(command) + "\n")
        log.flush()
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        print(f"shard {i} on GPU {i % args.gpus}: {' '.join(shard)}", flush=True)
    while any(p.poll() is None for p in procs):
        if args.seconds is not None and time.monotonic() - started > args.seconds:
            for p in procs:
                p.terminate()
            print(f"stopped after {args.seconds:.0f} s", flush=True)
            break
        time.sleep(2)
    for p in procs:
        p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGTERM)]
    for i in failed:
        print(f"shard {i} failed: see {out / f'shard-{i}.log'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
