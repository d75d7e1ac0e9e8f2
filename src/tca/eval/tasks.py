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
"""

from __future__ import annotations

import random
import re
import string
import uuid
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, pairwise

from ..bundled.texts import evaluation_texts

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
ANSWER_TOKENS = 64  # the runner generates up to this many tokens per turn; every prompt leaves them free
DEPTH_RANGE = (0.05, 0.95)  # seeded depths of inserted facts are uniform in this range
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
BOOK_CHARS_PER_TOKEN = 4.5  # a book serves a length only with this many characters per token of it
FILL_FLOOR = 0.85  # a prompt of length >= 1024 fills at least this share of the tokens it may have
MIN_START_WORDS = 25  # an excerpt starts at a paragraph of real prose, never at a heading
FILL_SLACK = 8  # stop looking for a short paragraph once fewer tokens than this are left
MAX_SKIPS = 64  # ... or after skipping this many paragraphs too long for what is left
HOPS = 4  # variable tracking: assignments from one variable to the next in each chain
COMMON_COUNT = 10  # common_words: the number of common words asked for
MAX_COMMON_REPEATS = 30  # common_words: how often each common word occurs at long lengths
FREQUENT_COUNT = 3  # frequent_words: the number of most frequent words asked for
ZIPF_ALPHA = 2.0  # frequent_words: P(rank k) is proportional to k ** -ZIPF_ALPHA
ZIPF_VOCABULARY = 64  # frequent_words: invented words in the vocabulary
QUOTE_WORDS = 10  # qa_document: words quoted from the asked paragraph
MIN_QA_WORDS = 16  # qa_document: a paragraph must be at least this long to be asked about
FIRST_TURN = "Summarise the first paragraph in one sentence."
SECOND_TURN = "Name one character mentioned in the first paragraph."

Turns = list[str]
Built = tuple[Turns, list[str], str, list[float]]  # turns, answers, metric, depths


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


# --- the bundled prose ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _book_names() -> tuple[str, ...]:
    """Names of the bundled evaluation prose files, sorted."""
    return tuple(sorted(evaluation_texts("prose")))


@lru_cache(maxsize=8)
def _paragraphs(book: str) -> tuple[str, ...]:
    """The non-empty paragraphs of ``book``, stripped, in order (paragraph n of the book is [n - 1])."""
    text = evaluation_texts("prose")[book]
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


def _book(rng: random.Random, length: int) -> str:
    """A seeded choice among the books long enough (``BOOK_CHARS_PER_TOKEN``) for ``length`` tokens."""
    sizes = {book: sum(len(p) for p in _paragraphs(book)) for book in _book_names()}
    books = [book for book, size in sizes.items() if size >= BOOK_CHARS_PER_TOKEN * length]
    if not books:
        longest = int(max(sizes.values()) / BOOK_CHARS_PER_TOKEN)
        raise ValueError(f"length {length} is longer than any bundled book (about {longest} tokens at most)")
    return rng.choice(books)


@lru_cache(maxsize=8)
def _book_lower(book: str) -> str:
    """The whole of ``book`` in lower case, to keep invented strings out of it."""
    return "\n\n".join(_paragraphs(book)).lower()


@lru_cache(maxsize=8)
def _prose_starts(book: str) -> tuple[int, ...]:
    """Indices of the paragraphs of ``book`` long enough to open an excerpt."""
    return tuple(i for i, p in enumerate(_paragraphs(book)) if len(p.split()) >= MIN_START_WORDS)


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Every lower-case word of 4-10 letters in the evaluation prose, sorted (about 12K words)."""
    words = set()
    for text in evaluation_texts("prose").values():
        words.update(re.findall(r"\b[a-z]{4,10}\b", text))
    return tuple(sorted(words))


def _paragraph_text(book: str, index: int, labelled: bool) -> str:
    """Paragraph ``index`` of ``book``, prefixed by its 1-based number in brackets when ``labelled``."""
    paragraph = _paragraphs(book)[index]
    return f"[{index + 1}] {paragraph}" if labelled else paragraph


# --- token counts --------------------------------------------------------------------------------


def _tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text``, without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=1 << 16)
def _paragraph_tokens(tokenizer, book: str, index: int, labelled: bool) -> int:
    """Tokens of one paragraph of ``book`` (cached: excerpts tokenize only the paragraphs they use)."""
    return _tokens(tokenizer, _paragraph_text(book, index, labelled))


@lru_cache(maxsize=1 << 16)
def _word_tokens(tokenizer, word: str) -> int:
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


def _limit(length: int, turns: int) -> int:
    """The most tokens a prompt of ``turns`` turns may have for a target ``length``."""
    limit = length - ANSWER_TOKENS * turns
    if limit <= 0:
        raise ValueError(f"length {length} leaves no room for a prompt of {turns} turn(s)")
    return limit


