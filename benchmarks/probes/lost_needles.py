"""CPU probe: the (task, seed) prompts at 4K where TCA (threshold 0.1, 16 observation queries)
lost a needle that full attention found in the development run
(benchmarks/results/archive/eval-2026-11-25-development.jsonl), answered under each variant.

    python benchmarks/probes/lost_needles.py [VARIANT ...]     # default: full and every variant

Run on 2026-11-25 in two invocations: full thr0.1 thr0.05 obs64
(benchmarks/results/lost-needles-cpu.log), then thr0.05+obs64 (lost-needles-combined-cpu.log).
"""

import dataclasses
import sys
import time

import torch

from tca.bundled.models import load_model
from tca.eval.runner import Evaluator
from tca.eval.spec import EvalSpec, Setting

torch.set_num_threads(2)
model, tok = load_model("smollm2")
length = 4096
pairs = [("niah_single_uuid", s) for s in (9, 10, 11, 13, 19)] + [
    ("niah_single_word", s) for s in (1, 2, 11, 16)
]
spec = EvalSpec(methods=["full", "tca"], tasks=["niah_single_uuid"], lengths=[length], samples=1)
ev = Evaluator(model, tok, spec, progress=False)
ev.profile(0.9)
calibration = ev._calibrations[()]  # the measured passes (tca.integrations.transformers.Calibration)
config = calibration.config
variants = {
    "thr0.1": config.replace(tau=0.9, retrieval_threshold=0.1, observation_queries=16),
    "thr0.05": config.replace(tau=0.9, retrieval_threshold=0.05, observation_queries=16),
    "obs64": config.replace(tau=0.9, retrieval_threshold=0.1, observation_queries=64),
    "thr0.05+obs64": config.replace(tau=0.9, retrieval_threshold=0.05, observation_queries=64),
}
samples = [ev.sample(t, length, s) for t, s in pairs]
for name in sys.argv[1:] or ["full", *variants]:
    t0 = time.time()
    if name == "full":
        rows = ev._answers(Setting("full"), samples)
    else:
        ev._profiles[(0.9, ())] = dataclasses.replace(calibration, config=variants[name]).profile()
        rows = ev._answers(Setting("tca", tau=0.9), samples)
    print(
        name,
        [int(r["score"]) for r in rows],
        round(rows[0]["kv_fraction"], 3),
        f"{time.time() - t0:.0f}s",
        flush=True,
    )
    for r in rows:
        print("   ", repr(r["answer"][:70]), flush=True)
