"""The sparse prefill's window keys read through Hopper's tensor memory accelerator (TMA).

    python benchmarks/probes/window_descriptors.py [--length N]

One GPU, about 4 minutes at 131072 tokens; ``TRITON_INTERPRET=1 ... --check`` on the CPU compares
the variants' outputs with the library's kernel at a small size. The window keys
``[max(p0 - w + 1, start), p_last]`` are the one contiguous run of keys a program reads (the kept
keys are gathered row by row, which Hopper's TMA cannot do), so only there can a descriptor load
replace the pointer loads, and only with descriptor loads does Triton's warp specialisation take a
loop. Variants of ``kernels.sparse_prefill_kernel``, everything but the window's loads unchanged:
- ``window descriptors``: the window's K/V tiles loaded through device-side tensor descriptors
  (``tl.make_tensor_descriptor``, one per program; rows past the context read as zeros and are
  masked as before);
- ``window descriptors, specialised``: the same, the unmasked window loop also warp-specialised
  (``tl.range(..., warp_specialize=True)``).
Timed alone and, when a variant beats the library's kernel by more than 1% alone, in a model's
prefill, with ``prefill_variants.py``'s harness. Log: ``results/window-descriptors-nvidia-h200.log``
(run 1 is this probe). Runs 2 and 3 timed the library with host tensor descriptors instead (no
global allocator needed), 4-D at 62b61fb and 2-D at 475afe2, against its address path: no gain and
1-1.5% slower; the library keeps the addresses (``NOTES-kernels.md``).
"""

import argparse
import sys
import types
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import prefill_variants  # noqa: E402

from tca.ops.triton import kernels  # noqa: E402
from tca.ops.triton.kernels import _online_softmax_tile  # noqa: E402


