"""Aggregation tasks: ``common_words`` (RULER's CWE) and ``frequent_words`` (RULER's FWE), no prose."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import Counter
from itertools import accumulate

from .text import Built, Turns, prompt_limit, prompt_tokens, prose_vocabulary, word_tokens

COMMON_COUNT = 10  # common_words: the number of common words asked for
MAX_COMMON_REPEATS = 30  # common_words: how often each common word occurs at long lengths
FREQUENT_COUNT = 3  # frequent_words: the number of most frequent words asked for
ZIPF_ALPHA = 2.0  # frequent_words: P(rank k) is proportional to k ** -ZIPF_ALPHA
ZIPF_VOCABULARY = 64  # frequent_words: invented words in the vocabulary


# --- common words (CWE) --------------------------------------------------------------------------


def _numbered(words: list[str]) -> str:
    """``words`` as a numbered list, one per line."""
    return "\n".join(f"{i}. {word}" for i, word in enumerate(words, start=1))


def _entry_tokens(tokenizer, number: int, word: str) -> int:
    """Estimated tokens of the line ``"{number}. {word}"`` and its newline (digits are single tokens)."""
    return len(str(number)) + word_tokens(tokenizer, word) + 2


def _common_repeats(budget: int) -> int:
    """How often each common word occurs in a list of about ``budget`` tokens (3 to 30)."""
    entries = budget // (len(str(budget // 6)) + 4)  # an entry is about digits + 4 tokens
    return max(3, min(MAX_COMMON_REPEATS, entries // 25))


def _cwe_words(tokenizer, rng: random.Random, budget: int) -> tuple[list[str], list[str]]:
    """The common words and the shuffled list: each common word ``_common_repeats`` times, others fewer.

    No listed word contains a common word, so a common word found in an answer was named.
    """
    vocabulary = list(prose_vocabulary())
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


def build_common_words(tokenizer, rng: random.Random, length: int) -> Built:
    """RULER's CWE: name the ten most common words of a long numbered list."""
    header = (
        "Below is a numbered list of words. A few words occur many times in it; "
        "most others occur only once or a few times."
    )
    question = f"What are the {COMMON_COUNT} most common words in the list above? Answer with the words only."

    def turns_of(listing: str) -> Turns:
        return [f"{header}\n\n{listing}\n\n{question}"]

    limit = prompt_limit(length, 1)
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
    real = set(prose_vocabulary())
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
        used += word_tokens(tokenizer, word)
    return words


def _top_is_strict(words: list[str], top: int) -> bool:
    """Whether the ``top`` most frequent of ``words`` are each strictly more frequent than the next."""
    counts = [n for _, n in Counter(words).most_common(top + 1)] + [0]
    return counts[top - 1] > counts[top]


def build_frequent_words(tokenizer, rng: random.Random, length: int) -> Built:
    """RULER's FWE: name the three most frequent invented words of a Zipf-distributed text."""
    header = "Below is a coded text made of invented words. Keep track of how often each coded word occurs."
    question = (
        f"What are the {FREQUENT_COUNT} most frequent coded words in the text above? "
        f"Answer with the words only."
    )

    def turns_of(text: str) -> Turns:
        return [f"{header}\n\n{text}\n\n{question}"]

    limit = prompt_limit(length, 1)
    budget = limit - prompt_tokens(tokenizer, turns_of(""))
    for _ in range(100):
        words = _zipf_text(tokenizer, rng, budget)
        while (excess := prompt_tokens(tokenizer, turns_of(" ".join(words))) - limit) > 0:
            del words[-(excess // 4 + 1) :]
        if _top_is_strict(words, FREQUENT_COUNT):
            top = [word for word, _ in Counter(words).most_common(FREQUENT_COUNT)]
            return turns_of(" ".join(words)), top, "all", []
    raise ValueError(f"no text of {length} tokens has {FREQUENT_COUNT} strictly most frequent words")
