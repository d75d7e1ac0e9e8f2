"""Rows of a history held in pieces (on the host), read into a device buffer: the reference."""

from __future__ import annotations

import torch


def read_rows(pieces: list[torch.Tensor], rows: torch.Tensor, out: torch.Tensor) -> None:
    """Write the history's row ``t`` into ``out[b, g, t]`` for every ``t`` in ``rows[b, g]``.

    Args:
        pieces: the history in token order, each (B, G, n_i, d), on any device.
        rows: (B, G, R) int64 positions on ``out``'s device; positions at or past the history's
            length (sum of n_i) are skipped, repeats are allowed.
        out: (B, G, T, d), T >= the history's length; the rows not named are left as they are.
    """
    if not pieces or rows.numel() == 0:
        return
    past = sum(piece.shape[2] for piece in pieces)
    history = torch.cat([piece.to(out.device, non_blocking=True) for piece in pieces], 2)  # (B, G, past, d)
    batch, head, column = torch.nonzero((rows >= 0) & (rows < past), as_tuple=True)
    position = rows[batch, head, column]
    out[batch, head, position] = history[batch, head, position].to(out.dtype)
