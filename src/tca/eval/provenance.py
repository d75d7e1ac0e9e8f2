"""Where a result came from, stored with every result file: one helper for every script.

``provenance(device, config)`` gives the command line (to run again), the commit and whether the
working tree had uncommitted changes, the package version (``tca``), the UTC date, the device,
the attention backend, the library versions and ``config``: the resolved configuration the
result was made with (every option after defaults, the ``TCAConfig`` used), as plain JSON.
``benchmarks/results/README.md`` describes the fields; ``tests/test_results.py`` checks every
committed result has them and that its command parses with today's script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[3]  # src/tca/eval/provenance.py -> the repository root


def device_name(device: str | torch.device) -> str:
    """A human name for the device: the GPU's name, or the CPU's architecture."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


CODE = ("src", "benchmarks", ":(exclude)benchmarks/results")  # what computes a result


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD's 40-hex hash, whether the code, tracked files under ``CODE``, differs from it) of the
    checkout that holds this package; ``$TCA_COMMIT`` when set (whoever copied the tree to another
    machine names the commit: a copy may carry a stale .git); (None, None) outside a checkout."""
    given = os.environ.get("TCA_COMMIT")  # a copy of the tree (a GPU machine): the commit it was copied from
    if given:
        return given, None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE)
    return commit, None if changes is None else bool(changes)


def command_line(argv: list[str] | None = None) -> str:
    """This process's command, as one would type it again from the repository root: ``tca eval
    ...`` for the CLI, ``python benchmarks/needle.py ...`` for a script in the repository."""
    program, *rest = sys.argv if argv is None else argv
    path = Path(program)
    if path.name == "tca" or path.parts[-2:] == ("cli", "__main__.py"):
        words = ["tca"]
    else:
        resolved = path.resolve()
        inside = resolved.is_relative_to(REPO)
        words = ["python", str(resolved.relative_to(REPO)) if inside else program]
    return " ".join(shlex.quote(word) for word in [*words, *rest])


def plain(value: Any) -> Any:
    """``value`` as JSON: dataclasses (``TCAConfig``) as dicts, paths as strings, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def provenance(device: str | torch.device, config: Any = None) -> dict[str, Any]:
    """Command, commit, package version, date, device, backend and library versions of this
    process, and ``config`` (the resolved configuration: a dict, a dataclass or an
    ``argparse.Namespace``) as plain JSON. Spread it into the result: ``{**provenance(...), ...}``."""
    import transformers

    from .. import __version__, ops

    commit, dirty = git_commit()
    info = {
        "command": command_line(),
        "commit": commit,
        "dirty": dirty,
        "tca": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "backend": ops.backend_for(torch.device(device)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if config is not None:
        info["config"] = plain(vars(config) if isinstance(config, argparse.Namespace) else config)
    return info


def eval_config(spec: Any, model: Any) -> dict[str, Any]:
    """The resolved configuration of a ``tca eval`` run: every field of its ``EvalSpec`` and, per
    setting, what it runs (a TCA setting's full ``TCAConfig`` for ``model``, its options applied)."""
    from ..core.config import TCAConfig

    settings = {}
    for setting in spec.settings():
        entry: dict[str, Any] = {"method": setting.method}
        if setting.method == "tca":
            tca = TCAConfig.for_model(model).replace(tau=setting.tau, **dict(setting.options))
            entry |= {"tau": setting.tau, "calibration": spec.calibration, "tca": tca.to_dict()}
        elif setting.method != "full":
            entry["kept_fraction"] = setting.kept_fraction
        settings[setting.key] = entry
    return {"eval": plain(spec), "settings": settings}