@triton.jit
def _descriptor_tile(
    q,
    k_desc,
    v_desc,
    acc,
    m_i,
    l_i,
    tile_lo,
    pos,
    window,
    qk_scale,
    cols,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of contiguous window keys from ``tile_lo``, loaded through descriptors."""
    keys = tile_lo + cols
    k = k_desc.load([tile_lo, 0])
    v = v_desc.load([tile_lo, 0])
    visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
    return _online_softmax_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, MASKED, PRECISION)


@triton.jit(do_not_specialize=["context_len", "stride_ib", "stride_ig"])
def sparse_prefill_kernel(
    Q, K, V, Out, Idx, Bounds, Start,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kg, stride_kl, stride_vb, stride_vg, stride_vl,
    stride_ob, stride_oh, stride_ol, stride_ib, stride_ig,
    n_kv, context_len, window, qk_scale,
    GROUP: tl.constexpr, POSITIONS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SPECIALISE: tl.constexpr,
):  # fmt: skip
    """``kernels.sparse_prefill_kernel`` with the window's K/V read through tensor descriptors."""
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_kv
    g = pid_bg % n_kv
    p0 = pid_m * POSITIONS
    p_last = tl.minimum(p0 + POSITIONS, context_len) - 1

    rows = tl.arange(0, ROWS)
    pos = p0 + rows // GROUP
    head = g * GROUP + rows % GROUP
    row_ok = (rows < GROUP * POSITIONS) & (pos < context_len)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)

    b64 = b.to(tl.int64)
    q_ptrs = (
        Q
        + b64 * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + pos[:, None] * stride_ql
        + dims[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kg
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vg

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    no_mask = tl.full([ROWS, BLOCK_N], True, tl.int1)

    bounds = Bounds + (pid_bg * tl.num_programs(0) + pid_m) * 2
    n_all = tl.load(bounds)
    n_last = tl.load(bounds + 1)
    idx_base = Idx + b64 * stride_ib + g.to(tl.int64) * stride_ig
    n_all_tiles = n_all // BLOCK_N * BLOCK_N
    for n in range(0, n_all_tiles, BLOCK_N):
        kv_rows = tl.load(idx_base + n + cols)
        k = tl.load(k_base + kv_rows[:, None] * stride_kl + dims[None, :])
        v = tl.load(v_base + kv_rows[:, None] * stride_vl + dims[None, :])
        acc, m_i, l_i = _online_softmax_tile(q, k, v, acc, m_i, l_i, no_mask, qk_scale, False, PRECISION)
    for n in range(n_all_tiles, n_last, BLOCK_N):
        in_list = n + cols < n_last
        kv_rows = tl.load(idx_base + n + cols, mask=in_list, other=0)
        k = tl.load(k_base + kv_rows[:, None] * stride_kl + dims[None, :])
        v = tl.load(v_base + kv_rows[:, None] * stride_vl + dims[None, :])
        visible = in_list[None, :] & (kv_rows[None, :] <= pos[:, None] - window)
        acc, m_i, l_i = _online_softmax_tile(q, k, v, acc, m_i, l_i, visible, qk_scale, True, PRECISION)

    k_desc = tl.make_tensor_descriptor(k_base, [context_len, HEAD_DIM], [stride_kl, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_base, [context_len, HEAD_DIM], [stride_vl, 1], [BLOCK_N, HEAD_DIM])
    start = tl.load(Start + b)
    lo = tl.maximum(tl.maximum(p0 - window + 1, start), 0)
    n_tiles = tl.cdiv(tl.maximum(p_last + 1 - lo, 0), BLOCK_N)
    first_full = tl.minimum(tl.cdiv(tl.maximum(p_last - window + 1 - lo, 0), BLOCK_N), n_tiles)
    end_full = tl.maximum(tl.minimum((p0 + 1 - lo) // BLOCK_N, n_tiles), first_full)
    for t in range(0, first_full):
        acc, m_i, l_i = _descriptor_tile(
            q, k_desc, v_desc, acc, m_i, l_i, lo + t * BLOCK_N, pos, window, qk_scale, cols, True, PRECISION
        )
    for t in tl.range(first_full, end_full, warp_specialize=SPECIALISE):
        acc, m_i, l_i = _descriptor_tile(
            q, k_desc, v_desc, acc, m_i, l_i, lo + t * BLOCK_N, pos, window, qk_scale, cols, False, PRECISION
        )
    for t in range(end_full, n_tiles):
        acc, m_i, l_i = _descriptor_tile(
            q, k_desc, v_desc, acc, m_i, l_i, lo + t * BLOCK_N, pos, window, qk_scale, cols, True, PRECISION
        )

    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    o_ptrs = (
        Out
        + b64 * stride_ob
        + head[:, None].to(tl.int64) * stride_oh
        + pos[:, None] * stride_ol
        + dims[None, :]
    )
    tl.store(o_ptrs, kernels._cast(out, Out.dtype.element_ty, PRECISION), mask=row_ok[:, None])


class _WithConstants:
    """A kernel launched as ``kernel[grid](*args, **kwargs)`` with extra constexpr arguments."""

    def __init__(self, kernel, **constants):
        self.kernel, self.constants = kernel, constants

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.constants)


def kernels_with(specialise: bool) -> types.SimpleNamespace:
    """The library's kernels module with the descriptor variant as its sparse prefill kernel."""
    prefill = _WithConstants(sparse_prefill_kernel, SPECIALISE=specialise)
    return types.SimpleNamespace(**{**vars(kernels), "sparse_prefill_kernel": prefill})


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the device-side descriptors (Triton asks for it per launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def check() -> None:
    """On the CPU interpreter: each variant's output equals the library kernel's, bit for bit."""
    from tca.core.budgets import mu_for_share
    from tca.core.config import TCAConfig
    from tca.ops.triton import launchers

    seed = 7
    print(f"seed {seed}")
    torch.manual_seed(seed)
    length, window, scale = 300, 64, 64**-0.5
    q, k, v = (torch.randn(2, h, length, 64).to(torch.bfloat16) for h in (8, 2, 2))
    mu = torch.full((2,), mu_for_share(0.2, length - window, 32), dtype=torch.float64)
    config = TCAConfig(local_window=window, block_size=32)
    selection = launchers.select(q[:, :, -1:], k, mu, torch.ones_like(mu), config, scale)
    start = torch.tensor([0, 37])
    expected = launchers.sparse_prefill(q, k, v, selection, window, scale, start)
    for specialise in (False, True):
        launchers.kernels = kernels_with(specialise)
        out = launchers.sparse_prefill(q, k, v, selection, window, scale, start)
        launchers.kernels = kernels
        diff = (out.float() - expected.float()).abs().max().item()
        print(f"specialise={specialise}: max |diff| against the library's kernel {diff:.1e}")
        assert diff == 0.0


def main(length: int) -> None:
    """Both variants alone beside the library's kernel; the best in the model when it wins by 1%."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    prefill_variants.VARIANTS.pop("4 stages")  # timed before: no gain
    prefill_variants.VARIANTS["window descriptors"] = {"kernels": kernels_with(False)}
    prefill_variants.VARIANTS["window descriptors, specialised"] = {"kernels": kernels_with(True)}
    prefill_variants.main(length)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--check", action="store_true", help="compare outputs on the CPU interpreter")
    args = parser.parse_args()
    triton.set_allocator(_scratch)
    check() if args.check else main(args.length)
