"""The flat layout's module paths still import for one release, warn, and give the same objects."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import tca
from tca import _aliases

OLD_NAMES = [
    ("tca.hf", "apply", "tca.integrations.transformers.run"),
    ("tca.hf", "ProfileSelector", "tca.integrations.transformers.selector"),
    ("tca.cache", "TCACache", "tca.integrations.transformers.cache"),
    ("tca.select", "select", "tca.core.selection"),
    ("tca.config", "TCAConfig", "tca.core.config"),
    ("tca.budgets", "rank_fractions", "tca.core.budgets"),
    ("tca.profile", "Profile", "tca.core.profile"),
    ("tca.calibrate", "profile_from_retention", "tca.core.calibration"),
    ("tca.calibrate", "measure_retention", "tca.integrations.transformers.calibrate"),
    ("tca.retrieval", "probe_ids", "tca.core.retrieval"),
    ("tca.retrieval", "measure_retrieval", "tca.integrations.transformers.calibrate"),
    ("tca.models", "load_model", "tca.bundled.models"),
    ("tca.profiles", "profile_for", "tca.bundled.profiles"),
]


@pytest.mark.parametrize("old,name,new", OLD_NAMES)
def test_an_old_path_gives_the_moved_object_and_warns(old, name, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(
        issubclass(w.category, DeprecationWarning) and new.split(".")[1] in str(w.message) for w in caught
    )
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_every_old_module_is_covered_and_unknown_names_fail():
    assert {old for old, _, _ in OLD_NAMES} <= set(_aliases.OLD_MODULES)
    module = importlib.import_module("tca.select")
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def test_importing_the_old_calibrate_module_keeps_tca_calibrate_callable():
    importlib.import_module("tca.calibrate")
    assert callable(tca.calibrate)
    assert tca.apply is importlib.import_module("tca.integrations.transformers.run").apply
