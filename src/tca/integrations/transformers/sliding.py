"""A sliding-window layer's prefill under TCA: window attention at O(L x W), not L^2.

transformers runs a sliding-window layer (Gemma 3's 5 of every 6) through SDPA with a sliding mask:
the fused kernels compute every pair of the L x L square and mask all but W of each row, so at 32K
with a 512-token window each sliding layer costs at least what a full layer does. Inside a TCA block
(``tca.apply``, calibration) a sliding layer's prefill on a device in ``DEVICES`` goes instead to
``tca.ops.window_prefill``: TCA's sparse prefill kernel with nothing kept outside the window, the
same attention (a query at position p sees keys p - W + 1 .. p). Its decode steps and any call over a
cached prefix stay transformers' (the cache holds the window only: nothing quadratic to save).
"""

from __future__ import annotations

import torch

from ... import ops

# Where the window kernel replaces transformers' masked SDPA (tests add "cpu": the reference there)
DEVICES = ("cuda",)
# Below this many windows of context the masked square is small and SDPA is left to answer
MIN_WINDOWS = 2


def window_prefill(
    query, key, value, attention_mask, scaling, dropout, sliding_window
) -> torch.Tensor | None:
    """(B, L, H, d) window attention of a sliding layer's prefill, or None where transformers'
    SDPA answers instead (another device, a cached prefix, dropout, a short context, a mask this
    does not read). query (B, H, L, d); key, value (B, G, L, d)."""
    length = key.shape[2]
    if (
        not sliding_window
        or query.device.type not in DEVICES
        or dropout
        or query.shape[2] != length
        or length <= MIN_WINDOWS * sliding_window
    ):
        return None
    if attention_mask is not None and tuple(attention_mask.shape[-2:]) != (length, length):
        return None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ops.window_prefill(query, key, value, sliding_window, scale, first_real_keys(attention_mask))
    return out.transpose(1, 2).contiguous()


def first_real_keys(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) the first non-padding key of each row of a sliding layer's 4D mask (B, 1, L, L), read
    off its diagonal (every token sees itself, padding sees nothing), on the device: no host sync.
    None without a mask. Padding that is not on the left is the managed layers' error to raise
    (``registration.key_start_from_mask``), on the same mask of the same forward."""
    if attention_mask is None:
        return None
    diagonal = torch.diagonal(attention_mask[:, 0], dim1=-2, dim2=-1)  # (B, L), a view
    real = diagonal if diagonal.dtype == torch.bool else diagonal == 0  # an additive mask: 0 where seen
    return real.to(torch.int8).argmax(-1)
