"""Needles: "special magic" key-value sentences in a prose haystack, and the tasks that ask for them.

One needle generator for the suite's ``niah_*`` and ``multi_turn_needle`` tasks and for
``tca.eval.needle`` (the compressed-cache needle benchmark).
"""

from __future__ import annotations

import random
import uuid

from .text import Built, Turns, choose_book, haystack_document, seeded_depths

# ordinary English words: keys are two of them ("silver-harbour"), word needles' values one
WORDS = (
    "anchor", "apple", "autumn", "badger", "basket", "beacon", "blanket", "bottle", "breeze", "bridge",
    "bucket", "butter", "cabin", "camel", "candle", "canyon", "carpet", "castle", "cellar", "cherry",
    "chimney", "cinnamon", "clover", "cobalt", "copper", "cotton", "cradle", "crystal", "dragon", "drizzle",
    "falcon", "feather", "fiddle", "forest", "fountain", "garden", "ginger", "glacier", "granite", "hammer",
    "harbour", "harvest", "helmet", "hollow", "honey", "island", "jacket", "jungle", "kettle", "ladder",
    "lantern", "lemon", "lizard", "marble", "meadow", "mirror", "mitten", "monkey", "muffin", "needle",
    "nutmeg", "orange", "orchard", "oyster", "paddle", "pebble", "pepper", "pillow", "planet", "pocket",
    "puzzle", "rabbit", "ribbon", "saddle", "salmon", "satchel", "silver", "spider", "spoon", "squirrel",
    "stable", "teapot", "thimble", "thunder", "timber", "tomato", "trumpet", "tulip", "turnip", "velvet",
    "violin", "walnut", "whistle", "willow", "window", "winter", "wizard", "yellow", "zebra", "zipper",
)  # fmt: skip
FIRST_TURN = "Summarise the first paragraph in one sentence."
SECOND_TURN = "Name one character mentioned in the first paragraph."


def needle_keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct keys of two distinct words, e.g. ``"silver-harbour"``."""
    keys: list[str] = []
    while len(keys) < count:
        key = "-".join(rng.sample(WORDS, 2))
        if key not in keys:
            keys.append(key)
    return keys


def needle_value(rng: random.Random, kind: str, avoid: set[str]) -> str:
    """A seeded needle value of ``kind`` ('number': 7 digits, 'word', 'uuid') not in ``avoid``."""
    while True:
        if kind == "number":
            value = str(rng.randrange(1_000_000, 10_000_000))
        elif kind == "word":
            value = rng.choice(WORDS)
        else:
            value = str(uuid.UUID(int=rng.getrandbits(128)))
        if value not in avoid:
            return value


def needle_values(rng: random.Random, kind: str, keys: list[str]) -> list[str]:
    """One seeded value of ``kind`` per key: distinct, and none a word of a key."""
    avoid = {word for key in keys for word in key.split("-")}
    values: list[str] = []
    for _ in keys:
        values.append(needle_value(rng, kind, avoid | set(values)))
    return values


def needle_sentence(kind: str, key: str, value: str) -> str:
    """The needle sentence stating ``value`` for ``key``."""
    return f"The special magic {kind} for {key} is: {value}."


def needle_question(kind: str, key: str, source: str = "the text above") -> str:
    """The question asking for the one needle of ``key``, mentioned in ``source``."""
    return f"What is the special magic {kind} for {key} mentioned in {source}? Answer with the {kind} only."


def _niah_question(task: str, kind: str, keys: list[str]) -> str:
    """The question asking for the needles of ``keys``."""
    if task == "niah_multivalue":
        return (
            f"What are all the special magic {kind}s for {keys[0]} mentioned in the text above? "
            f"Answer with every one of them."
        )
    if len(keys) > 1:
        listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return (
            f"What are the special magic {kind}s for {listed} mentioned in the text above? "
            f"Answer with the {kind} for each of them."
        )
    return needle_question(kind, keys[0])


def build_niah(tokenizer, rng: random.Random, length: int, task: str) -> Built:
    """The five ``niah_*`` tasks: needles in a prose haystack, asked for by key."""
    kind = {"niah_single_word": "word", "niah_single_uuid": "uuid"}.get(task, "number")
    book = choose_book(rng, length)
    count = 1 if task.startswith("niah_single") else 4
    keys = needle_keys(rng, 1) * count if task == "niah_multivalue" else needle_keys(rng, count)
    values = needle_values(rng, kind, keys)
    depths = seeded_depths(rng, count)
    asked = [rng.randrange(count)] if task == "niah_multikey" else list(range(count))
    question = _niah_question(task, kind, list(dict.fromkeys(keys[i] for i in asked)))
    preface = (
        f"Some special magic {kind}s are hidden in the following text. "
        f"Remember them: you will be asked about them afterwards."
    )
    facts = [needle_sentence(kind, key, value) for key, value in zip(keys, values, strict=True)]

    def turns_of(document: str) -> Turns:
        return [f"{preface}\n\n{document}\n\n{question}"]

    document, placed = haystack_document(tokenizer, rng, book, length, facts, depths, turns_of)
    return turns_of(document), [values[i] for i in asked], "all", [placed[i] for i in asked]


def build_multi_turn_needle(tokenizer, rng: random.Random, length: int) -> Built:
    """A number needle in turn 1's document, an unrelated turn 2, and turn 3 asking for the number."""
    book = choose_book(rng, length)
    key = needle_keys(rng, 1)[0]
    number = needle_value(rng, "number", set())
    question = needle_question("number", key, "the document I gave you")

    def turns_of(document: str) -> Turns:
        return [f"{document}\n\n{FIRST_TURN}", SECOND_TURN, question]

    facts, depths = [needle_sentence("number", key, number)], seeded_depths(rng, 1)
    document, placed = haystack_document(tokenizer, rng, book, length, facts, depths, turns_of)
    return turns_of(document), [number], "all", placed
