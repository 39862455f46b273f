"""Atomic writes: every file and directory appears whole or not at all (temp + rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...); what was there before is intact."""


def _write_error(path: Path, e: OSError) -> WriteError:
    why = e.strerror or str(e)
    return WriteError(e.errno, f"cannot write {path}: {why}. Free disk space or fix the permissions of "
                               f"{path.parent}, then rerun: earlier outputs are intact and the run resumes")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error removed.

    An OSError while writing (disk full, permission denied) becomes a WriteError naming the path.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json_object(path: str | Path, error: type[Exception], what: str, fix: str) -> dict:
    """A JSON object read from a file someone else may have written: unreadable bytes, bad JSON, nesting
    deep enough to exhaust the parser's recursion, or a non-object top level raise `error` naming the
    file, `what` it should be and the `fix` (never a traceback from inside the parser)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, dict):
            raise TypeError(f"a JSON {type(obj).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise error(f"{path}: not a readable {what} ({why}); {fix}") from None
    return obj


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON (indented, sorted keys) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> None:
    """Save a matplotlib figure atomically, in the format its path's suffix names (png by default)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> None:
    """Write a parquet file atomically."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def changed_keys(recorded: dict, expected: dict, prefix: str = "") -> list[str]:
    """Dotted keys of `expected` whose value in `recorded` differs (nested dicts compared key by key)."""
    out = []
    for k, v in expected.items():
        old = recorded.get(k) if isinstance(recorded, dict) else None
        if isinstance(v, dict) and isinstance(old, dict):
            out += changed_keys(old, v, f"{prefix}{k}.")
        elif old != v:
            out.append(f"{prefix}{k}")
    return out


def compare_record(path: str | Path, expected: dict) -> list[str] | None:
    """How the JSON record at `path` (what a finished piece of work was made with) compares with what
    the current run would make: None when there is no record, [] when it matches, else the changed keys.

    Every stage that resumes asks this one question before it reuses earlier output.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return ["(unreadable record)"]
    return changed_keys(recorded, expected)


def move_aside(path: str | Path) -> Path:
    """Rename `path` to `<name>.stale-<unix time>` beside it (kept, never deleted); returns the new path."""
    path = Path(path)
    stale = path.with_name(f"{path.name}.stale-{int(time.time())}")
    path.rename(stale)
    return stale
