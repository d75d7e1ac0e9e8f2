"""tca-attention: Training-free Context-adaptive Attention for Hugging Face causal LMs.

model, tokenizer = tca.load_model("smollm2")
profile = tca.calibrate(model, tokenizer)      # or tca.profile_for("smollm2"), pre-calibrated
with tca.apply(model, profile) as run:
    model.generate(...)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names and the module that defines each. They are imported on first use (PEP 562), so
# that `import tca` and `tca --help` do not pay for importing transformers (several seconds).
_EXPORTS = {
    "calibrate": "calibrate",
    "TCAConfig": "config",
    "ContextTooLongError": "hf",
    "UnsupportedModelError": "hf",
    "apply": "hf",
    "patch": "hf",
    "unpatch": "hf",
    "load_model": "models",
    "Profile": "profile",
    "ProfileError": "profile",
    "profile_for": "profiles",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; explicit re-exports
    from .calibrate import calibrate as calibrate
    from .config import TCAConfig as TCAConfig
    from .hf import ContextTooLongError as ContextTooLongError
    from .hf import UnsupportedModelError as UnsupportedModelError
    from .hf import apply as apply
    from .models import load_model as load_model
    from .profile import Profile as Profile
    from .profile import ProfileError as ProfileError
    from .profiles import profile_for as profile_for


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule, as `import tca` used to import them all: tca.ops, tca.select, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'tca' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