# --- haystack documents --------------------------------------------------------------------------


def _excerpt(tokenizer, rng: random.Random, book: str, budget: int, labelled: bool = False) -> list[int]:
    """Indices of whole paragraphs of ``book`` from a seeded start, about ``budget`` tokens in all.

    Paragraphs follow in book order (wrapping past its end, never repeating a paragraph's text);
    one too long for what is left is skipped and later, shorter ones fill the rest.
    """
    count = len(_paragraphs(book))
    start = rng.choice(_prose_starts(book))
    separator = _separator_tokens(tokenizer)
    chosen: list[int] = []
    seen: set[str] = set()  # a book repeats some short paragraphs ('"Yes, sir."'): each is used once
    used = skipped = 0
    for offset in range(count):
        index = (start + offset) % count
        if _paragraphs(book)[index] in seen:
            continue
        size = _paragraph_tokens(tokenizer, book, index, labelled) + separator
        if used + size <= budget:
            chosen.append(index)
            seen.add(_paragraphs(book)[index])
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


def _haystack_turns(
    tokenizer,
    rng: random.Random,
    book: str,
    length: int,
    facts: list[str],
    depths: list[float],
    turns_of: Callable[[str], Turns],
) -> tuple[Turns, list[float]]:
    """Turns around a prose excerpt of ``book`` holding ``facts`` at ``depths``, filling ``length``.

    ``turns_of(document)`` makes the turns; the excerpt is cut to the budget from paragraph token
    counts, then shortened by whole paragraphs while the rendered prompt is over the limit.
    """
    limit = _limit(length, len(turns_of("")))
    fact_sizes = [_tokens(tokenizer, fact) for fact in facts]
    separators = len(facts) * _separator_tokens(tokenizer)
    fixed = prompt_tokens(tokenizer, turns_of("")) + sum(fact_sizes) + separators
    indices = _excerpt(tokenizer, rng, book, limit - fixed)
    while True:
        texts = [_paragraph_text(book, i, False) for i in indices]
        sizes = [_paragraph_tokens(tokenizer, book, i, False) for i in indices]
        document, placed = _insert(texts, sizes, facts, fact_sizes, depths)
        turns = turns_of(document)
        if prompt_tokens(tokenizer, turns) <= limit:
            return turns, placed
        if not indices:
            raise ValueError(f"length {length} is too short for the task's fixed text")
        indices = indices[:-1]


def _depths(rng: random.Random, count: int) -> list[float]:
    """``count`` seeded depths, uniform in ``DEPTH_RANGE``."""
    return [rng.uniform(*DEPTH_RANGE) for _ in range(count)]


# --- needles -------------------------------------------------------------------------------------


def _keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct keys of two distinct words, e.g. ``"silver-harbour"``."""
    keys: list[str] = []
    while len(keys) < count:
        key = "-".join(rng.sample(WORDS, 2))
        if key not in keys:
            keys.append(key)
    return keys


def _value(rng: random.Random, kind: str, avoid: set[str]) -> str:
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


def _needle(kind: str, key: str, value: str) -> str:
    """The needle sentence stating ``value`` for ``key``."""
    return f"The special magic {kind} for {key} is: {value}."


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
    return (
        f"What is the special magic {kind} for {keys[0]} mentioned in the text above? "
        f"Answer with the {kind} only."
    )


def _niah(tokenizer, rng: random.Random, length: int, task: str) -> Built:
    """The five ``niah_*`` tasks: needles in a prose haystack, asked for by key."""
    kind = {"niah_single_word": "word", "niah_single_uuid": "uuid"}.get(task, "number")
    book = _book(rng, length)
    count = 1 if task.startswith("niah_single") else 4
    keys = _keys(rng, 1) * count if task == "niah_multivalue" else _keys(rng, count)
    avoid = {word for key in keys for word in key.split("-")}
    values: list[str] = []
    for _ in keys:
        values.append(_value(rng, kind, avoid | set(values)))
    depths = _depths(rng, count)
    asked = [rng.randrange(count)] if task == "niah_multikey" else list(range(count))
    question = _niah_question(task, kind, list(dict.fromkeys(keys[i] for i in asked)))
    preface = (
        f"Some special magic {kind}s are hidden in the following text. "
        f"Remember them: you will be asked about them afterwards."
    )
    facts = [_needle(kind, key, value) for key, value in zip(keys, values, strict=True)]
    turns, placed = _haystack_turns(
        tokenizer, rng, book, length, facts, depths, lambda doc: [f"{preface}\n\n{doc}\n\n{question}"]
    )
    return turns, [values[i] for i in asked], "all", [placed[i] for i in asked]


def _multi_turn_needle(tokenizer, rng: random.Random, length: int) -> Built:
    """A number needle in turn 1's document, an unrelated turn 2, and turn 3 asking for the number."""
    book = _book(rng, length)
    key = _keys(rng, 1)[0]
    number = _value(rng, "number", set())
    question = (
        f"What is the special magic number for {key} mentioned in the document I gave you? "
        f"Answer with the number only."
    )
    turns, placed = _haystack_turns(
        tokenizer,
        rng,
        book,
        length,
        [_needle("number", key, number)],
        _depths(rng, 1),
        lambda doc: [f"{doc}\n\n{FIRST_TURN}", SECOND_TURN, question],
    )
    return turns, [number], "all", placed


