"""Old import paths (``tca.hf``, ``tca.select``, ...) of the flat layout, kept for one release.

Each old module name maps to the modules that now hold its names; importing it gives a module
that looks names up there and warns once (DeprecationWarning) with the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

_T = "tca.integrations.transformers"
OLD_MODULES: dict[str, tuple[str, ...]] = {
    "tca.hf": (f"{_T}.run", f"{_T}.registration", f"{_T}.selector"),
    "tca.cache": (f"{_T}.cache",),
    "tca.layer_pass": (f"{_T}.layer_pass",),
    "tca.calibrate": ("tca.core.calibration", f"{_T}.calibrate"),
    "tca.config": ("tca.core.config",),
    "tca.budgets": ("tca.core.budgets",),
    "tca.select": ("tca.core.selection",),
    "tca.profile": ("tca.core.profile",),
    "tca.retrieval": ("tca.core.retrieval", f"{_T}.calibrate"),
    "tca.error_bound": ("tca.core.error_bound",),
    "tca.stats": ("tca.core.stats",),
    "tca.models": ("tca.bundled.models",),
    "tca.texts": ("tca.bundled.texts",),
    "tca.profiles": ("tca.bundled.profiles",),
    "tca.demo": ("tca.bundled.demo",),
}


class _AliasModule(types.ModuleType):
    def __getattr__(self, name: str):
        for target in OLD_MODULES[self.__name__]:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __call__(self, *args, **kwargs):
        # ``import tca.calibrate`` binds this module over the function ``tca.calibrate``: stay callable
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)

    def __dir__(self):
        return sorted({n for t in OLD_MODULES[self.__name__] for n in dir(importlib.import_module(t))})


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in OLD_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        targets = ", ".join(OLD_MODULES[spec.name])
        warnings.warn(
            f"{spec.name} moved (to {targets}); import from there or from tca. "
            "The old path goes away in the next release.",
            DeprecationWarning,
            stacklevel=3,
        )
        return _AliasModule(spec.name)

    def exec_module(self, module):
        return None


def install() -> None:
    """Make the old module paths importable (idempotent)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
