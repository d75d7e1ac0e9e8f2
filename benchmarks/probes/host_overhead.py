"""GPU probe: where does ``generate()`` under ``tca.apply`` spend time that dense does not?

On a random bf16 model (``benchmarks/e2e.py``'s shapes), at one length and kept share:
1. the host-device synchronisations of one TCA prefill forward and of 16 decode steps, by source
   line (``torch.cuda.set_sync_debug_mode``): a synchronisation per layer stops the host from
   queueing ahead of the GPU, so every layer then pays its launch time on the GPU's clock;
2. torch.profiler tables (self CPU time, and CUDA time) of a dense and a TCA prefill forward,
   and of 8 decode steps of each, with the wall time of each.

    python benchmarks/probes/host_overhead.py --length 8192 --kept 0.1 > probe.txt

Not a benchmark (nothing is committed from it): it says where to look.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parents[1]))
from e2e import model_config, random_model, uniform_profile  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import tca  # noqa: E402


def sync_sites(fn) -> collections.Counter:
    """Synchronisations made while ``fn()`` runs, counted by the innermost tca source line (or 'other')."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = collections.Counter()
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{w.filename.split('/src/')[-1]}:{w.lineno}"] += 1
    return sites


def prefill_into(model, ids, cache) -> None:
    """A prefill of ``ids`` (B, L) into ``cache``."""
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)


def decode_steps(model, cache, steps: int) -> None:
    """``steps`` greedy decode forwards on ``cache`` (batch 1)."""
    token = torch.full((1, 1), 7, device=model.device)
    with torch.no_grad():
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def profiled(label: str, fn, rows: int = 25) -> None:
    """Wall time of ``fn()`` (synchronised), then its profile's top ops by self CPU and by CUDA time."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    wall = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    table = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in table) / 1e3
    gpu = sum(e.self_device_time_total for e in table) / 1e3
    print(f"\n=== {label}: wall {wall:.1f} ms (unprofiled); self CPU {cpu:.1f}, CUDA {gpu:.1f} ms")
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    print(table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--kept", type=float, default=0.1)
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on a tiny config)")
    args = parser.parse_args()
    model = random_model(model_config(args.shape, args.length + 512), args.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.length), generator=generator).to(model.device)
    profile_ = uniform_profile(model, args.kept, args.length)
    prefill = lambda: model(ids, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        prefill()  # warm-up: cuBLAS, SDPA
        with tca.apply(model, profile_) as run:
            cache = run.new_cache()
            prefill_into(model, ids, cache)  # warm-up: Triton compilation
            decode_steps(model, cache, 4)
        device = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
        print(f"{args.shape} L={args.length} kept target {args.kept}, {device}")
        if model.device.type == "cuda":
            with tca.apply(model, profile_) as run:
                cache = run.new_cache()
                prefill_syncs = sync_sites(lambda: prefill_into(model, ids, cache))
                print("syncs of a TCA prefill into a cache:", dict(prefill_syncs))
                decode_syncs = sync_sites(lambda: decode_steps(model, cache, 80))
                print("syncs of 80 TCA decode steps:", dict(decode_syncs))
        profiled("dense prefill", prefill)
        with tca.apply(model, profile_) as run:
            profiled("TCA prefill (no cache)", prefill)
            profiled("TCA prefill + cache", lambda: prefill_into(model, ids, run.new_cache()))
        with tca.apply(model, profile_, keep_history=False) as run:
            profiled("TCA prefill + cache, no history", lambda: prefill_into(model, ids, run.new_cache()))
        cache = DynamicCache()
        prefill_into(model, ids, cache)
        profiled("dense 8 decode steps", lambda: decode_steps(model, cache, 8))
        with tca.apply(model, profile_) as run:
            cache = run.new_cache()
            prefill_into(model, ids, cache)
            profiled("TCA 8 decode steps", lambda: decode_steps(model, cache, 8))


if __name__ == "__main__":
    main()
