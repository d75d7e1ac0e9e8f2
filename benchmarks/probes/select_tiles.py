"""Selection kernel tiles at Llama-3.1-8B shapes, 128K tokens, 64 observation queries, 10% kept.

    python benchmarks/probes/select_tiles.py          # on a GPU; prints one line per variant

``launchers.select`` (the two importance kernels, the rank and top-k kernels) at 32 query / 8 KV
heads (TP=1) and 16 / 4 (a TP=2 rank), for each (keys per tile of the partial-sums kernel, warps,
stages) of both importance kernels; each variant's kept indices are compared with the first's
(a different summation order may move a near-tie, so the count of differing entries is printed).
"""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from attention import time_ms  # noqa: E402

from tca.core.budgets import mu_for_share  # noqa: E402
from tca.core.config import TCAConfig  # noqa: E402
from tca.ops.triton import launchers, select_launcher  # noqa: E402

LENGTH, WINDOW, DIM, OBSERVED = 131072, 4096, 128, 64
# (keys per tile, warps, stages); the first is today's default
VARIANTS = [(128, 4, 3), (128, 8, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2), (64, 8, 2), (32, 4, 3)]


def use(block_n: int, warps: int, stages: int) -> None:
    """Make the CUDA selection kernels run with these tiles from now on in this process."""
    select_launcher.SELECT_BLOCK_N["cuda"] = block_n
    select_launcher.SELECT_WARPS, select_launcher.SELECT_STAGES = warps, stages


def main() -> None:
    config = TCAConfig(local_window=WINDOW, block_size=128)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {LENGTH} tokens", flush=True)
    for heads, kv in ((32, 8), (16, 4)):
        generator = torch.Generator(device="cuda").manual_seed(heads)
        q = torch.randn(1, heads, OBSERVED, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        k = torch.randn(1, kv, LENGTH, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        mu = torch.full((kv,), mu_for_share(0.1, LENGTH - WINDOW, 128), dtype=torch.float64)
        sigma = torch.ones_like(mu)
        run = functools.partial(launchers.select, q, k, mu, sigma, config, DIM**-0.5)
        first = None
        for variant in VARIANTS:
            use(*variant)
            selection = run()
            if first is None:
                first = selection
            differ = int((selection.indices != first.indices).sum())
            ms = time_ms(run, graph=False)
            print(
                f"heads {heads}/{kv} keys {variant[0]} warps {variant[1]} stages {variant[2]}: "
                f"{ms:.3f} ms, indices differing from the first {differ}",
                flush=True,
            )


if __name__ == "__main__":
    main()
