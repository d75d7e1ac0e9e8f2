"""A RULER-style long-context task suite, generated locally and seeded, scored as RULER scores.

Every sample is built from a task name, a tokenizer, a target length in tokens and a seed: the
same three give the same sample. The haystack is real prose from the bundled evaluation books
(never the calibration text): a seeded book, a seeded starting paragraph, whole paragraphs in
book order until the token budget is full (a paragraph too long for what is left is skipped and
later, shorter ones fill the rest). Inserted facts are whole paragraphs of their own placed at
seeded depths drawn uniformly from [0.05, 0.95] of the document.

Tasks (after Hsieh et al. 2024, "RULER"):

- ``niah_single_{number,word,uuid}``: one "special magic" needle, asked for.
- ``niah_multikey``: four needles with different keys, one asked for.
- ``niah_multivalue``: one key with four values at four depths, all asked for.
- ``niah_multiquery``: four needles with different keys, all four asked for.
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of four hops and a
  distractor chain; every variable holding the asked value must be named.
- ``common_words``: a numbered word list (no prose) where ten words occur far more often than
  the others; the ten must be named.
- ``frequent_words``: a text of invented words drawn from a Zipf law; the three most frequent
  (strictly more frequent than the fourth) must be named.
- ``multi_turn_needle``: the needle is in the document of turn 1 (which asks for a summary),
  turn 2 is an unrelated request, turn 3 asks for the needle.
- ``qa_document``: every paragraph of the excerpt carries its number in its book, ``[412] ...``,
  and the question quotes ten consecutive words of one paragraph and asks for that paragraph's
  number. The number is the paragraph's real position in the book, read off the bundled file,
  and the quote's paragraph sits at a seeded depth of a seeded excerpt, so the answer is in the
  excerpt and no model can know it from pretraining (unlike chapter titles of famous novels,
  which a model may remember and which excerpts of 1-2K tokens often do not contain: chapters
  run 2-4K tokens in these books). A quote is used only when it occurs once in the document and
  a number only when it is no substring of another number in the excerpt, so the substring
  scoring cannot be fooled by a neighbouring paragraph's number.

Scoring follows RULER: ``"all"`` (string_match_all) is 100 times the fraction of gold strings
found in the output, ``"part"`` (string_match_part) is 100 when any is found; both ignore case.
Each prompt, all turns rendered with the chat template, stays within ``length`` less
``ANSWER_TOKENS`` per turn, the room the runner needs for its answers, and fills at least 85% of
that from 1024 tokens on. A prose haystack comes from one book, so the prose tasks reach about
85K tokens (SmolLM2's tokenizer; Alice only up to about 31K); longer lengths are a ValueError.

Layout: ``text`` (the bundled prose, token counts, haystack documents), ``needles`` (the
``niah_*`` tasks and ``multi_turn_needle``), ``variable_tracking``, ``aggregation``
(``common_words``, ``frequent_words``) and ``qa`` (``qa_document``); this module names the suite,
dispatches and scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .aggregation import build_common_words, build_frequent_words
from .needles import FIRST_TURN, SECOND_TURN, WORDS, build_multi_turn_needle, build_niah
from .qa import build_qa_document
from .text import ANSWER_TOKENS, DEPTH_RANGE, Built, prompt_limit, prompt_tokens
from .variable_tracking import build_variable_tracking

TASKS: tuple[str, ...] = (
    "niah_single_number",
    "niah_single_word",
    "niah_single_uuid",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "multi_turn_needle",
    "qa_document",
)
FILL_FLOOR = 0.85  # a prompt of length >= 1024 fills at least this share of the tokens it may have

__all__ = [
    "ANSWER_TOKENS",
    "DEPTH_RANGE",
    "FIRST_TURN",
    "SECOND_TURN",
    "TASKS",
    "WORDS",
    "TaskSample",
    "make_sample",
    "prompt_tokens",
    "score",
]


@dataclass
class TaskSample:
    """One sample: the user turns (the last is scored), the gold strings, the metric, fact depths."""

    task: str
    length: int  # target context length in tokens
    seed: int
    turns: list[str]  # user messages in order; turns[-1] is the scored question turn
    answers: list[str]  # gold strings
    metric: str  # "all" (fraction of answers found) or "part" (any answer found)
    depths: list[float]  # relative positions (0..1) of the facts the answer needs; empty if none


# --- the suite -----------------------------------------------------------------------------------


def _build(task: str, tokenizer, rng: random.Random, length: int) -> Built:
    """Dispatch to the builder of ``task``."""
    if task.startswith("niah_"):
        return build_niah(tokenizer, rng, length, task)
    builders = {
        "variable_tracking": build_variable_tracking,
        "common_words": build_common_words,
        "frequent_words": build_frequent_words,
        "multi_turn_needle": build_multi_turn_needle,
        "qa_document": build_qa_document,
    }
    return builders[task](tokenizer, rng, length)


def make_sample(task: str, tokenizer, length: int, seed: int) -> TaskSample:
    """The sample of ``task`` for a target ``length`` in tokens of ``tokenizer`` and ``seed``.

    The same arguments give the same sample; the prompt (all turns, chat template, generation
    prompt) has at most ``length - ANSWER_TOKENS * len(turns)`` tokens and fills most of that.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    rng = random.Random(f"tca-tasks|{task}|{length}|{seed}")
    turns, answers, metric, depths = _build(task, tokenizer, rng, length)
    tokens, limit = prompt_tokens(tokenizer, turns), prompt_limit(length, len(turns))
    if length >= 1024 and tokens < FILL_FLOOR * limit:
        raise ValueError(f"{task} fills only {tokens} of {limit} tokens: the bundled text is too short")
    return TaskSample(task, length, seed, turns, answers, metric, depths)


def score(sample: TaskSample, output: str) -> float:
    """RULER's score of ``output`` (0..100): string_match_all for "all", string_match_part for "part"."""
    text = output.lower()
    found = [answer.lower() in text for answer in sample.answers]
    if sample.metric == "all":
        return 100.0 * sum(found) / len(found)
    if sample.metric == "part":
        return 100.0 if any(found) else 0.0
    raise ValueError(f"unknown metric {sample.metric!r}; known: 'all', 'part'")
