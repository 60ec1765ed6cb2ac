"""Kill a process at a chosen point of its work: the N-th write under a directory, or the N-th call of a named
function, by SIGKILL from inside, so the point is exact and the same on every run of the test.

Points are counted by an audit hook (`sys.addaudithook`): opening a file for writing, renaming, removing or
creating an entry under the watched directory, and calls of the functions named with `instrument`. The hook
fires before the operation, so the kill lands between a temporary file being written and its rename, between
the files of a checkpoint, between two batches of generation. A first, uninterrupted run counts the points
(`count_points`, in the test process); the killed run (`run_killed`, a child process running
`python -m tests.fault_injection`) dies at a point drawn from that count with a seeded generator.

Only events under the watched directory (and the named calls) count, so the Python imports, caches and library
files that differ between a fresh process and the test process do not shift the count.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CALL_EVENT = "fault_injection.call"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Audit events that change the filesystem, and which of their arguments are paths.
_PATH_EVENTS = {
    "os.rename": (0, 1),  # os.rename and os.replace
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.truncate": (0,),
    "shutil.rmtree": (0,),
    "shutil.move": (0, 1),
}


class _Watch:
    """What the one audit hook of this process does: nothing, count points, or kill at one."""

    root: str | None = None
    count = 0
    kill_at: int | None = None
    points: list[str] = []


_hook_installed = False


def _under_root(path: Any) -> bool:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return False  # a file descriptor
    return os.path.abspath(os.fspath(path)).startswith(_Watch.root + os.sep)


def _is_point(event: str, args: tuple) -> str | None:
    if event == CALL_EVENT:
        return f"call {args[0]}"
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes and _under_root(path):
            return f"open {path}"
        return None
    positions = _PATH_EVENTS.get(event)
    if positions is not None and any(i < len(args) and _under_root(args[i]) for i in positions):
        return f"{event} {args[positions[0]]}"
    return None


def _hook(event: str, args: tuple) -> None:
    if _Watch.root is None:
        return
    point = _is_point(event, args)
    if point is None:
        return
    _Watch.count += 1
    _Watch.points.append(point)
    if _Watch.kill_at is not None and _Watch.count == _Watch.kill_at:
        sys.stderr.write(f"fault_injection: SIGKILL at point {_Watch.count}: {point}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _install_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_hook)  # an audit hook cannot be removed; it does nothing while no root is watched
        _hook_installed = True


def _resolve(target: str) -> tuple[Any, str]:
    module_name, _, attribute_path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attribute_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


@contextmanager
def instrument(targets: Sequence[str]) -> Iterator[None]:
    """Make every call of the named functions (``module:function`` or ``module:Class.method``) a point."""
    originals = []
    for target in targets:
        owner, name = _resolve(target)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def wrapper(*args, __original=original, __target=target, **kwargs):
            sys.audit(CALL_EVENT, __target)
            return __original(*args, **kwargs)

        originals.append((owner, name, original))
        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


@contextmanager
def watching(root: Path, kill_at: int | None = None) -> Iterator[type[_Watch]]:
    _install_hook()
    _Watch.root, _Watch.count, _Watch.kill_at, _Watch.points = str(Path(root).resolve()), 0, kill_at, []
    try:
        yield _Watch
    finally:
        _Watch.root, _Watch.kill_at = None, None


def call(target: str, spec: dict[str, Any]) -> Any:
    owner, name = _resolve(target)
    return getattr(owner, name)(spec)


def count_points(root: Path, target: str, spec: dict[str, Any], calls: Sequence[str] = ()) -> tuple[int, list[str]]:
    """Run ``target(spec)`` here, uninterrupted; the number of points it passed and what they were."""
    with instrument(calls), watching(root) as watch:
        call(target, spec)
    return watch.count, list(watch.points)


def run_killed(root: Path, target: str, spec: dict[str, Any], kill_at: int, calls: Sequence[str] = (),
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``target(spec)`` in a child process that SIGKILLs itself at point ``kill_at``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "tests.fault_injection", "--root", str(root), "--target", target,
               "--spec", json.dumps(spec), "--kill-at", str(kill_at), *(f"--call={c}" for c in calls)]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--kill-at", type=int, required=True)
    parser.add_argument("--call", action="append", default=[])
    args = parser.parse_args(argv)
    with instrument(args.call), watching(Path(args.root), kill_at=args.kill_at):
        call(args.target, json.loads(args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())

