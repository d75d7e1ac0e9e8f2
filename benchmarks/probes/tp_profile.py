"""Where a tensor-parallel prefill's time goes (Llama-3.1-8B shapes, random bf16, 10% kept): the
slowest rank's forward time for dense, TCA and TCA without the host history (medians of 3), each
rank's prefill attention alone, and a profiler table of one dense and one TCA prefill on rank 0.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/probes/tp_profile.py 131072

Its output at 74879978 (two H200s) is ``benchmarks/results/tp-profile-nvidia-h200.log``, written by its
predecessor (the same measurements, names cut at 70 characters, chrome traces also written).
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parents[1]))
import e2e  # noqa: E402
import tp  # noqa: E402

import tca  # noqa: E402


def prefill_ms(model, ids, profile_, mode: str) -> float:
    """The slowest rank's wall-clock ms of one prefill (``logits_to_keep=1``): dense, ``tca``, or
    ``tca-nohist`` (``keep_history=False``)."""
    tp.barrier()
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "dense":
            model(ids, logits_to_keep=1)
        else:
            with tca.apply(model, profile_, keep_history=(mode == "tca")):
                model(ids, logits_to_keep=1)
    torch.cuda.synchronize()
    return max(tp.gathered((time.perf_counter() - start) * 1e3))


def main(length: int) -> None:
    tp.init_processes("cuda")
    config = e2e.model_config("llama-3.1-8b", length + 512, tp.SHAPES)
    torch.manual_seed(0)  # the same replicated weights on every rank
    model = tp.build_model(config, "cuda")
    ids = torch.randint(3, 128000, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
    uniform = e2e.uniform_profile(model, 0.1, length)
    first = tp.rank() == 0
    modes = ("dense", "tca", "tca-nohist")
    for mode in modes:  # warm-up: compiles, allocates
        prefill_ms(model, ids, uniform, mode)
    for mode in modes:
        runs = [prefill_ms(model, ids, uniform, mode) for _ in range(3)]
        if first:
            print(f"{mode}: forward ms median {statistics.median(runs):.1f} all {[round(x) for x in runs]}")
    tca_ms = tp.gathered(e2e.tca_attention_ms(model, uniform, ids))
    dense_ms = tp.gathered(e2e.dense_attention_ms(model, ids))
    if first:
        print(f"tca attention ms per rank {[round(a) for a in tca_ms]}; dense {[round(a) for a in dense_ms]}")
    for mode in ("dense", "tca"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            prefill_ms(model, ids, uniform, mode)
        if first:
            print(f"==== {mode}: top by device time")
            table = trace.key_averages().table(sort_by="self_device_time_total", row_limit=30)
            print(table, flush=True)
    tp.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
