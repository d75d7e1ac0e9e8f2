"""``variable_tracking``: chains of variable assignments in a prose haystack (RULER's VT)."""

from __future__ import annotations

import random
import string
from itertools import pairwise

from .text import Built, Turns, book_lower, choose_book, haystack_document, seeded_depths

HOPS = 4  # variable tracking: assignments from one variable to the next in each chain


def _variable_names(rng: random.Random, count: int, book: str) -> list[str]:
    """``count`` distinct names of five capital letters, none occurring (in any case) in ``book``."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name.lower() not in book_lower(book):
            names.append(name)
    return names


def _chain(names: list[str], value: int) -> list[str]:
    """The statements of one chain: the first name gets ``value``, each next name the one before."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]


def build_variable_tracking(tokenizer, rng: random.Random, length: int) -> Built:
    """Two chains of ``HOPS`` assignments each in a prose haystack; name every variable of the first."""
    book = choose_book(rng, length)
    names = _variable_names(rng, 2 * (HOPS + 1), book)
    gold, other = names[: HOPS + 1], names[HOPS + 1 :]
    value, distractor = rng.sample(range(10_000, 100_000), 2)
    facts = _chain(gold, value) + _chain(other, distractor)
    depths = sorted(seeded_depths(rng, HOPS + 1)) + sorted(seeded_depths(rng, HOPS + 1))  # chains in order
    preface = "Memorise the chains of variable assignments hidden in the following text."
    question = (
        f"Find all variables that are assigned the value {value} in the text above, directly or through "
        f"other variables. Answer with their names only."
    )

    def turns_of(document: str) -> Turns:
        return [f"{preface}\n\n{document}\n\n{question}"]

    document, placed = haystack_document(tokenizer, rng, book, length, facts, depths, turns_of)
    return turns_of(document), gold, "all", placed[: HOPS + 1]
