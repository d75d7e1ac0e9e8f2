"""Variants of the sparse prefill kernel, alone and inside a model's prefill.

    python benchmarks/probes/prefill_variants.py [--against OLD_KERNELS_PY] [--length N]

One GPU, about 5 minutes at 131072 tokens. Llama-3.1-8B shapes, 10% kept. A variant is a set of
``tca.ops.triton.launchers`` settings; ``--against`` adds the kernels of another ``kernels.py``
(say ``git show <commit>:src/tca/ops/triton/kernels.py``) as a variant. Alone: ``sparse_prefill``
on random inputs at a TP=2 rank's heads (16 query, 4 KV) and at one GPU's (32, 8), every variant
timed twice, interleaved, with the largest difference between its output and the default's. In
the model: the default, the variant fastest alone (when it beats the default by more than 1%) and
the ``--against`` kernels take turns, three TCA prefills each, on a random-weight model
(``benchmarks/e2e.py``'s, timed per call as ``kernel_gap.py`` does, clocks sampled), for the whole
model and for one with a TP=2 rank's widths (16 query heads, 4 KV heads, MLP 7168: a rank's work
without its all-reduces). The SM clock of a prefill is power-limited, so in-model times are the
ones that count (``NOTES-kernels.md``). Its log is ``results/prefill-variants-nvidia-h200.log``;
run 1 there timed settings since removed (the accumulator passed into the PV product, per-loop warp
specialisation: no effect on the output or the time).
"""

import argparse
import importlib.util
import statistics
import sys
import traceback
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
import kernel_gap  # noqa: E402
from attention import exact_pairs_fraction, time_ms  # noqa: E402
from prefill_tiles import SCALE, WINDOW, strided  # noqa: E402

from tca.core.budgets import mu_for_share  # noqa: E402
from tca.core.config import TCAConfig  # noqa: E402
from tca.ops.triton import launchers  # noqa: E402

DEFAULT = "default"
VARIANTS = {
    DEFAULT: {},
    "4 stages": {"PREFILL_STAGES": {**launchers.PREFILL_STAGES, "cuda": 4}},
}
BASE = {"kernels": launchers.kernels, "PREFILL_STAGES": launchers.PREFILL_STAGES}


def kernels_from(path: str):
    """The kernels module in the file ``path`` (another version of ``kernels.py``)."""
    spec = importlib.util.spec_from_file_location(f"kernels_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use(variant: str) -> None:
    """Put the launchers' settings to ``variant``'s (the others at their defaults)."""
    for name, value in {**BASE, **VARIANTS[variant]}.items():
        setattr(launchers, name, value)


def alone(length: int) -> dict[str, float]:
    """Each variant's kernel alone at both head counts; returns its median ms at 16/4 heads."""
    at_rank = {}
    for n_heads, n_kv in [(16, 4), (32, 8)]:
        torch.manual_seed(0)
        q, k, v = (strided(h)[:, :, :length] for h in (n_heads, n_kv, n_kv))
        mu = torch.full((n_kv,), mu_for_share(0.1, length - WINDOW, 128), dtype=torch.float64)
        config = TCAConfig(local_window=WINDOW, block_size=128)
        selection = launchers.select(q[:, :, -1:], k, mu, torch.ones_like(mu), config, SCALE)
        call = partial(launchers.sparse_prefill, q, k, v, selection, WINDOW, SCALE)
        print(f"alone, heads {n_heads}/{n_kv}, pairs {exact_pairs_fraction(selection, length, WINDOW):.3f}")
        times, diffs, reference = {name: [] for name in VARIANTS}, {}, None
        for _ in range(2):
            for name in VARIANTS:
                use(name)
                try:
                    out = call().float()
                    times[name].append(time_ms(call))
                except Exception:  # a variant the compiler rejects is reported, not fatal
                    times[name].append(float("nan"))
                    print(f"  {name}: failed\n{traceback.format_exc(limit=2)}", flush=True)
                    continue
                reference = out if reference is None else reference
                diffs[name] = (out - reference).abs().max().item()
        for name, ts in times.items():
            print(f"  {name}: {[round(t, 2) for t in ts]} ms, max |diff| {diffs.get(name, float('nan')):.1e}")
            if n_heads == 16:
                at_rank[name] = statistics.median(ts)
    use(DEFAULT)
    return at_rank


# a TP=2 rank's widths of Llama-3.1-8B: its work without the all-reduces
RANK_WIDTHS = dict(num_attention_heads=16, num_key_value_heads=4, intermediate_size=7168, head_dim=128)


def llama_case(length: int, **fields) -> tuple:
    """(model, ids, profile): e2e's random bf16 Llama-3.1-8B on the GPU with ``fields`` changed in its
    configuration, a random prompt of ``length`` tokens and the uniform profile at 10% kept."""
    config = e2e.model_config("llama-3.1-8b", length + 512)
    for field, value in fields.items():
        setattr(config, field, value)
    model = e2e.random_model(config, "cuda")
    ids = torch.randint(3, 128000, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
    return model, ids, e2e.uniform_profile(model, 0.1, length)


def in_model(length: int, variants: list[str], name: str, **fields) -> None:
    """TCA prefills with each of ``variants`` in turn, three each; wall and kernel sums."""
    model, ids, profile = llama_case(length, **fields)
    walls, kernels = {v: [] for v in variants}, {v: [] for v in variants}
    for variant in variants:  # warm-up: compiles each
        use(variant)
        kernel_gap.forward(model, ids, profile, drain=False, repeats=0)
    for _ in range(3):
        for variant in variants:
            use(variant)
            run = kernel_gap.forward(model, ids, profile, drain=False, repeats=0)
            walls[variant].append(run["wall"])
            kernels[variant].append(sum(run["kernel"]))
            print(
                f"  {name}, {variant}: wall {run['wall']:.0f} ms, kernel sum {sum(run['kernel']):.0f} ms; "
                f"{run['clocks']}",
                flush=True,
            )
    for variant in variants:
        print(
            f"in model, {name}, {variant}: wall median {statistics.median(walls[variant]):.0f} ms, "
            f"kernel sum median {statistics.median(kernels[variant]):.0f} ms",
            flush=True,
        )
    use(DEFAULT)
    del model
    torch.cuda.empty_cache()


def main(length: int) -> None:
    """Every variant alone, then the default and the fastest one in the model."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, length {length}", flush=True)
    at_rank = alone(length)
    best = min((ms, name) for name, ms in at_rank.items() if ms == ms)[1]
    variants = [DEFAULT] + ([best] if at_rank[best] < 0.99 * at_rank[DEFAULT] else [])
    variants += [name for name in VARIANTS if name.startswith("kernels of") and name not in variants]
    print(f"in the model: {variants}", flush=True)
    in_model(length, variants, "one GPU (32/8 heads)")
    in_model(length, variants, "a TP=2 rank's widths (16/4 heads)", **RANK_WIDTHS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", help="another kernels.py to time as a variant")
    parser.add_argument("--length", type=int, default=131072)
    args = parser.parse_args()
    if args.against:
        VARIANTS[f"kernels of {Path(args.against).name}"] = {"kernels": kernels_from(args.against)}
    main(args.length)
