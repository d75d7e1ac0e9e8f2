"""``qa_document``: which numbered paragraph of a real excerpt holds a quoted passage.

See ``tca.eval.tasks`` for why the answer is the paragraph's number in its book.
"""

from __future__ import annotations

import random
import re
from itertools import accumulate

from .text import (
    DEPTH_RANGE,
    Built,
    choose_book,
    excerpt,
    paragraph_text,
    paragraph_tokens,
    paragraphs,
    prompt_limit,
    prompt_tokens,
)

QUOTE_WORDS = 10  # qa_document: words quoted from the asked paragraph
MIN_QA_WORDS = 16  # qa_document: a paragraph must be at least this long to be asked about


# --- question answering over a document ----------------------------------------------------------


def _quote(paragraph: str, where: float, document: str) -> str | None:
    """``QUOTE_WORDS`` consecutive words of ``paragraph``, starting nearest the fraction ``where``.

    Only a quote without double quotes that occurs once in ``document`` is returned; None if none.
    """
    spans = [m.span() for m in re.finditer(r"\S+", paragraph)]
    last = len(spans) - QUOTE_WORDS
    if last < 0:
        return None
    preferred = round(where * last)
    for first in sorted(range(last + 1), key=lambda s: (abs(s - preferred), s)):
        quote = paragraph[spans[first][0] : spans[first + QUOTE_WORDS - 1][1]]
        if '"' not in quote and document.count(quote) == 1:
            return quote
    return None


def _qa_target(
    book: str, indices: list[int], sizes: list[int], depth: float, where: float, document: str
) -> tuple[int, str, float] | None:
    """(paragraph index, quote, depth of its middle) of the askable paragraph nearest ``depth``, or None.

    Askable: at least ``MIN_QA_WORDS`` words, a unique quote, a number that is no substring of
    another number in the excerpt.
    """
    labels = [str(i + 1) for i in indices]
    starts = [0, *accumulate(sizes)]
    middles = [(starts[p] + sizes[p] / 2) / starts[-1] for p in range(len(indices))]
    order = sorted(range(len(indices)), key=lambda p: (abs(middles[p] - depth), p))
    for p in order:
        paragraph = paragraphs(book)[indices[p]]
        if len(paragraph.split()) < MIN_QA_WORDS or any(labels[p] in x for x in labels if x != labels[p]):
            continue
        quote = _quote(paragraph, where, document)
        if quote is not None:
            return indices[p], quote, middles[p]
    return None


def _qa_question(quote: str) -> str:
    """The question asking for the number of the paragraph holding ``quote``."""
    return (
        "Each paragraph of the text above begins with its number in the book, in square brackets. "
        f'Which paragraph contains the words "{quote}"? Answer with the paragraph number only.'
    )


def build_qa_document(tokenizer, rng: random.Random, length: int) -> Built:
    """Which numbered paragraph of a real excerpt holds a quoted passage (see the module docstring)."""
    book = choose_book(rng, length)
    depth, where = rng.uniform(*DEPTH_RANGE), rng.random()
    limit = prompt_limit(length, 1)
    placeholder = " ".join(["passage"] * QUOTE_WORDS)
    budget = limit - prompt_tokens(tokenizer, [f"\n\n{_qa_question(placeholder)}"])
    indices = excerpt(tokenizer, rng, book, budget, labelled=True)
    while indices:
        document = "\n\n".join(paragraph_text(book, i, True) for i in indices)
        sizes = [paragraph_tokens(tokenizer, book, i, True) for i in indices]
        target = _qa_target(book, indices, sizes, depth, where, document)
        if target is not None:
            index, quote, placed = target
            turns = [f"{document}\n\n{_qa_question(quote)}"]
            if prompt_tokens(tokenizer, turns) <= limit:
                return turns, [str(index + 1)], "part", [placed]
        indices = indices[:-1]
    raise ValueError(f"length {length} is too short for qa_document")
