"""Is the sparse prefill kernel slower on the model's own inputs than on the sweep's random ones?

    python benchmarks/probes/kernel_in_model.py        # one GPU, about 50 s

Captures layer 0's prefill inputs (Llama-3.1-8B shapes, random bf16 weights, 128K tokens, the
uniform 10% profile: ``benchmarks/e2e.py``'s), then times ``launchers.sparse_prefill`` on them with
the model's selection, selections from one and from 64 of its last queries, and one from random
queries and keys, each on the model's layout and on contiguous heads; and prints each selection's
structure (kept per head, mean run of consecutive kept positions, position deciles). Its output on
an H200 at 0871f56 is ``benchmarks/results/kernel-in-model-nvidia-h200.log``, written by its
first version (the same measurements in one flat script).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import e2e  # noqa: E402
from attention import exact_pairs_fraction, time_ms  # noqa: E402

import tca  # noqa: E402
from tca import ops  # noqa: E402
from tca.core.budgets import mu_for_share  # noqa: E402
from tca.core.config import TCAConfig  # noqa: E402
from tca.ops.triton import launchers  # noqa: E402

L = 131072


class _Captured(Exception):
    """Raised by the capturing hook once layer 0's inputs are held: the forward stops there."""


def layer0_inputs() -> dict:
    """Layer 0's ``ops.sparse_prefill`` arguments in a TCA prefill of the random model at ``L``."""
    model = e2e.random_model(e2e.model_config("llama-3.1-8b", L + 512), "cuda")
    ids = torch.randint(3, 128000, (1, L), generator=torch.Generator().manual_seed(L)).cuda()
    profile = e2e.uniform_profile(model, 0.1, L)
    captured: dict = {}

    def grab(query, key, value, selection, local_window, scale, key_start=None, query_chunk=256):
        captured.update(
            q=query, k=key, v=value, sel=selection, window=local_window, scale=scale, start=key_start
        )
        raise _Captured

    original, ops.sparse_prefill = ops.sparse_prefill, grab
    try:
        with torch.no_grad(), tca.apply(model, profile):
            model(ids, logits_to_keep=1)
    except _Captured:
        pass
    finally:
        ops.sparse_prefill = original
    del model
    torch.cuda.empty_cache()
    return captured


def describe(name: str, selection, window: int) -> None:
    """Kept entries per head, mean run of consecutive kept positions, position deciles (of L)."""
    heads = []
    for row, count in zip(selection.indices[0].cpu(), selection.counts[0].cpu(), strict=True):
        kept = row[: int(count)]
        runs = int((kept[1:] != kept[:-1] + 1).sum()) + 1 if kept.numel() else 1
        deciles = torch.quantile(kept.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        heads.append((int(count), round(kept.numel() / runs, 2), [round(x / L, 2) for x in deciles.tolist()]))
    pairs = exact_pairs_fraction(selection, L, window)
    print(f"{name}: width {selection.indices.shape[-1]}, pairs {pairs:.3f}, per head: {heads}", flush=True)


def kernel_ms(q, k, v, selection, window: int, scale: float, start) -> float:
    """CUDA-graph time of one ``launchers.sparse_prefill``."""
    return time_ms(lambda: launchers.sparse_prefill(q, k, v, selection, window, scale, start))


def main() -> None:
    started = time.time()
    inputs = layer0_inputs()
    q, k, v, window, scale, start = (inputs[n] for n in ("q", "k", "v", "window", "scale", "start"))
    print(
        f"captured in {time.time() - started:.0f} s; q {tuple(q.shape)} strides {q.stride()}, "
        f"k strides {k.stride()}, window {window}, key_start {start}",
        flush=True,
    )
    config = TCAConfig(local_window=window, block_size=128)
    mu = torch.full((k.shape[1],), mu_for_share(0.1, L - window, 128), dtype=torch.float64)
    sigma = torch.ones_like(mu)
    selections = {
        "model": inputs["sel"],
        "model q, 1 query": launchers.select(q[:, :, -1:], k, mu, sigma, config, scale),
        "model q, 64 queries": launchers.select(q[:, :, -64:], k, mu, sigma, config, scale),
        "random q/k, 1 query": launchers.select(
            torch.randn_like(q[:, :, -1:]), torch.randn_like(k), mu, sigma, config, scale
        ),
    }
    layouts = {"model qkv": (q, k, v), "contiguous": (q.contiguous(), k.contiguous(), v.contiguous())}
    for name, selection in selections.items():
        describe(name, selection, window)
        for label, (qq, kk, vv) in layouts.items():
            print(f"   {label}: {kernel_ms(qq, kk, vv, selection, window, scale, start):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
