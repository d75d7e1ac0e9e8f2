"""GPU probe: what does a first ``generate`` pay to pin the host history's memory?

The host history (``keep_history=True``) copies every layer's prompt K/V into pinned host memory.
PyTorch's caching host allocator keeps freed pinned blocks for reuse, so only a process's first
prompt of a new size pays for pinning (``cudaHostAlloc``). This times that cost for ``--gib`` of
history in blocks of ``--block-mib`` (a layer's keys or values at the length of interest), cold
and warm, under the allocator settings given by ``PYTORCH_CUDA_ALLOC_CONF`` (run it once per
setting, each in a fresh process):

    python benchmarks/probes/pinned_alloc.py --gib 16 --block-mib 256
    PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \\
        python benchmarks/probes/pinned_alloc.py --gib 16 --block-mib 256
    python benchmarks/probes/pinned_alloc.py --gib 16 --block-mib 256 \\
        --at-runtime pinned_use_cuda_host_register:True,pinned_num_register_threads:8

``--at-runtime`` applies the setting from inside the process (``torch.cuda.memory._set_allocator_settings``)
after CUDA is initialised and before anything is pinned, as a library could; every run checks that
a round trip through the pinned blocks (non-blocking copies to the device and back) returns the data.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def pin(blocks: int, numel: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds to allocate ``blocks`` pinned bf16 tensors of ``numel`` elements, and the tensors."""
    start = time.perf_counter()
    tensors = [torch.empty(numel, dtype=torch.bfloat16, pin_memory=True) for _ in range(blocks)]
    return time.perf_counter() - start, tensors


def round_trip(tensors: list[torch.Tensor]) -> None:
    """Random data through every block: non-blocking to the device and back, then compared."""
    source = torch.randn(tensors[0].numel(), dtype=torch.bfloat16)
    for tensor in tensors:
        tensor.copy_(source)
    device = [t.to("cuda", non_blocking=True) for t in tensors]
    torch.cuda.synchronize()
    for tensor in tensors:
        tensor.zero_()
    for tensor, on_device in zip(tensors, device, strict=True):
        tensor.copy_(on_device, non_blocking=True)
    torch.cuda.synchronize()
    assert all(torch.equal(t, source) for t in tensors), "a pinned block lost its data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=16.0)
    parser.add_argument("--block-mib", type=float, default=256.0)
    parser.add_argument("--at-runtime", default=None, help="allocator settings applied in the process")
    args = parser.parse_args()
    torch.cuda.init()
    if args.at_runtime:
        print("host memory before:", torch.cuda.host_memory_stats().get("allocations.current", 0))
        torch.cuda.memory._set_allocator_settings(args.at_runtime)
    numel = int(args.block_mib * 2**20 / 2)
    blocks = max(1, round(args.gib * 1024 / args.block_mib))
    cold, tensors = pin(blocks, numel)
    assert all(t.is_pinned() for t in tensors)
    round_trip(tensors)
    del tensors  # back to the caching host allocator
    warm, tensors = pin(blocks, numel)
    round_trip(tensors)
    setting = args.at_runtime or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "(default)")
    print(
        f"{setting}: {blocks} x {args.block_mib:.0f} MiB pinned: cold {cold:.2f} s "
        f"({args.gib / cold:.1f} GiB/s), warm {warm * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
