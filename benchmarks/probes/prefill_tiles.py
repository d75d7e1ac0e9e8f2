"""Prefill kernel tiles at the per-rank shapes of tensor parallelism (Llama-3.1-8B, 128K, 10% kept).

    python benchmarks/probes/prefill_tiles.py          # on a GPU; prints one line per variant

At TP=2 a rank holds 16 query heads and 4 KV heads, at TP=1 32 and 8. For each shape: dense SDPA,
then ``ops.sparse_prefill`` with each (rows, keys per tile, warps, stages), on the model's strided
(B, L, H, d) layout and on contiguous heads; every output is compared with the first variant's.
The log in ``benchmarks/results/prefill-tiles-nvidia-h200.log`` came from its two predecessors
(one per table), which also tried running each head's query blocks last-first (since removed: it
was slower, 34.0 against 28.0 ms at 16/4 heads).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))
from attention import exact_pairs_fraction, time_ms, use_prefill_tiles  # noqa: E402

from tca.core.budgets import mu_for_share  # noqa: E402
from tca.core.config import TCAConfig  # noqa: E402
from tca.ops.triton import launchers  # noqa: E402

LENGTH, WINDOW, DIM = 131072, 4096, 128
SCALE = DIM**-0.5
# (rows, keys per tile, warps, stages); the first is the v2 default, the second today's
VARIANTS = [
    (128, 128, 8, 2),
    (256, 64, 8, 3),
    (256, 64, 8, 2),
    (128, 128, 8, 3),
    (256, 64, 16, 2),
    (256, 32, 8, 3),
]


def strided(heads: int) -> torch.Tensor:
    """A random bf16 (1, heads, L, d) view of a (1, L, heads, d) tensor, as attention receives it."""
    return torch.randn(1, LENGTH, heads, DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def time_variant(tiles: tuple, q, k, v, selection) -> tuple[float, torch.Tensor]:
    """(ms, output) of ``sparse_prefill`` with ``tiles`` = (rows, keys per tile, warps, stages)."""
    use_prefill_tiles(*tiles)
    out = launchers.sparse_prefill(q, k, v, selection, WINDOW, SCALE)
    return time_ms(lambda: launchers.sparse_prefill(q, k, v, selection, WINDOW, SCALE)), out


def main() -> None:
    for n_heads, n_kv in [(16, 4), (32, 8)]:
        torch.manual_seed(0)
        q, k, v = strided(n_heads), strided(n_kv), strided(n_kv)  # (1, H or G, L, d)
        layouts = {"strided": (q, k, v), "contiguous": (q.contiguous(), k.contiguous(), v.contiguous())}
        config = TCAConfig(local_window=WINDOW, block_size=128)
        mu = torch.full((n_kv,), mu_for_share(0.1, LENGTH - WINDOW, 128), dtype=torch.float64)
        selection = launchers.select(q[:, :, -1:], k, mu, torch.ones_like(mu), config, SCALE)
        pairs = exact_pairs_fraction(selection, LENGTH, WINDOW)
        dense = time_ms(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        )
        print(f"heads {n_heads}/{n_kv}: dense {dense:.2f} ms, pairs {pairs:.3f}", flush=True)
        first = None
        for tiles in VARIANTS:
            for layout, (qq, kk, vv) in layouts.items():
                ms, out = time_variant(tiles, qq, kk, vv, selection)
                first = out if first is None else first
                diff = (out.float() - first.float()).abs().max().item()
                print(
                    f"  {layout:10s} rows/keys/warps/stages {tiles}: {ms:.2f} ms, "
                    f"efficiency {dense * pairs / ms:.3f}, max |diff| {diff:.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
