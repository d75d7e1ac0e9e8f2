"""The benchmark scripts (``benchmarks/*.py``, not a package), importable by tests (no ``tca`` import)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (imported once; its ``main`` is not run)."""
    module_name = f"benchmarks_{name.replace('/', '_')}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]
