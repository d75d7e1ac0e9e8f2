"""The bundled-model cache (``tca.bundled.models``): a damaged cache is rebuilt, never loaded as
garbage; an unwritable cache directory is a warning before the slow de-quantisation.

The GGUF de-quantisation is replaced by a tiny random Llama and a word-level tokenizer, so these
tests take seconds; the real SmolLM2 cache is checked in test_cli.py.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import transformers
from tiny_models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import tca.bundled.models as bundled


class FakeGGUF:
    """Stands in for the GGUF: counts de-quantisations and records the warnings issued before each."""

    def __init__(self, tmp_path, monkeypatch):
        self.path = tmp_path / "gguf" / "SmolLM2-fake.gguf"
        self.path.parent.mkdir()
        self.path.write_bytes(b"GGUF" + bytes(60))
        self.calls, self.warned_before = 0, []
        self.model = tiny_llama(0)
        self.vocab = {"[UNK]": 0, "tea": 1, "party": 2}  # what the converted tokenizer knows
        monkeypatch.setattr(bundled, "bundled_gguf", lambda name: self.path)
        monkeypatch.setattr(bundled, "_convert_tokenizer", self.convert_tokenizer)
        monkeypatch.setattr(bundled, "_dequantise", self.dequantise)
        self.monkeypatch = monkeypatch
        self.own_ids(1, 2)

    def own_ids(self, *ids):
        """The ids the model's own tokenizer gives "tea party" (SmolLM2's real probe stands aside)."""
        own = dataclasses.replace(bundled.BUNDLED["smollm2"], probe=("tea party", ids))
        self.monkeypatch.setitem(bundled.BUNDLED, "smollm2", own)

    def convert_tokenizer(self, gguf):
        assert gguf == self.path
        words = Tokenizer(models.WordLevel(dict(self.vocab), unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")

    def dequantise(self, gguf):
        assert gguf == self.path
        self.calls += 1
        self.warned_before.append(list(self.caught))
        return tiny_llama(0)

    def load(self):
        """load_model("smollm2") with every warning recorded (``self.caught``)."""
        with warnings.catch_warnings(record=True) as self.caught:
            warnings.simplefilter("always")
            model, tokenizer = bundled.load_model("smollm2")
        assert tokenizer("tea party")["input_ids"] == list(bundled.BUNDLED["smollm2"].probe[1])
        for name, tensor in self.model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), f"{name} differs from the GGUF's weights"
        return [str(w.message) for w in self.caught]

    @property
    def cached(self):
        return bundled.cached_model_dir(self.path)


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    return FakeGGUF(tmp_path, monkeypatch)


def test_cache_is_written_with_a_manifest_and_used(gguf):
    assert gguf.load() == [] and gguf.calls == 1
    manifest = json.loads((gguf.cached / bundled.MANIFEST).read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest)
    assert manifest["model.safetensors"]["size"] == (gguf.cached / "model.safetensors").stat().st_size
    assert bundled.cache_problem(gguf.cached) is None
    assert gguf.load() == [] and gguf.calls == 1, "the second load reads the cache"
    assert [p.name for p in gguf.cached.parent.iterdir()] == [gguf.cached.name], "no temporary left"


def zero_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


DAMAGES = {
    "zeroed": (lambda c: zero_middle(c / "model.safetensors"), "model.safetensors differs"),
    "truncated": (
        lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-1000]),
        "model.safetensors has",
    ),
    "deleted": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "no manifest": (lambda c: (c / bundled.MANIFEST).unlink(), "no checksum manifest"),
    "garbage manifest": (lambda c: (c / bundled.MANIFEST).write_text("{oops"), "manifest is unreadable"),
    "config only": (
        lambda c: [p.unlink() for p in c.iterdir() if p.name != "config.json"],
        "no checksum manifest",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_unverifiable_cache_is_rebuilt_with_a_warning(gguf, damage):
    damage_cache, reason = DAMAGES[damage]
    gguf.load()
    damage_cache(gguf.cached)
    assert bundled.cache_problem(gguf.cached) is not None
    messages = gguf.load()  # compares every weight with the GGUF's: garbage would fail here
    assert gguf.calls == 2 and len(messages) == 1
    assert "cannot be used" in messages[0] and reason in messages[0] and "rebuilding" in messages[0]
    assert bundled.cache_problem(gguf.cached) is None
    assert gguf.load() == [] and gguf.calls == 2


@pytest.mark.parametrize("where", ["regular file", "under /proc"])
def test_an_unwritable_cache_dir_warns_before_dequantising_and_loads(tmp_path, monkeypatch, where):
    if where == "regular file":
        target = tmp_path / "a-file"
        target.write_text("not a directory")
    else:
        target = "/proc/tca-cache-test"
    monkeypatch.setenv("TCA_CACHE_DIR", str(target))
    gguf = FakeGGUF(tmp_path, monkeypatch)
    messages = gguf.load()
    assert gguf.calls == 1 and len(messages) == 1
    assert f"cannot write the model cache under {target}" in messages[0] and "TCA_CACHE_DIR" in messages[0]
    assert len(gguf.warned_before[0]) == 1, "the warning comes before the slow de-quantisation"
    if where == "regular file":
        assert target.read_text() == "not a directory"


def test_a_tokenizer_other_than_the_models_is_refused_before_the_model_is_dequantised(gguf):
    """transformers 5.17 builds Gemma 3's tokenizer from its GGUF as another one (other ids): the
    load stops with the version and the fix, before the slow de-quantisation, and caches nothing."""
    gguf.vocab = {"[UNK]": 0, "party": 1, "tea": 2}  # this transformers' conversion: other ids
    with pytest.raises(bundled.TokenizerMismatchError) as raised:
        gguf.load()
    message = str(raised.value)
    assert "transformers>=5.23" in message and "'tea party' gives token ids [2, 1]" in message
    assert "[1, 2]" in message and transformers.__version__ in message
    assert gguf.calls == 0 and not gguf.cached.exists()


def test_a_cached_tokenizer_other_than_the_models_is_rebuilt(gguf):
    """A cache written by a transformers that converted the tokenizer wrongly is rebuilt, with a
    warning that says why, once a transformers that converts it right is installed."""
    gguf.vocab = {"[UNK]": 0, "party": 1, "tea": 2}
    gguf.own_ids(2, 1)  # as if this conversion were right: it is cached
    assert gguf.load() == [] and gguf.calls == 1
    gguf.vocab = {"[UNK]": 0, "tea": 1, "party": 2}  # the fixed transformers' conversion
    gguf.own_ids(1, 2)
    warned = gguf.load()
    assert gguf.calls == 2 and len(warned) == 1, warned
    assert "its tokenizer, written by an older transformers, is not the model's" in warned[0]
    assert gguf.load() == [] and gguf.calls == 2, "the rebuilt cache is used"
