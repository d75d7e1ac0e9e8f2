"""The needle benchmark's samples (``benchmarks/needle.py``), made by the task suite's needle code.

Three tasks: ``single`` (one needle, asked for), ``multi`` (three needles with different keys,
one asked for) and ``two_turn`` (one needle in the document of turn 1, which asks for a summary;
turn 2 asks for the needle, on the same cache). Needles, keys, values, questions, the haystack
and the depths are those of the suite's ``niah_*`` tasks (``tca.eval.tasks.needles``): a
7-digit "special magic number" sentence of its own at a seeded depth of a seeded excerpt of a
bundled evaluation book (never the calibration text). The rendered prompt, all turns, stays
within ``length`` less ``ANSWER_TOKENS`` per turn. A sample is correct when the digits appear in
the model's answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .tasks.needles import FIRST_TURN, needle_keys, needle_question, needle_sentence, needle_values
from .tasks.text import Turns, choose_book, haystack_document, seeded_depths

TASKS = ("single", "multi", "two_turn")
NEEDLES = {"single": 1, "multi": 3, "two_turn": 1}  # needles planted per task; one is asked for


@dataclass
class NeedleSample:
    """One prompt: the document (haystack with needles), the question, and the expected digits.

    ``single`` and ``multi`` ask ``question`` after the document in one user message; ``two_turn``
    sends the document with ``first_turn``, then ``question`` alone. ``depths``: each needle's
    share of the document's tokens before it; ``book``: the bundled text the haystack is from.
    """

    task: str
    document: str
    question: str
    answer: str
    depths: list[float] = field(default_factory=list)
    first_turn: str = FIRST_TURN
    book: str = ""

    def turns(self) -> Turns:
        """The user messages, as ``tca.eval.chat.ask`` / ``ask_two_turns`` send them."""
        return _turns(self.task, self.document, self.question, self.first_turn)


def _turns(task: str, document: str, question: str, first_turn: str = FIRST_TURN) -> Turns:
    if task == "two_turn":
        return [f"{document}\n\n{first_turn}", question]
    return [f"{document}\n\n{question}"]


def make_sample(tokenizer, task: str, length: int, seed: int) -> NeedleSample:
    """The seeded sample of ``task`` for a context of ``length`` tokens of ``tokenizer``.

    The same arguments give the same sample.
    """
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; choose from {TASKS}")
    rng = random.Random(f"tca-needle|{task}|{length}|{seed}")
    book = choose_book(rng, length)
    keys = needle_keys(rng, NEEDLES[task])
    numbers = needle_values(rng, "number", keys)
    asked = rng.randrange(len(keys))
    source = "the document I gave you" if task == "two_turn" else "the text above"
    question = needle_question("number", keys[asked], source)
    facts = [needle_sentence("number", key, number) for key, number in zip(keys, numbers, strict=True)]
    depths = seeded_depths(rng, len(keys))
    document, placed = haystack_document(
        tokenizer, rng, book, length, facts, depths, lambda d: _turns(task, d, question)
    )
    return NeedleSample(task, document, question, numbers[asked], placed, book=book)


def score(sample: NeedleSample, output: str) -> float:
    """100 when the expected digits appear in the output, else 0."""
    return 100.0 if sample.answer in output else 0.0
