"""How far a TCA prefill moves a model's predictions from dense attention, on real text.

For a window of tokens: per-position negative log-likelihood under dense and under TCA, and
KL(dense || tca) of the last position's next-token distribution. Logits are formed in chunks
of positions so a 4K window never holds a (L, vocab) matrix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..bundled import texts
from ..core.calibration import leads_with_bos
from ..core.profile import Profile
from ..integrations.transformers import apply


@dataclass
class WindowScores:
    """Per-position NLL (L - 1,) and the last position's log-probabilities (vocab,)."""

    nll: np.ndarray
    last_logprobs: torch.Tensor


def _hidden_and_nll(model, input_ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (n, L, D) and the NLL of each next token (n, L - 1) for ``input_ids`` (n, L)."""
    input_ids = input_ids.to(model.device)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    nll = torch.empty(input_ids.shape[0], input_ids.shape[1] - 1, device=hidden.device)
    for row in range(input_ids.shape[0]):  # logits in chunks: never an (L, vocab) matrix
        for lo in range(0, input_ids.shape[1] - 1, chunk):
            hi = min(lo + chunk, input_ids.shape[1] - 1)
            logits = model.lm_head(hidden[row, lo:hi]).float()
            nll[row, lo:hi] = F.cross_entropy(logits, input_ids[row, lo + 1 : hi + 1], reduction="none")
    return hidden, nll


def token_nll(model, input_ids: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """NLL of each next token (n, L - 1) for a batch of windows ``input_ids`` (n, L)."""
    with torch.no_grad():
        return _hidden_and_nll(model, input_ids, chunk)[1].cpu().numpy()


def score_window(model, input_ids: torch.Tensor, chunk: int = 512) -> WindowScores:
    """NLL of each next token and the last position's log-probabilities for ``input_ids`` (1, L)."""
    with torch.no_grad():
        hidden, nll = _hidden_and_nll(model, input_ids, chunk)
        last = torch.log_softmax(model.lm_head(hidden[0, -1:]).float(), -1)[0]
    return WindowScores(nll=nll[0].cpu().numpy(), last_logprobs=last.cpu())


def prose_windows(tokenizer, texts: dict[str, str], length: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens from real texts, one text after another, at seeded offsets."""
    rng = random.Random(seed)
    tokenized = {
        name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in sorted(texts.items())
    }
    names = [n for n, ids in tokenized.items() if len(ids) >= length]
    if not names:
        raise ValueError(f"no text has {length} tokens")
    windows = []
    for i in range(count):
        ids = tokenized[names[i % len(names)]]
        start = rng.randrange(0, len(ids) - length + 1)
        windows.append(torch.tensor([ids[start : start + length]]))
    return windows


def document_windows(tokenizer, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """``prose_windows`` of the bundled evaluation texts, each read as a document is: led by the BOS
    token when the tokenizer starts texts with it (Gemma's ``<bos>``; SmolLM2 has none)."""
    if not leads_with_bos(tokenizer):
        return prose_windows(tokenizer, texts.evaluation_texts(), length, count, seed)
    bos = torch.tensor([[tokenizer.bos_token_id]])
    windows = prose_windows(tokenizer, texts.evaluation_texts(), length - 1, count, seed)
    return [torch.cat([bos, window], -1) for window in windows]


def compare(dense: WindowScores, sparse: WindowScores) -> dict[str, float]:
    """Last-position KL(dense || sparse) in nats, and NLL sums by quarter and over the second half."""
    kl = float(torch.sum(dense.last_logprobs.exp() * (dense.last_logprobs - sparse.last_logprobs)))
    n = len(dense.nll)
    quarters = np.array_split(np.arange(n), 4)
    out = {"kl_last": kl}
    for q, idx in enumerate(quarters):
        out[f"dense_nll_q{q + 1}"] = float(dense.nll[idx].sum())
        out[f"tca_nll_q{q + 1}"] = float(sparse.nll[idx].sum())
        out[f"tokens_q{q + 1}"] = len(idx)
    half = np.arange(n // 2, n)
    out.update(
        dense_nll_half=float(dense.nll[half].sum()),
        tca_nll_half=float(sparse.nll[half].sum()),
        tokens_half=len(half),
    )
    return out


def evaluate_profile(model, profile: Profile, windows: list[torch.Tensor], dense: list[WindowScores]) -> dict:
    """Fidelity of TCA with ``profile`` over ``windows`` against their dense scores.

    Returns mean last-position KL, perplexity ratios (second half, and each quarter; pooled over
    windows: exp of the mean NLL difference), and the mean kept and pairs fractions.
    """
    rows, kept, pairs = [], [], []
    for ids, dense_scores in zip(windows, dense, strict=True):
        with apply(model, profile) as run:
            sparse = score_window(model, ids)
        rows.append(compare(dense_scores, sparse))
        kept.append(run.stats.kept_fraction)
        pairs.append(run.stats.pairs_fraction)

    def ratio(part: str) -> float:
        diff = sum(r[f"tca_nll_{part}"] - r[f"dense_nll_{part}"] for r in rows)
        return float(np.exp(diff / sum(r[f"tokens_{part}"] for r in rows)))

    return {
        "kl_last_mean": float(np.mean([r["kl_last"] for r in rows])),
        "kl_last_max": float(np.max([r["kl_last"] for r in rows])),
        "ppl_ratio_second_half": ratio("half"),
        "ppl_ratio_by_quarter": [ratio(f"q{q}") for q in range(1, 5)],
        "dense_ppl_second_half": float(
            np.exp(sum(r["dense_nll_half"] for r in rows) / sum(r["tokens_half"] for r in rows))
        ),
        "kept_fraction": float(np.mean(kept)),
        "pairs_fraction": float(np.mean(pairs)),
        "windows": len(rows),
    }
