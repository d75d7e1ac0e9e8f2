"""Selection with importance options on a GPU: the reference against the kernels' ranking path.

    python benchmarks/probes/options_selection.py        # one GPU, under a minute

Gemma 3 270M's attention shapes (4 query heads on 1 KV head, head dim 256, bf16, 64 observation
queries) and the bundled profile's configuration (observation_max 1, continuation 0.9, window
1024), random inputs, uniform budgets. Per length: the wall time of one selection, synchronised
(host work and syncs included, as a prefill pays them), median of 20 after warm-up, for the
reference (``reference.BACKEND.select``) and the Triton backend (importance in PyTorch, ranking
and top-t by kernels); and whether their indices agree.
"""

import statistics
import time
from functools import partial

import torch

from tca.core.budgets import mu_for_share
from tca.core.config import TCAConfig
from tca.ops import reference
from tca.ops.triton import TritonBackend


def wall_ms(call, repeats: int = 20) -> float:
    """Median synchronised wall milliseconds of ``call()`` after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    config = TCAConfig(local_window=1024, observation_max=1.0, continuation=0.9)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {config}")
    for length in (8192, 32768):
        torch.manual_seed(length)
        q = torch.randn(1, 4, 64, 256, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 1, length, 256, device="cuda", dtype=torch.bfloat16)
        mu = torch.full((1,), mu_for_share(0.3, length - 1024, 128), dtype=torch.float64)
        sigma = torch.ones_like(mu)
        args = (q, k, mu, sigma, config, 256**-0.5)
        ref, got = reference.BACKEND.select(*args), TritonBackend().select(*args)
        width = int(ref.counts.max())
        same = torch.equal(ref.counts, got.counts) and torch.equal(ref.indices, got.indices[..., :width])
        ref_ms = wall_ms(partial(reference.BACKEND.select, *args))
        got_ms = wall_ms(partial(TritonBackend().select, *args))
        print(
            f"L {length}: reference {ref_ms:.2f} ms, kernels' ranking {got_ms:.2f} ms; same indices: {same}"
        )


if __name__ == "__main__":
    main()
