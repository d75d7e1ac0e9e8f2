"""Pre-calibrated profiles shipped with the package (``data/profiles/<model>.json``).

Each was made by ``tca calibrate --model <model>`` with its defaults: ``TCAConfig.for_model``,
tau 0.9, the bundled calibration text, 4096 tokens.
"""

from __future__ import annotations

from importlib import resources

from ..core.profile import Profile


def bundled_profiles() -> list[str]:
    """Names of the models that have a bundled profile (e.g. ``["smollm2"]``)."""
    folder = resources.files("tca") / "data" / "profiles"
    if not folder.is_dir():
        return []
    return sorted(
        entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json")
    )


def bundled_profile_path(name: str) -> str:
    """Where the bundled profile of model ``name`` lies (a file inside the installed package);
    a name without one is a ValueError listing the bundled ones and how to calibrate."""
    if name not in bundled_profiles():
        raise ValueError(
            f"no bundled profile for model {name!r} (bundled: {bundled_profiles()}); "
            "make one with `tca calibrate --model MODEL --out PROFILE.json` and pass it with --profile."
        )
    return str(resources.files("tca") / "data" / "profiles" / f"{name}.json")


def profile_for(name: str) -> Profile:
    """The bundled profile of the bundled model ``name`` (``tca.load_model(name)``).

    A name without one is a ValueError listing the bundled ones and how to calibrate.
    """
    bundled_profile_path(name)  # the error for a name without one
    with resources.as_file(resources.files("tca") / "data" / "profiles" / f"{name}.json") as path:
        return Profile.load(path)
