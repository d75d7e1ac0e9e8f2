"""Retrieval-head detection: which KV heads copy from far back, and so must keep every token.

Decided here, beyond the paper (docs/choices.md). TCA selects each head's tokens with the last
prompt queries, but a head that copies (an induction or "echo" head) looks at the tokens it
copies only while the answer is being written: on SmolLM2 the heads that read a needle's digits
during decode put 0.3-0.8 of their attention there while the prompt's last query put none, so no
budget chosen from the prompt keeps them (docs/choices.md has the measurements). DuoAttention
(Xiao et al. 2024, arXiv 2410.10819) and RazorAttention (Tang et al. 2024, arXiv 2407.15891)
keep such heads dense; this module finds them without training, with one short forward pass.

The probe: a passage P of the calibration text, then more of that text (longer than the local
window), then P again. A query at the i-th token of the second copy that attends to the first
copy's token i (echo) or i + 1 (induction) is retrieving from beyond its window. A KV head's
retrieval score is the largest, over its query heads, of the mean attention mass the second
copy's queries put on those two source tokens.
"""

from __future__ import annotations

import torch

from .config import TCAConfig
from .softmax import causal_probs

PASSAGE_TOKENS = 256


def probe_ids(ids: torch.Tensor, config: TCAConfig) -> tuple[torch.Tensor, int, int]:
    """The probe built from calibration ids (1, L): passage, filler, passage again.

    Returns (probe (1, 2 * passage + gap), start of the second copy, passage length). The gap
    puts every source token outside the window of its copy's queries.
    """
    gap = config.effective_window + config.block_size
    passage = min(PASSAGE_TOKENS, ids.shape[-1] - gap)
    if passage < 2:
        raise ValueError(
            f"the calibration text has {ids.shape[-1]} tokens; the retrieval probe needs at least "
            f"{gap + 2} (local_window + block_size + 2): pass a longer text."
        )
    source = ids[:, :passage]
    probe = torch.cat([source, ids[:, passage : passage + gap], source], dim=-1)
    return probe, passage + gap, passage


def head_retrieval_scores(
    query: torch.Tensor, key: torch.Tensor, start: int, passage: int, scale: float
) -> torch.Tensor:
    """Retrieval score per KV head for one layer of the probe.

    Args:
        query: (H, L, d) and key: (G, L, d) of the probe, after RoPE; the second copy of the
            passage occupies positions [start, start + passage).
    Returns:
        (G,) float32: per KV head, the max over its query heads of the mean (over the copy's
        queries but its last) softmax mass on the source token and its successor.
    """
    end = start + passage - 1  # the copy's queries but its last
    probs = causal_probs(query[:, start:end], key[:, :end], scale)  # (G, group, passage - 1, end)
    source = torch.arange(passage - 1, device=query.device)  # copy token i <- source token i
    mass = probs[..., source, source] + probs[..., source, source + 1]  # (G, group, passage - 1)
    return mass.mean(-1).amax(-1).cpu()
