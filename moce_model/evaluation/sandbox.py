"""Run untrusted, model-generated Python in a contained subprocess.

Layers of containment, each covering a gap of the others:

* a fresh interpreter (`python -I -S`: isolated, no site-packages) in its own session, with a fresh
  temporary directory as cwd, HOME and TMPDIR and a minimal environment;
* resource limits (address space, CPU seconds, file size, no core dumps, process count) set by the
  child itself before the program runs. They are not set in a `preexec_fn`: that hook runs Python
  between fork and exec, which can deadlock in a threaded parent (torch, or our own thread pool);
* an audit hook installed before the program runs that ends the process at once (so the program cannot
  catch it and carry on) on: process creation (fork, exec, spawn, system, subprocess), signals to other
  processes, native code (ctypes), sockets, and any write, delete, rename or permission change outside
  the temporary directory;
* a wall-clock timeout after which the whole process group is killed, and a kill of the group after
  every run so that no child process outlives its program.

The RLIMIT_NPROC limit does not bind root, which is why the audit hook blocks process creation too.
This contains accidents and careless code (infinite loops, fork bombs, `rm -rf`, memory blow-ups); it is
not a security boundary against code written to escape an interpreter.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SandboxStatus = Literal["passed", "failed", "timeout", "memory", "forbidden", "error"]

_MEMORY_EXIT_CODE = 85
_FORBIDDEN_EXIT_CODE = 86
_EARLY_EXIT_CODE = 87
_OUTPUT_LIMIT_BYTES = 64 * 1024
_MAX_FILE_BYTES = 16 * 1024 * 1024

# Runs in the child before the program. Reads the program, applies the limits, installs the audit hook,
# then executes the program; prints a per-run token on normal completion so that a program which exits
# early (sys.exit(0) before its tests) is not mistaken for a pass.
_PRELUDE = r'''
import os, sys, resource
_program_path, _workdir, _token = sys.argv[1], sys.argv[2], sys.argv[3]
_memory_bytes, _cpu_seconds, _file_bytes = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
_audited = sys.argv[7] == "audit"
with open(_program_path, encoding="utf-8") as _f:
    _source = _f.read()
_code = compile(_source, "<program>", "exec")
resource.setrlimit(resource.RLIMIT_AS, (_memory_bytes, _memory_bytes))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu_seconds, _cpu_seconds))
resource.setrlimit(resource.RLIMIT_FSIZE, (_file_bytes, _file_bytes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

_realpath, _join, _isabs, _fspath = os.path.realpath, os.path.join, os.path.isabs, os.fspath
_write, _exit = os.write, os._exit
_readlink = os.readlink
_root = _realpath(_workdir)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
})
_NETWORK_EVENTS = frozenset({
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request", "http.client.connect",
})
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "cffi"})
# event -> positions of path arguments, and the position of their dir_fd argument (or None).
_PATH_EVENTS = {
    "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), None), "os.link": ((0, 1), None), "os.symlink": ((1,), 2),
    "os.truncate": ((0,), None), "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.lchown": ((0,), None),
    "os.chflags": ((0,), None), "os.lchflags": ((0,), None), "os.lchmod": ((0,), None),
    "os.utime": ((0,), 3), "os.setxattr": ((0,), None), "os.removexattr": ((0,), None),
    "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3),
    "shutil.rmtree": ((0,), 1), "shutil.copyfile": ((1,), None), "shutil.copymode": ((1,), None),
    "shutil.copystat": ((1,), None), "shutil.move": ((0, 1), None), "shutil.chown": ((0,), None),
}
_in_hook = False

def _forbid(what):
    _write(2, ("sandbox: forbidden operation: " + what + "\n").encode("utf-8", "replace"))
    _exit(%(forbidden)d)

def _inside_workdir(path, dir_fd=None):
    if isinstance(path, int):
        return True  # an already-open descriptor: its opening was checked
    path = _fspath(path)
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    if not _isabs(path) and dir_fd is not None and dir_fd >= 0:
        path = _join(_readlink("/proc/self/fd/%%d" %% dir_fd), path)
    resolved = _realpath(path)
    return resolved == _root or resolved.startswith(_root + os.sep)

def _audit(event, args):
    global _in_hook
    if _in_hook:
        return
    _in_hook = True
    try:
        if event in _PROCESS_EVENTS:
            _forbid(event)
        elif event in _NETWORK_EVENTS:
            _forbid(event)
        elif event == "import" and args[0] in _BLOCKED_MODULES:
            _forbid("import " + args[0])
        elif event.startswith("ctypes."):
            _forbid(event)
        elif event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and path is not None and not _inside_workdir(path):
                _forbid("open %%r for writing" %% (path,))
        elif event in _PATH_EVENTS:
            positions, dir_fd_position = _PATH_EVENTS[event]
            dir_fd = args[dir_fd_position] if dir_fd_position is not None and len(args) > dir_fd_position else None
            for position in positions:
                if position < len(args) and not _inside_workdir(args[position], dir_fd if isinstance(dir_fd, int) else None):
                    _forbid("%%s %%r" %% (event, args[position]))
    finally:
        _in_hook = False

import _posixsubprocess
def _no_fork_exec(*args, **kwargs):
    _forbid("_posixsubprocess.fork_exec")
if _audited:
    _posixsubprocess.fork_exec = _no_fork_exec
    sys.addaudithook(_audit)
del resource, _f
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(_code, _globals)
except MemoryError:
    _exit(%(memory)d)
except SystemExit as exc:
    if exc.code in (None, 0):
        _write(2, b"sandbox: program exited before it finished\n")
        _exit(%(early_exit)d)
    raise
sys.stdout.flush()
_write(1, ("\n" + _token + "\n").encode())
''' % {"forbidden": _FORBIDDEN_EXIT_CODE, "memory": _MEMORY_EXIT_CODE, "early_exit": _EARLY_EXIT_CODE}


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: SandboxStatus
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def run_sandboxed(
    code: str, timeout_s: float = 5.0, memory_mb: int = 512, *, audit_hook: bool = True
) -> SandboxResult:
    """Run `code` as a Python program in a contained subprocess; it passes when it runs to its end.

    `timeout_s` bounds wall-clock time (the whole process group is killed when it expires), `memory_mb`
    the address space of the interpreter running the program (the interpreter itself needs ~30 MB).
    `audit_hook=False` leaves out the audit layer; it exists so that the other layers can be tested on
    their own, never turn it off to score completions.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter needs some), got {memory_mb}")
    token = "sandbox-finished-" + secrets.token_hex(16)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moce-sandbox-") as outer:
        outer_dir = Path(outer)
        workdir = outer_dir / "work"
        workdir.mkdir()
        program_path = outer_dir / "program.py"
        program_path.write_text(code, encoding="utf-8")
        argv = [
            sys.executable, "-I", "-S", "-c", _PRELUDE,
            str(program_path), str(workdir), token,
            str(memory_mb * 1024 * 1024), str(max(1, int(timeout_s + 1.0))), str(_MAX_FILE_BYTES),
            "audit" if audit_hook else "no-audit",
        ]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        with open(outer_dir / "stdout", "wb") as stdout_file, open(outer_dir / "stderr", "wb") as stderr_file:
            try:
                process = subprocess.Popen(
                    argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=stdout_file,
                    stderr=stderr_file, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                return SandboxResult(False, "error", None, "", f"sandbox: could not start: {exc}",
                                     time.monotonic() - started)
            timed_out = False
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process.pid)
                returncode = process.wait()
            # Also after a normal exit: a program may have left a process behind in its group.
            _kill_group(process.pid)
        stdout = _read_head(outer_dir / "stdout")
        stderr = _read_head(outer_dir / "stderr")
    finished = stdout.rstrip("\n").endswith(token)
    if finished:
        stdout = stdout.rstrip("\n")[: -len(token)].removesuffix("\n")
    status = _status(returncode, timed_out, finished, stderr)
    return SandboxResult(status == "passed", status, returncode, stdout, stderr, time.monotonic() - started)


def run_sandboxed_many(
    codes: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512, max_workers: int = 2
) -> list[SandboxResult]:
    """`run_sandboxed` over many programs, a few at a time, results in input order."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda code: run_sandboxed(code, timeout_s, memory_mb), codes))


def _status(returncode: int, timed_out: bool, finished: bool, stderr: str) -> SandboxStatus:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == _FORBIDDEN_EXIT_CODE and "sandbox: forbidden operation" in stderr:
        return "forbidden"
    if returncode == _MEMORY_EXIT_CODE or "MemoryError" in stderr[-2000:]:
        return "memory"
    if returncode == 0 and finished:
        return "passed"
    return "failed"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_head(path: Path) -> str:
    with open(path, "rb") as handle:
        return handle.read(_OUTPUT_LIMIT_BYTES).decode("utf-8", "replace")
