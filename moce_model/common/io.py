"""Atomic file writes: every artifact appears complete or not at all.

A temp file (or directory) is written next to the target, so the final ``os.replace`` stays on one
filesystem and is atomic; a crash leaves at most a stray ``.tmp-*`` entry, never a half-written artifact.
Temp names carry the writer's process id, and the next write of the same target removes the entries that a
process no longer alive left behind (a killed merge of a 7B model would otherwise leave gigabytes behind).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model and training core import this module on GPU machines without polars
    import polars as pl


def _temp_prefix(kind: str, path: Path) -> str:
    return f".{kind}-{path.name}-{os.getpid()}-"


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp and set-aside entries of ``path`` left by writers that are no longer running.

    Only names this module makes are touched (``.tmp-<name>-<pid>-<8 chars>``, ``.old-...``), and only where
    that process is gone, so a concurrent writer's work in progress is left alone. Returns what was removed.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    # mkstemp/mkdtemp add exactly 8 characters from this alphabet; anchoring on them keeps the name of another
    # target that merely starts with this one (``model`` vs ``model-2``) from matching.
    pattern = re.compile(rf"\.(?:tmp|old)-{re.escape(target.name)}-(\d+)-[a-z0-9_]{{8}}")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or _process_is_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _temp_path_next_to(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix("tmp", path), dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform, where it is harmless to skip.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp file path next to ``path``; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    tmp = _temp_path_next_to(target)
    try:
        yield tmp
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | os.PathLike[str], indent: int = 2) -> Path:
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n", path)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def atomic_write_parquet(df: pl.DataFrame, path: str | os.PathLike[str], compression: str = "zstd") -> Path:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression=compression)
    return Path(path)


def atomic_write_arrow_parquet(table: Any, path: str | os.PathLike[str], compression: str = "zstd") -> Path:
    """Write a ``pyarrow.Table`` (keeps exact Arrow types such as fixed-size lists)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp directory next to ``path``; on success it replaces ``path`` as a whole.

    An existing ``path`` is moved aside first and deleted only after the new directory is in place, so a
    reader never sees a mix of old and new files.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix("tmp", target), dir=target.parent))
    # mkdtemp creates 0700; the published directory gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        old: Path | None = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix("old", target), dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
