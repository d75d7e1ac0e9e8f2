"""Zero-copy reads of a host history: a kernel loads the rows it is asked for straight from pinned
host memory, over PCIe, so a new turn moves only the values it attends to, not the whole history.

The history lies in pieces (``HostHistory``'s pinned blocks, (B, G, n_i, d) each). The kernel gets
one piece as its base pointer and every piece's distance from it in elements: the device addresses
come from the driver (``cuPointerGetAttribute``), so it holds whether or not a pinned block's device
address equals its host address.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ...core.transfer import is_pinned, to_device

_DEVICE_POINTER = 3  # CU_POINTER_ATTRIBUTE_DEVICE_POINTER


@triton.jit
def read_rows_kernel(
    base,  # the first piece: every address is an element offset from it
    piece_offsets,  # (P,) int64: each piece's first element, from base
    piece_starts,  # (P,) int64: each piece's first token
    piece_lengths,  # (P,) int64: each piece's tokens
    piece_of,  # (B * G * R,) int64: the piece holding each row
    rows,  # (B * G * R,) int64: token positions; >= past: skipped
    out,  # (B, G, T, d)
    n_rows,
    past,
    n_kv,
    stride_ob,
    stride_og,
    stride_ot,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    head = tl.program_id(0)  # b * G + g
    row = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = row < n_rows
    slot = head.to(tl.int64) * n_rows + row
    position = tl.load(rows + slot, mask=valid, other=0)
    valid = valid & (position >= 0) & (position < past)
    piece = tl.load(piece_of + slot, mask=valid, other=0)
    start = tl.load(piece_starts + piece, mask=valid, other=0)
    length = tl.load(piece_lengths + piece, mask=valid, other=0)
    first = tl.load(piece_offsets + piece, mask=valid, other=0)
    source = first + (head * length + position - start) * HEAD_DIM  # (BLOCK,) int64
    dim = tl.arange(0, DIM_PAD)
    inside = valid[:, None] & (dim[None, :] < HEAD_DIM)
    x = tl.load(base + source[:, None] + dim[None, :], mask=inside)
    target = (head // n_kv) * stride_ob + (head % n_kv) * stride_og + position * stride_ot
    tl.store(out + target[:, None] + dim[None, :], x, mask=inside)


def read_rows(pieces: list[torch.Tensor], rows: torch.Tensor, out: torch.Tensor) -> None:
    """``reference.read_rows``'s contract in one launch: pinned host pieces read in place by the
    device (or, under the Triton interpreter, host pieces by the host)."""
    if not pieces or rows.numel() == 0:
        return
    batch, n_kv, n_rows = rows.shape
    head_dim = out.shape[-1]
    assert out.stride(-1) == 1 and all(p.is_contiguous() and p.dtype == out.dtype for p in pieces)
    lengths = np.array([piece.shape[2] for piece in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    addresses = np.array([_device_address(piece) for piece in pieces], dtype=np.int64)
    size = out.element_size()
    assert ((addresses - addresses[0]) % size == 0).all()
    offsets = (addresses - addresses[0]) // size
    table = to_device(np.stack([offsets, starts, lengths]), torch.int64, out.device)  # (3, P)
    rows = rows.contiguous()
    piece_of = (torch.searchsorted(table[1], rows, right=True) - 1).clamp_min(0)
    block = 64 if head_dim <= 128 else 32
    grid = (batch * n_kv, triton.cdiv(n_rows, block))
    read_rows_kernel[grid](
        pieces[0], table[0], table[1], table[2], piece_of, rows, out, n_rows, int(lengths.sum()), n_kv,
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK=block,
    )  # fmt: skip


def _device_address(tensor: torch.Tensor) -> int:
    """The address a kernel reads ``tensor`` at: the driver's device address of pinned host memory,
    the host address otherwise (the interpreter's). Asked once per tensor object and kept on it (a
    history's pieces are read by every turn)."""
    known = getattr(tensor, "_tca_device_address", None)
    if known is not None:
        return known
    address = ctypes.c_uint64(tensor.data_ptr())
    if is_pinned(tensor):
        pointer, address = address, ctypes.c_uint64()
        status = _driver().cuPointerGetAttribute(ctypes.byref(address), _DEVICE_POINTER, pointer)
        if status != 0:
            raise RuntimeError(f"cuPointerGetAttribute failed ({status}) for a pinned history block.")
    tensor._tca_device_address = address.value
    return address.value


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")
