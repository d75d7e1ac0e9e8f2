"""The result file of ``tca eval``: one JSON line per (setting, task, length, seed) row.

One definition of a row serves the runner (which resumes from the file) and the summary and plots
(which read it): a line is a row when it is a JSON object with ``setting``, ``task``, ``length``
and ``seed``. Any other line (blank, garbage, a foreign object) is skipped by both readers and
left in the file: nothing valid after it is ever deleted. Only a torn last line (no newline at
the end: a write interrupted mid-line) is cut off, so that the next append starts a fresh line.

A run holds an exclusive lock on ``OUT.lock`` beside the file (``fcntl.flock``), so two processes
never both append every row to one file. No torch import here.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ResultsBusyError(ValueError):
    """Another process is writing the same result file."""


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a result line (for resuming)."""
    return (row["setting"], row["task"], int(row["length"]), int(row["seed"]))


def parse_row(line: str | bytes) -> dict[str, Any] | None:
    """The row on one line, or None when the line is not a row (blank, not JSON, keys missing)."""
    try:
        row = json.loads(line)
        row_key(row)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None
    return row


def scan(path: Path) -> tuple[list[dict[str, Any]], list[int], int | None]:
    """(rows, 1-based numbers of the non-blank lines that are not rows, byte offset of a torn last
    line or None). A last line without a newline that parses as a row is kept (not torn)."""
    rows, skipped, offset, torn = [], [], 0, None
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            row = parse_row(line)
            if row is None and not line.endswith(b"\n"):
                torn = offset  # an interrupted write: the last line, half there
            elif row is not None:
                rows.append(row)
            elif line.strip():
                skipped.append(number)
            offset += len(line)
    return rows, skipped, torn


def _warn_skipped(path: Path, skipped: list[int]) -> None:
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        message = f"{path}: skipped {len(skipped)} line(s) that are not result rows (line {shown})"
        warnings.warn(message, stacklevel=3)


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a result file, in order; unreadable lines are skipped (with a warning)."""
    rows, skipped, _ = scan(Path(path))
    _warn_skipped(Path(path), skipped)
    return rows


def read_done(path: Path) -> set[tuple]:
    """Keys of the rows already in ``path``. A torn last line is cut off the file and a last row
    without its newline gets one; no other line is changed."""
    if not path.exists():
        return set()
    rows, skipped, torn = scan(path)
    _warn_skipped(path, skipped)
    if torn is not None:
        with path.open("r+b") as handle:
            handle.truncate(torn)
    elif path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("ab") as handle:
            handle.write(b"\n")
    return {row_key(row) for row in rows}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append JSON lines and push them to disk before returning."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def lock_path(out: Path) -> Path:
    """The lock file beside a result file: ``OUT.lock``."""
    return out.with_name(out.name + ".lock")


_held: dict[Path, int] = {}  # lock files this process holds, and how many times (re-entrant)


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of result file ``out`` (re-entrant within a process);
    ResultsBusyError when another process holds it."""
    import fcntl

    lock = lock_path(out).resolve()
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    handle = lock.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ResultsBusyError(
            f"{out} is being written by another `tca eval` (it holds {lock}); wait for it to finish "
            "or pass another --out."
        ) from None
    _held[lock] = 1
    try:
        yield
    finally:
        del _held[lock]
        handle.close()  # releases the lock
