"""tca-attention: Training-free Context-adaptive Attention for Hugging Face causal LMs.

model, tokenizer = tca.load_model("smollm2")
profile = tca.calibrate(model, tokenizer)      # or tca.profile_for("smollm2"), pre-calibrated
with tca.apply(model, profile) as run:
    model.generate(...)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _aliases

# The one place the version is written (pyproject.toml reads it). It goes up whenever a default
# changes, so a result or profile made with other defaults says so; CHANGELOG.md says what changed.
__version__ = "0.6.3"

# Public names and the module that defines each. They are imported on first use (PEP 562), so
# that `import tca` and `tca --help` do not pay for importing transformers (several seconds).
_T = "integrations.transformers"
_EXPORTS = {
    "calibrate": f"{_T}.calibrate",
    "TCAConfig": "core.config",
    "ContextTooLongError": f"{_T}.registration",
    "UnsupportedModelError": f"{_T}.registration",
    "apply": f"{_T}.run",
    "patch": f"{_T}.run",
    "unpatch": f"{_T}.run",
    "load_model": "bundled.models",
    "Profile": "core.profile",
    "ProfileError": "core.profile",
    "profile_for": "bundled.profiles",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; explicit re-exports
    from .bundled.models import load_model as load_model
    from .bundled.profiles import profile_for as profile_for
    from .core.config import TCAConfig as TCAConfig
    from .core.profile import Profile as Profile
    from .core.profile import ProfileError as ProfileError
    from .integrations.transformers.calibrate import calibrate as calibrate
    from .integrations.transformers.registration import ContextTooLongError as ContextTooLongError
    from .integrations.transformers.registration import UnsupportedModelError as UnsupportedModelError
    from .integrations.transformers.run import apply as apply
    from .integrations.transformers.run import patch as patch
    from .integrations.transformers.run import unpatch as unpatch


_aliases.install()  # old flat-layout module paths (tca.hf, tca.select, ...) for one release


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