# --- variable tracking ---------------------------------------------------------------------------


def _variable_names(rng: random.Random, count: int, book: str) -> list[str]:
    """``count`` distinct names of five capital letters, none occurring (in any case) in ``book``."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name.lower() not in _book_lower(book):
            names.append(name)
    return names


def _chain(names: list[str], value: int) -> list[str]:
    """The statements of one chain: the first name gets ``value``, each next name the one before."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]


def _variable_tracking(tokenizer, rng: random.Random, length: int) -> Built:
    """Two chains of ``HOPS`` assignments each in a prose haystack; name every variable of the first."""
    book = _book(rng, length)
    names = _variable_names(rng, 2 * (HOPS + 1), book)
    gold, other = names[: HOPS + 1], names[HOPS + 1 :]
    value, distractor = rng.sample(range(10_000, 100_000), 2)
    facts = _chain(gold, value) + _chain(other, distractor)
    depths = sorted(_depths(rng, HOPS + 1)) + sorted(_depths(rng, HOPS + 1))  # each chain in order
    preface = "Memorise the chains of variable assignments hidden in the following text."
    question = (
        f"Find all variables that are assigned the value {value} in the text above, directly or through "
        f"other variables. Answer with their names only."
    )
    turns, placed = _haystack_turns(
        tokenizer, rng, book, length, facts, depths, lambda doc: [f"{preface}\n\n{doc}\n\n{question}"]
    )
    return turns, gold, "all", placed[: HOPS + 1]


# --- common words (CWE) --------------------------------------------------------------------------


def _numbered(words: list[str]) -> str:
    """``words`` as a numbered list, one per line."""
    return "\n".join(f"{i}. {word}" for i, word in enumerate(words, start=1))


def _entry_tokens(tokenizer, number: int, word: str) -> int:
    """Estimated tokens of the line ``"{number}. {word}"`` and its newline (digits are single tokens)."""
    return len(str(number)) + _word_tokens(tokenizer, word) + 2


