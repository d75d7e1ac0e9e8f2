"""Prose windows for the fidelity measures: exact slices of the bundled texts, read as documents."""

from __future__ import annotations

import pytest
import torch
from seeds import fresh_seed

from tca.bundled import texts
from tca.eval.fidelity import document_windows, prose_windows


class ByteTokenizer:
    """Bytes as token ids (lists, as a tokenizer returns without ``return_tensors``); with
    ``bos_token_id`` it starts every text with it unless told not to, as Gemma's does."""

    def __init__(self, bos_token_id: int | None = None):
        self.bos_token_id = bos_token_id

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = list(text.encode())
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def _is_slice_of_a_text(window: list[int]) -> bool:
    """Whether ``window`` occurs as it is in one of the bundled evaluation texts (bytes)."""
    needle = bytes(window)
    return any(needle in text.encode() for text in texts.evaluation_texts().values())


@pytest.mark.randomised
@pytest.mark.parametrize("length", [1, 97, 1000])
def test_windows_are_exact_slices_of_real_texts_and_replay_with_their_seed(length):
    seed = fresh_seed() % 1000
    windows = prose_windows(ByteTokenizer(), texts.evaluation_texts(), length, 5, seed)
    assert [w.shape for w in windows] == [(1, length)] * 5
    assert all(_is_slice_of_a_text(w[0].tolist()) for w in windows)
    again = prose_windows(ByteTokenizer(), texts.evaluation_texts(), length, 5, seed)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))


@pytest.mark.randomised
def test_document_windows_lead_with_bos_only_where_the_tokenizer_does():
    seed = fresh_seed() % 1000
    plain = document_windows(ByteTokenizer(), 300, 4, seed)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            plain, prose_windows(ByteTokenizer(), texts.evaluation_texts(), 300, 4, seed), strict=True
        )
    )
    with_bos = document_windows(ByteTokenizer(bos_token_id=2), 300, 4, seed)
    for window in with_bos:
        assert window.shape == (1, 300) and window[0, 0] == 2
        assert _is_slice_of_a_text(window[0, 1:].tolist())


def test_a_length_no_text_has_is_named():
    longest = max(len(text.encode()) for text in texts.evaluation_texts().values())
    with pytest.raises(ValueError, match=f"no text has {longest + 1} tokens"):
        prose_windows(ByteTokenizer(), texts.evaluation_texts(), longest + 1, 1, 0)
