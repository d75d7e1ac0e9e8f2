"""The bundled prose the haystack tasks read, token counts, and haystack documents with inserted facts.

A haystack is whole paragraphs of one bundled evaluation book (never the calibration text), from a
seeded starting paragraph, in book order until the token budget is full (a paragraph too long for
what is left is skipped and later, shorter ones fill the rest). Inserted facts are paragraphs of
their own at the paragraph boundaries nearest their seeded depths.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import lru_cache
from itertools import accumulate

from ...bundled.texts import evaluation_texts

ANSWER_TOKENS = 64  # the runner generates up to this many tokens per turn; every prompt leaves them free
DEPTH_RANGE = (0.05, 0.95)  # seeded depths of inserted facts are uniform in this range
BOOK_CHARS_PER_TOKEN = 4.5  # a book serves a length only with this many characters per token of it
MIN_START_WORDS = 25  # an excerpt starts at a paragraph of real prose, never at a heading
FILL_SLACK = 8  # stop looking for a short paragraph once fewer tokens than this are left
MAX_SKIPS = 64  # ... or after skipping this many paragraphs too long for what is left

Turns = list[str]
Built = tuple[Turns, list[str], str, list[float]]  # turns, answers, metric, depths


# --- the bundled prose ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _book_names() -> tuple[str, ...]:
    """Names of the bundled evaluation prose files, sorted."""
    return tuple(sorted(evaluation_texts("prose")))


@lru_cache(maxsize=8)
def paragraphs(book: str) -> tuple[str, ...]:
    """The non-empty paragraphs of ``book``, stripped, in order (paragraph n of the book is [n - 1])."""
    text = evaluation_texts("prose")[book]
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


def choose_book(rng: random.Random, length: int) -> str:
    """A seeded choice among the books long enough (``BOOK_CHARS_PER_TOKEN``) for ``length`` tokens."""
    sizes = {book: sum(len(p) for p in paragraphs(book)) for book in _book_names()}
    books = [book for book, size in sizes.items() if size >= BOOK_CHARS_PER_TOKEN * length]
    if not books:
        longest = int(max(sizes.values()) / BOOK_CHARS_PER_TOKEN)
        raise ValueError(f"length {length} is longer than any bundled book (about {longest} tokens at most)")
    return rng.choice(books)


@lru_cache(maxsize=8)
def book_lower(book: str) -> str:
    """The whole of ``book`` in lower case, to keep invented strings out of it."""
    return "\n\n".join(paragraphs(book)).lower()


@lru_cache(maxsize=8)
def _prose_starts(book: str) -> tuple[int, ...]:
    """Indices of the paragraphs of ``book`` long enough to open an excerpt."""
    return tuple(i for i, p in enumerate(paragraphs(book)) if len(p.split()) >= MIN_START_WORDS)


@lru_cache(maxsize=1)
def prose_vocabulary() -> tuple[str, ...]:
    """Every lower-case word of 4-10 letters in the evaluation prose, sorted (about 12K words)."""
    words = set()
    for text in evaluation_texts("prose").values():
        words.update(re.findall(r"\b[a-z]{4,10}\b", text))
    return tuple(sorted(words))


def paragraph_text(book: str, index: int, labelled: bool) -> str:
    """Paragraph ``index`` of ``book``, prefixed by its 1-based number in brackets when ``labelled``."""
    paragraph = paragraphs(book)[index]
    return f"[{index + 1}] {paragraph}" if labelled else paragraph


# --- token counts --------------------------------------------------------------------------------


def _tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text``, without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1 << 16)
def paragraph_tokens(tokenizer, book: str, index: int, labelled: bool) -> int:
    """Tokens of one paragraph of ``book`` (cached: excerpts tokenize only the paragraphs they use)."""
    return _tokens(tokenizer, paragraph_text(book, index, labelled))


@lru_cache(maxsize=1 << 16)
def word_tokens(tokenizer, word: str) -> int:
    """Tokens of ``word`` after a space, as it appears inside a list or a text."""
    return _tokens(tokenizer, f" {word}")


@lru_cache(maxsize=16)
def _separator_tokens(tokenizer) -> int:
    """Tokens added by the blank line between two paragraphs."""
    return _tokens(tokenizer, "a\n\nb") - _tokens(tokenizer, "a") - _tokens(tokenizer, "b")


def prompt_tokens(tokenizer, turns: list[str]) -> int:
    """Tokens of the whole conversation of ``turns`` with the chat template and the generation prompt.

    Earlier turns are followed by empty assistant messages, standing for the answers that the
    runner generates (``ANSWER_TOKENS`` at most per turn, kept free by every sample).
    """
    messages: list[dict[str, str]] = []
    for turn in turns[:-1]:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
    messages.append({"role": "user", "content": turns[-1]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _tokens(tokenizer, text)


def prompt_limit(length: int, turns: int) -> int:
    """The most tokens a prompt of ``turns`` turns may have for a target ``length``."""
    limit = length - ANSWER_TOKENS * turns
    if limit <= 0:
        raise ValueError(f"length {length} leaves no room for a prompt of {turns} turn(s)")
    return limit


# --- haystack documents --------------------------------------------------------------------------


def excerpt(tokenizer, rng: random.Random, book: str, budget: int, labelled: bool = False) -> list[int]:
    """Indices of whole paragraphs of ``book`` from a seeded start, about ``budget`` tokens in all.

    Paragraphs follow in book order (wrapping past its end, never repeating a paragraph's text);
    one too long for what is left is skipped and later, shorter ones fill the rest.
    """
    count = len(paragraphs(book))
    start = rng.choice(_prose_starts(book))
    separator = _separator_tokens(tokenizer)
    chosen: list[int] = []
    seen: set[str] = set()  # a book repeats some short paragraphs ('"Yes, sir."'): each is used once
    used = skipped = 0
    for offset in range(count):
        index = (start + offset) % count
        if paragraphs(book)[index] in seen:
            continue
        size = paragraph_tokens(tokenizer, book, index, labelled) + separator
        if used + size <= budget:
            chosen.append(index)
            seen.add(paragraphs(book)[index])
            used += size
            continue
        skipped += 1
        if budget - used < FILL_SLACK or skipped > MAX_SKIPS:
            break
    return chosen


def _boundary(sizes: list[int], depth: float) -> int:
    """The paragraph boundary (1..len - 1 where possible) whose token depth is closest to ``depth``."""
    if len(sizes) < 2:
        return len(sizes)
    cumulative = list(accumulate(sizes))  # cumulative[k - 1]: tokens before boundary k
    total = cumulative[-1]
    return min(range(1, len(sizes)), key=lambda k: abs(cumulative[k - 1] / total - depth))


def _insert(
    texts: list[str], sizes: list[int], facts: list[str], fact_sizes: list[int], depths: list[float]
) -> tuple[str, list[float]]:
    """The document of ``texts`` with each fact at the boundary nearest its depth, and the facts' depths.

    Facts at one boundary keep their given order; the returned depth of a fact is the share of the
    document's tokens before it.
    """
    slots = [_boundary(sizes, depth) for depth in depths]
    by_slot: dict[int, list[int]] = {}
    for j in sorted(range(len(facts)), key=lambda j: (slots[j], j)):
        by_slot.setdefault(slots[j], []).append(j)
    items: list[str] = []
    before: dict[int, int] = {}  # fact -> tokens before it
    used = 0
    for k in range(len(texts) + 1):
        for j in by_slot.get(k, []):
            before[j] = used
            items.append(facts[j])
            used += fact_sizes[j]
        if k < len(texts):
            items.append(texts[k])
            used += sizes[k]
    return "\n\n".join(items), [before[j] / max(used, 1) for j in range(len(facts))]


def haystack_document(
    tokenizer,
    rng: random.Random,
    book: str,
    length: int,
    facts: list[str],
    depths: list[float],
    turns_of: Callable[[str], Turns],
) -> tuple[str, list[float]]:
    """A prose excerpt of ``book`` holding ``facts`` at ``depths``; ``turns_of(document)`` fills ``length``.

    ``turns_of(document)`` makes the turns around it; the excerpt is cut to the budget from
    paragraph token counts, then shortened by whole paragraphs while the rendered prompt is over
    the limit. Returns the document and each fact's depth in it (share of its tokens before the fact).
    """
    limit = prompt_limit(length, len(turns_of("")))
    fact_sizes = [_tokens(tokenizer, fact) for fact in facts]
    separators = len(facts) * _separator_tokens(tokenizer)
    fixed = prompt_tokens(tokenizer, turns_of("")) + sum(fact_sizes) + separators
    indices = excerpt(tokenizer, rng, book, limit - fixed)
    while True:
        texts = [paragraph_text(book, i, False) for i in indices]
        sizes = [paragraph_tokens(tokenizer, book, i, False) for i in indices]
        document, placed = _insert(texts, sizes, facts, fact_sizes, depths)
        if prompt_tokens(tokenizer, turns_of(document)) <= limit:
            return document, placed
        if not indices:
            raise ValueError(f"length {length} is too short for the task's fixed text")
        indices = indices[:-1]


def seeded_depths(rng: random.Random, count: int) -> list[float]:
    """``count`` seeded depths, uniform in ``DEPTH_RANGE``."""
    return [rng.uniform(*DEPTH_RANGE) for _ in range(count)]
