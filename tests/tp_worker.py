"""One rank of the tensor-parallel tests: ``torchrun --nproc_per_node N tests/tp_worker.py FOLDER``.

FOLDER holds the checkpoints and profiles ``test_tensor_parallel.py`` wrote. Each model is loaded
with ``tp_plan="auto"`` as a user would; the rank runs ``tp_scenarios`` under TCA and saves what it
saw to ``FOLDER/<family>-rank<r>-of<N>.pt``. Then the user errors: a model whose KV heads the
world size does not divide and a profile for another model; each rank saves the message it got.
The Llama scenarios run once more with ``cuda_graphs=True`` (the decode steps through the graph
path's static step, uncaptured on the CPU).
A rank that hangs is caught by the process group's timeout and the test's.
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import tp_scenarios  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tca.core.profile import Profile  # noqa: E402
from tca.integrations.transformers import apply  # noqa: E402


def load(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():  # tp_plan= is deprecated for DistributedConfig; users still pass it
        warnings.simplefilter("ignore", FutureWarning)
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()


def error_of(model: torch.nn.Module, profile: Profile, **options) -> str:
    """The message ``tca.apply(model, profile, **options)`` raises (it must raise before any work)."""
    try:
        with apply(model, profile, **options):
            pass
    except ValueError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def main(folder: Path, seed: int) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    models = {}
    for family in tp_scenarios.FAMILIES:
        model = models[family] = load(folder / family)
        result = tp_scenarios.tca_scenarios(model, Profile.load(folder / f"{family}.json"), seed)
        result["calibration"] = tp_scenarios.calibration(model, seed)
        result["snapkv"] = tp_scenarios.method_scenario(model, seed)
        torch.save(result, folder / f"{family}-rank{rank}-of{world}.pt")
    graphs = tp_scenarios.tca_scenarios(models["llama"], Profile.load(folder / "llama.json"), seed, True)
    torch.save(graphs, folder / f"llama-graphs-rank{rank}-of{world}.pt")
    errors = {
        "world_size": error_of(load(folder / "odd"), Profile.load(folder / "odd.json")),
        "profile": error_of(models["qwen2"], Profile.load(folder / "llama.json")),
    }
    torch.save(errors, folder / f"errors-rank{rank}-of{world}.pt")
    dist.barrier()  # every rank got here: none is stuck in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
