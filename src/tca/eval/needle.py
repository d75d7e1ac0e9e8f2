"""Needle-in-a-haystack on real prose: single needle, three needles asked for one, and a needle
given in the first turn of a chat and asked for in the second.

A needle is the sentence "The special magic number for <key> is <6 digits>." placed between two
paragraphs of a real text at a seeded depth; the haystack is a seeded excerpt of the bundled
evaluation prose (never the calibration text). A sample is correct when the digits appear in
the model's answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KEYS = (
    "amber harbour",
    "copper lantern",
    "silent orchard",
    "granite bridge",
    "velvet comet",
    "hollow reed",
    "crimson ledger",
    "quiet glacier",
    "paper falcon",
    "iron meadow",
    "linen compass",
    "misty quarry",
)
TASKS = ("single", "multi", "two_turn")


@dataclass
class NeedleSample:
    """One prompt: the document (haystack with needles), the question, and the expected digits."""

    task: str
    document: str
    question: str
    answer: str
    depths: list[float] = field(default_factory=list)
    first_turn: str = "Summarise the first sentence of the document in a few words."


def _needle(key: str, number: str) -> str:
    return f"The special magic number for {key} is {number}."


def haystack(tokenizer, text: str, tokens: int, rng: random.Random) -> list[str]:
    """Paragraphs of ``text`` from a seeded start, about ``tokens`` tokens in all."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    start = rng.randrange(0, max(1, len(paragraphs) // 2))
    chosen, count = [], 0
    for paragraph in paragraphs[start:] + paragraphs[:start]:
        size = len(tokenizer(paragraph, add_special_tokens=False)["input_ids"]) + 2
        if count + size > tokens:
            break
        chosen.append(paragraph)
        count += size
    return chosen


def make_sample(tokenizer, task: str, text: str, tokens: int, seed: int) -> NeedleSample:
    """A seeded sample of ``task`` with a haystack of about ``tokens`` tokens from ``text``."""
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; choose from {TASKS}")
    rng = random.Random(f"{task}-{tokens}-{seed}")
    paragraphs = haystack(tokenizer, text, tokens - 60, rng)
    keys = rng.sample(KEYS, 3 if task == "multi" else 1)
    numbers = [str(rng.randrange(100000, 1000000)) for _ in keys]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in keys)
    for depth, key, number in sorted(zip(depths, keys, numbers, strict=True), reverse=True):
        paragraphs.insert(round(depth * len(paragraphs)), _needle(key, number))
    target = rng.randrange(len(keys))
    question = f"What is the special magic number for {keys[target]} mentioned in the document?"
    return NeedleSample(
        task=task, document="\n\n".join(paragraphs), question=question, answer=numbers[target], depths=depths
    )


def score(sample: NeedleSample, output: str) -> float:
    """100 when the expected digits appear in the output, else 0."""
    return 100.0 if sample.answer in output else 0.0