def _common_repeats(budget: int) -> int:
    """How often each common word occurs in a list of about ``budget`` tokens (3 to 30)."""
    entries = budget // (len(str(budget // 6)) + 4)  # an entry is about digits + 4 tokens
    return max(3, min(MAX_COMMON_REPEATS, entries // 25))


def _cwe_words(tokenizer, rng: random.Random, budget: int) -> tuple[list[str], list[str]]:
    """The common words and the shuffled list: each common word ``_common_repeats`` times, others fewer.

    No listed word contains a common word, so a common word found in an answer was named.
    """
    vocabulary = list(_vocabulary())
    rng.shuffle(vocabulary)
    common: list[str] = []
    for word in vocabulary:
        if len(common) == COMMON_COUNT:
            break
        if not any(word in c or c in word for c in common):
            common.append(word)
    repeats = _common_repeats(budget)
    words = common * repeats
    used = sum(_entry_tokens(tokenizer, i, w) for i, w in enumerate(words, start=1))
    for word in vocabulary:
        if used >= budget:
            break
        if word in common or any(c in word for c in common):
            continue
        for _ in range(rng.randint(1, min(3, repeats - 2))):
            words.append(word)
            used += _entry_tokens(tokenizer, len(words), word)
    else:
        raise ValueError(f"the vocabulary of {len(vocabulary)} words is too small for {budget} tokens")
    rng.shuffle(words)
    return common, words


def _common_words(tokenizer, rng: random.Random, length: int) -> Built:
    """RULER's CWE: name the ten most common words of a long numbered list."""
    header = (
        "Below is a numbered list of words. A few words occur many times in it; "
        "most others occur only once or a few times."
    )
    question = f"What are the {COMMON_COUNT} most common words in the list above? Answer with the words only."

    def turns_of(listing: str) -> Turns:
        return [f"{header}\n\n{listing}\n\n{question}"]

    limit = _limit(length, 1)
    common, words = _cwe_words(tokenizer, rng, limit - prompt_tokens(tokenizer, turns_of("")))
    while (excess := prompt_tokens(tokenizer, turns_of(_numbered(words))) - limit) > 0:
        for _ in range(excess // 8 + 1):  # drop the last entries of words that are not common
            rare = [i for i, word in enumerate(words) if word not in common]
            if not rare:
                raise ValueError(f"length {length} is too short for common_words")
            words.pop(rare[-1])
    return turns_of(_numbered(words)), common, "all", []


# --- frequent words (FWE) ------------------------------------------------------------------------


def _invented_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct pronounceable invented words of five letters, none an English word of the books."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    real = set(_vocabulary())
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(consonants if i % 2 == 0 else vowels) for i in range(5))
        if word not in words and word not in real:
            words.append(word)
    return words


def _zipf_text(tokenizer, rng: random.Random, budget: int) -> list[str]:
    """Invented words drawn from a Zipf law over a seeded vocabulary, about ``budget`` tokens in all."""
    vocabulary = _invented_words(rng, ZIPF_VOCABULARY)
    cumulative = list(accumulate((k + 1) ** -ZIPF_ALPHA for k in range(ZIPF_VOCABULARY)))
    words: list[str] = []
    used = 0
    while used < budget:
        word = vocabulary[min(bisect_left(cumulative, rng.random() * cumulative[-1]), ZIPF_VOCABULARY - 1)]
        words.append(word)
        used += _word_tokens(tokenizer, word)
    return words


def _top_is_strict(words: list[str], top: int) -> bool:
    """Whether the ``top`` most frequent of ``words`` are each strictly more frequent than the next."""
    counts = [n for _, n in Counter(words).most_common(top + 1)] + [0]
    return counts[top - 1] > counts[top]


def _frequent_words(tokenizer, rng: random.Random, length: int) -> Built:
    """RULER's FWE: name the three most frequent invented words of a Zipf-distributed text."""
    header = "Below is a coded text made of invented words. Keep track of how often each coded word occurs."
    question = (
        f"What are the {FREQUENT_COUNT} most frequent coded words in the text above? "
        f"Answer with the words only."
    )

    def turns_of(text: str) -> Turns:
        return [f"{header}\n\n{text}\n\n{question}"]

    limit = _limit(length, 1)
    budget = limit - prompt_tokens(tokenizer, turns_of(""))
    for _ in range(100):
        words = _zipf_text(tokenizer, rng, budget)
        while (excess := prompt_tokens(tokenizer, turns_of(" ".join(words))) - limit) > 0:
            del words[-(excess // 4 + 1) :]
        if _top_is_strict(words, FREQUENT_COUNT):
            top = [word for word, _ in Counter(words).most_common(FREQUENT_COUNT)]
            return turns_of(" ".join(words)), top, "all", []
    raise ValueError(f"no text of {length} tokens has {FREQUENT_COUNT} strictly most frequent words")


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
        paragraph = _paragraphs(book)[indices[p]]
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


def _qa_document(tokenizer, rng: random.Random, length: int) -> Built:
    """Which numbered paragraph of a real excerpt holds a quoted passage (see the module docstring)."""
    book = _book(rng, length)
    depth, where = rng.uniform(*DEPTH_RANGE), rng.random()
    limit = _limit(length, 1)
    placeholder = " ".join(["passage"] * QUOTE_WORDS)
    budget = limit - prompt_tokens(tokenizer, [f"\n\n{_qa_question(placeholder)}"])
    indices = _excerpt(tokenizer, rng, book, budget, labelled=True)
    while indices:
        document = "\n\n".join(_paragraph_text(book, i, True) for i in indices)
        sizes = [_paragraph_tokens(tokenizer, book, i, True) for i in indices]
        target = _qa_target(book, indices, sizes, depth, where, document)
        if target is not None:
            index, quote, placed = target
            turns = [f"{document}\n\n{_qa_question(quote)}"]
            if prompt_tokens(tokenizer, turns) <= limit:
                return turns, [str(index + 1)], "part", [placed]
        indices = indices[:-1]
    raise ValueError(f"length {length} is too short for qa_document")


# --- the suite -----------------------------------------------------------------------------------


def _build(task: str, tokenizer, rng: random.Random, length: int) -> Built:
    """Dispatch to the builder of ``task``."""
    if task.startswith("niah_"):
        return _niah(tokenizer, rng, length, task)
    builders = {
        "variable_tracking": _variable_tracking,
        "common_words": _common_words,
        "frequent_words": _frequent_words,
        "multi_turn_needle": _multi_turn_needle,
        "qa_document": _qa_document,
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
    tokens, limit = prompt_tokens(tokenizer, turns), _limit(length, len(turns))
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
