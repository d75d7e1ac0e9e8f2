"""The document and question ``tca generate`` uses when given none.

The document is the opening of *The War of the Worlds* (H. G. Wells, 1898; public domain, see
``data/texts/LICENSES.md``), cut at a paragraph boundary after ``DEMO_CHARS`` characters (about
2,500 SmolLM2 tokens), with one planted sentence, ``DEMO_FACT``, inserted at a paragraph
boundary chosen by a seeded draw from the middle 30% of the excerpt. The question asks for the
planted passcode: its answer is in exactly one sentence deep inside the document, outside the
local window, so a correct answer shows that TCA kept the tokens that matter. A planted fact is
used rather than a question about the novel so that the answer cannot come from what the model
learnt in training, and can be checked (``DEMO_ANSWER``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .texts import read_text

DEMO_SOURCE = "wells_war_of_the_worlds.txt"
DEMO_CHARS = 12_000
DEMO_SEED = 0
DEMO_ANSWER = "7351"
DEMO_FACT = f"The passcode to the observatory at Ottershaw is {DEMO_ANSWER}."
DEMO_QUESTION = "What is the passcode to the observatory at Ottershaw?"


@dataclass(frozen=True)
class Document:
    """A document, a question about it, and the expected answer (None when unknown)."""

    text: str
    question: str
    answer: str | None = None
    source: str = ""


def plant(text: str, sentence: str, seed: int = DEMO_SEED) -> str:
    """Insert ``sentence`` as its own paragraph at a paragraph boundary in the middle 30% of ``text``.

    The boundary is drawn with ``random.Random(seed)``: the same seed gives the same document.
    """
    boundaries = [i for i in range(len(text)) if text.startswith("\n\n", i)]
    middle = [i for i in boundaries if 0.35 * len(text) <= i <= 0.65 * len(text)] or boundaries
    if not middle:
        return f"{text}\n\n{sentence}"
    at = random.Random(seed).choice(middle)
    return f"{text[:at]}\n\n{sentence}{text[at:]}"


def excerpt(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, cut back to the last paragraph boundary."""
    head = text[:chars]
    cut = head.rfind("\n\n")
    return head[:cut] if cut > chars // 2 else head


def demo_document() -> Document:
    """The bundled long document with its planted passcode, the question, and the answer."""
    text = plant(excerpt(read_text(DEMO_SOURCE), DEMO_CHARS), DEMO_FACT)
    source = f"{DEMO_SOURCE} (first {DEMO_CHARS:,} characters, a passcode planted at seed {DEMO_SEED})"
    return Document(text=text, question=DEMO_QUESTION, answer=DEMO_ANSWER, source=source)
