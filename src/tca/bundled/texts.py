"""The real texts bundled with the package (public domain prose, PSF-licensed docs and code).

``data/texts/MANIFEST.json`` lists each file with its title, author, source and licence;
``data/texts/LICENSES.md`` states the licences.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=1)
def manifest() -> list[dict[str, Any]]:
    """Entries of MANIFEST.json: file, title, author, kind, role, source, licence, chars, sha256."""
    data = json.loads((resources.files("tca") / "data" / "texts" / "MANIFEST.json").read_text("utf-8"))
    return data if isinstance(data, list) else data["files"]


def read_text(file: str) -> str:
    """The text of one bundled file (a name from ``manifest()``)."""
    names = [entry["file"] for entry in manifest()]
    if file not in names:
        raise ValueError(f"no bundled text {file!r}; bundled: {names}")
    return (resources.files("tca") / "data" / "texts" / file).read_text("utf-8")


def calibration_text() -> str:
    """The default calibration text (the manifest entry whose role is 'calibration')."""
    return read_text(next(e["file"] for e in manifest() if e["role"] == "calibration"))


def evaluation_texts(kind: str = "prose") -> dict[str, str]:
    """Bundled evaluation texts of one kind ('prose', 'docs' or 'code'), never the calibration text."""
    return {
        e["file"]: read_text(e["file"]) for e in manifest() if e["role"] == "evaluation" and e["kind"] == kind
    }
