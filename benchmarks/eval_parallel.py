"""Run a `tca eval` grid as several processes on one host's GPUs, each setting in one process.

    python benchmarks/eval_parallel.py --gpus 2 --per-gpu 2 --out-dir $OUT/eval --seconds 540 \
        --settings full tca@tau0.9 snapkv@0.1 ... -- --device cuda --dtype bfloat16 --lengths 2048 4096

SmolLM2-sized models leave an H100 mostly idle (each decode step is kernel launches and
Python), so processes sharing a GPU add up. Settings are dealt to the workers by estimated cost
(costliest first); a worker runs its settings one after another, each as a `tca eval` writing
``<setting>.jsonl`` and ``<setting>.log`` under ``--out-dir``, so a run again (on any number of
GPUs) resumes every setting from its own file. At ``--seconds`` every process is stopped; whole
batches already written are kept (``benchmarks/eval_report.py`` merges the files).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

COST = {"full": 1.0, "tca": 1.6}  # relative time of one setting; baselines 1.3 (measured on the H100)


def deal(settings: list[str], workers: int, out: Path) -> list[list[str]]:
    """Settings split over ``workers`` lists, the costliest first onto the least loaded; a setting
    with answers already in ``out`` counts a fifth (keeps input order within a list)."""

    def cost(key: str) -> float:
        return COST.get(key.split("@")[0], 1.3) * (0.2 if (out / f"{key}.jsonl").exists() else 1.0)

    loads, shards = [0.0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(settings)), key=lambda i: -cost(settings[i])):
        w = loads.index(min(loads))
        shards[w].append(i)
        loads[w] += cost(settings[i])
    return [[settings[i] for i in sorted(shard)] for shard in shards if shard]


def work(settings: list[str], gpu: int, passed: list[str], out: Path, deadline: float | None) -> int:
    """Run each setting as its own `tca eval` into ``out/<setting>.jsonl``, one after another, on
    ``gpu``; stop at ``deadline``. Returns 0, or the first failing exit status."""
    env = os.environ | {"CUDA_VISIBLE_DEVICES": str(gpu)}
    for key in settings:
        command = [sys.executable, "-m", "tca.cli", "eval", *passed, "--settings", key]
        command += ["--out", str(out / f"{key}.jsonl")]
        with (out / f"{key}.log").open("a") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            while process.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    process.terminate()
                    process.wait()
                    return 0
                time.sleep(2)
        if process.returncode != 0:
            print(f"{key} failed (exit {process.returncode}): see {out / f'{key}.log'}", flush=True)
            return process.returncode
    return 0


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
    args = parser.parse_args(ours)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from tca.bundled.models import load_model

    load_model("smollm2")  # writes the de-quantised cache once, before the processes read it
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    results: list[int] = []
    threads = []
    for i, shard in enumerate(deal(args.settings, args.gpus * args.per_gpu, out)):
        gpu = i % args.gpus
        print(f"worker {i} on GPU {gpu}: {' '.join(shard)}", flush=True)
        thread = threading.Thread(
            target=lambda s=shard, g=gpu: results.append(work(s, g, passed, out, deadline))
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 1 if any(results) else 0


if __name__ == "__main__":
    sys.exit(main())
