"""Run untrusted, model-generated Python inside an OS sandbox (bubblewrap).

The boundary is the kernel's, set up by `bwrap` (Debian/Ubuntu package `bubblewrap`, >= 0.8):

* namespaces: its own mount, PID, network, IPC, UTS, cgroup and user namespaces, and no further user
  namespaces inside (`--disable-userns`: a nested one would let the program mount an unbounded tmpfs);
* a filesystem of only what the interpreter needs, read-only: /usr (and the /bin, /lib... links or
  directories beside it) and the interpreter's own prefix. The rest of the host (/tmp, /run, /home,
  /etc, the project) is not there at all, so neither its files nor the Unix sockets in it can be
  reached (a socket on a read-only mount still accepts connections);
* one writable place, a tmpfs of `disk_mb` mounted as /dev/shm and holding the work directory (cwd, HOME,
  TMPDIR) and /tmp: the total a run can write, POSIX shared memory included, is bounded, and nothing is
  written to the host's disk (output comes back through pipes, of which the evaluator keeps the head);
* a fresh /proc that shows only the sandbox's processes (the evaluator, its environment and its
  process are out of sight and out of reach of kill/pidfd), a minimal /dev without terminals (an empty,
  read-only /dev/pts: the ptys of bwrap's devpts instance come from the host-wide pool), no network but
  a private loopback, a new session (no terminal to inject input into), no capabilities, and an empty
  environment apart from PATH, HOME, TMPDIR and LANG;
* a seccomp filter (x86-64 and arm64; elsewhere none) that kills the program with SIGSYS, scored
  "forbidden", when it calls memfd_create or creates System V shared memory, semaphores or message queues,
  or makes a call through a 32-bit or x32 ABI: memory that no per-process limit counts;
* resource limits set by the harness before the program runs: address space, CPU seconds, file size,
  64 open descriptors, no core dumps, and a process count that binds because the sandbox runs as an
  unprivileged user in its own user namespace (a limit that root would ignore);
* a wall-clock timeout after which the outermost bwrap process is killed; bwrap's `--die-with-parent`
  and the end of the PID namespace take every process of the run with it, setsid'ed ones included.

As root, two bwrap layers are used. `bwrap` run by root maps the sandbox user to host uid 0, for whom
the kernel ignores RLIMIT_NPROC, and bwrap started directly as an unprivileged user cannot reach an
interpreter under a directory only root may enter (pyenv under /root). So an outer, privileged bwrap
assembles the read-only view with traversable directories, `setpriv` drops to uid/gid 65534 (nobody),
and the inner, unprivileged bwrap builds the sandbox above from that view.

The memory of a run as a whole (all its processes, in-memory files, the tmpfs, pipe and socket buffers,
page cache) is bounded where the evaluator may create memory cgroups: each run gets a cgroup of its own
with `memory_mb + disk_mb` and no swap, every process of the run is born in it, and a run the kernel's
OOM killer had to act on is scored "memory". That is cgroup v1's memory hierarchy (as root, where it is
mounted), or cgroup v2 where the evaluator's own cgroup lists `memory` in its cgroup.subtree_control (the
root cgroup of a container, or a delegated cgroup); found through /proc/self/cgroup and mountinfo, tried
once per process. Elsewhere (e.g. a non-root evaluator under systemd, whose cgroup holds its processes)
there is no such cgroup, and a run's memory is bounded piecewise instead: address space per process times
the process count, the tmpfs size, 64 descriptors per process (pipes, sockets), and the seccomp filter
for what none of those counts.

Where bwrap is missing or cannot create its namespaces, `run_sandboxed` refuses (SandboxUnavailableError,
saying how to enable it) unless MOCE_ALLOW_UNSANDBOXED_CODE=1 opts in to the in-process layers alone: a
fresh `python -I -S` in its own session and temp directory, the same limits and memory cgroup, an audit
hook, a kill of the process group. Those layers contain careless code but not code written to escape (the
audit hook can be switched off from inside, root ignores the process limit, nothing hides the host, no
seccomp filter). The audit hook is also installed inside bwrap, where it turns common mistakes (fork,
subprocess, sockets, writes outside the work dir) into a clear "forbidden" status; the boundary does not
depend on it.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import os
import secrets
import selectors
import shutil
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

from moce_model.evaluation.sandbox_harness import (
    CGROUP_EXIT_CODE,
    ENTER_CGROUP,
    FORBIDDEN_EXIT_CODE,
    MEMORY_EXIT_CODE,
    NONCE_BYTES,
    PRELUDE,
)
from moce_model.evaluation.sandbox_limits import (
    MemoryCgroup,
    memory_cgroup_parent,
    seccomp_filter,
)

SandboxStatus = Literal["passed", "failed", "timeout", "memory", "forbidden", "error"]
ALLOW_UNSANDBOXED_ENV = "MOCE_ALLOW_UNSANDBOXED_CODE"
BWRAP_ENV = "MOCE_BWRAP"
SANDBOX_UID = 65534  # "nobody": what the sandbox runs as when the evaluator is root
_OUTPUT_LIMIT_BYTES = 64 * 1024
_MAX_FILE_BYTES = 16 * 1024 * 1024

# Tasks, threads included, of the sandbox user in the run's user namespace; bwrap's own init and the
# interpreter are two of them. Where no memory cgroup bounds a run, this and the address-space limit
# bound its memory at about _MAX_PROCESSES * memory_mb + disk_mb.
_MAX_PROCESSES = 16

# Descriptors per process. Each one can hold kernel memory that no address-space limit sees (a pipe's
# buffer, a socket's queue, an in-memory file), so the count is what bounds those where no memory cgroup
# does; the host's own limit (often tens of thousands) would not. Plenty for a program and its tests.
_MAX_OPEN_FILES = 64

# One size-limited tmpfs, mounted as /dev/shm, holds the work directory (cwd, HOME, TMPDIR) and /tmp, so
# that the bound is on their total, POSIX shared memory (shm_open, multiprocessing's shared_memory and
# semaphores) included: a tmpfs of its own for /dev/shm would double what a run can write, and bwrap
# cannot link /dev/shm elsewhere (its --dev makes /dev/shm a directory). /tmp is kept apart from the work
# directory because the audit hook allows writes in the latter only, and host paths under /tmp must not
# look like paths inside it.
_SANDBOX_DISK = "/dev/shm"
_SANDBOX_WORKDIR = "/dev/shm/work"
_SANDBOX_TMP = "/dev/shm/tmp"

# Directories next to /usr that a distribution may have as links into it (merged /usr) or as real ones.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
logger = logging.getLogger(__name__)


class SandboxUnavailableError(RuntimeError):
    """No OS sandbox can run generated code here, and running it without one was not allowed."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: SandboxStatus
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class _Isolation:
    """How programs are run: under bwrap (with setpriv when the evaluator is root) or, opted in, without."""

    bwrap: str | None
    setpriv: str | None = None


def run_sandboxed(
    code: str, timeout_s: float = 5.0, memory_mb: int = 512, *, disk_mb: int = 64, audit_hook: bool = True
) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; it passes when it runs to its end.

    `timeout_s` bounds wall-clock time (the whole sandbox is killed when it expires), `memory_mb` the
    address space of each process of the program (the interpreter itself needs ~30 MB) and, where a
    memory cgroup is available, together with `disk_mb` the memory of the whole run; `disk_mb` the
    total it may write (work dir, /tmp and /dev/shm). `audit_hook=False` leaves out the in-process
    audit layer; it exists so that the other layers can be tested on their own, never turn it off to
    score completions.
    Raises SandboxUnavailableError when no OS sandbox is available and MOCE_ALLOW_UNSANDBOXED_CODE=1 is
    not set.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter needs some), got {memory_mb}")
    if disk_mb < 1:
        raise ValueError(f"disk_mb must be >= 1, got {disk_mb}")
    return _execute(_isolation(), code, timeout_s, memory_mb, disk_mb, audit_hook)


def run_sandboxed_many(
    codes: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512, max_workers: int = 2
) -> list[SandboxResult]:
    """`run_sandboxed` over many programs, a few at a time, results in input order."""
    _isolation()  # refuse before starting any
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda code: run_sandboxed(code, timeout_s, memory_mb), codes))


def sandbox_problem() -> str | None:
    """Why no OS sandbox can be used here (None when bwrap works); checked once per process and bwrap path."""
    return _probe(_bwrap_path(), os.geteuid())[1]


def _bwrap_path() -> str | None:
    # Absolute, because runs may start it through ENTER_CGROUP's execv, which does not search PATH.
    configured = os.environ.get(BWRAP_ENV)
    return os.path.abspath(configured) if configured else shutil.which("bwrap", path=_search_path())


def _isolation() -> _Isolation:
    isolation, problem = _probe(_bwrap_path(), os.geteuid())
    if problem is None:
        return isolation
    if os.environ.get(ALLOW_UNSANDBOXED_ENV) == "1":
        _warn_unsandboxed(problem)
        return _Isolation(bwrap=None)
    raise SandboxUnavailableError(
        f"refusing to run model-generated code: no OS sandbox ({problem}). Install bubblewrap >= 0.8 "
        "(Debian/Ubuntu: `apt-get install bubblewrap`; `make test` and `make demo` do it when run as root "
        f"with apt) on a kernel that allows user namespaces, or point {BWRAP_ENV} at a bwrap binary. To run "
        f"generated code with only the in-process safeguards, which do not stop code written to escape, set "
        f"{ALLOW_UNSANDBOXED_ENV}=1."
    )


@functools.lru_cache(maxsize=8)
def _probe(bwrap: str | None, euid: int) -> tuple[_Isolation, str | None]:
    """Runs a trivial program through the full sandbox; a failure names what is missing or what bwrap said."""
    if bwrap is None:
        return _Isolation(None), "bwrap (package bubblewrap) was not found on PATH"
    if not os.access(bwrap, os.X_OK):
        return _Isolation(None), f"{BWRAP_ENV}={bwrap} is not an executable file"
    setpriv = None
    if euid == 0:
        setpriv = shutil.which("setpriv", path=_search_path())
        if setpriv is None:
            return _Isolation(None), "setpriv (package util-linux) was not found; as root it drops to uid 65534"
    isolation = _Isolation(bwrap=bwrap, setpriv=setpriv)
    result = _execute(isolation, "pass", timeout_s=20.0, memory_mb=256, disk_mb=1, audit_hook=False)
    if result.status != "passed":
        said = " / ".join(result.stderr.strip().splitlines()[-3:]) or "no message"
        return isolation, f"{bwrap} could not run a trivial program ({result.status}): {said}"
    return isolation, None


_warned_unsandboxed = False


def _warn_unsandboxed(problem: str) -> None:
    global _warned_unsandboxed
    if not _warned_unsandboxed:
        _warned_unsandboxed = True
        logger.warning("%s=1: running model-generated code WITHOUT an OS sandbox (%s)", ALLOW_UNSANDBOXED_ENV, problem)


def _execute(
    isolation: _Isolation, code: str, timeout_s: float, memory_mb: int, disk_mb: int, audit_hook: bool
) -> SandboxResult:
    nonce = secrets.token_bytes(NONCE_BYTES)
    started = time.monotonic()
    program_fd = os.memfd_create("moce-sandbox-program", os.MFD_CLOEXEC)
    verdict_read, verdict_write = os.pipe2(os.O_CLOEXEC)
    seccomp = seccomp_filter() if isolation.bwrap is not None else None
    seccomp_fd = -1
    try:
        os.write(program_fd, nonce + code.encode("utf-8", "surrogatepass"))
        os.lseek(program_fd, 0, os.SEEK_SET)
        if seccomp is not None:
            seccomp_fd = os.memfd_create("moce-sandbox-seccomp", os.MFD_CLOEXEC)
            os.write(seccomp_fd, seccomp)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
        harness_args = [
            str(program_fd), str(verdict_write),
            str(memory_mb * 1024 * 1024), str(max(1, int(timeout_s + 1.0))), str(_MAX_FILE_BYTES),
            str(_MAX_PROCESSES), str(_MAX_OPEN_FILES), "audit" if audit_hook else "no-audit",
        ]
        python = os.path.realpath(sys.executable)
        memory_limit_bytes = (memory_mb + disk_mb) * 1024 * 1024
        with contextlib.ExitStack() as cleanup:
            if isolation.bwrap is None:
                scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="moce-sandbox-"))
                argv = [python, "-I", "-S", "-c", PRELUDE, *harness_args]
                env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
                cwd = scratch
            else:
                argv = _bwrap_command(isolation, python, disk_mb, seccomp_fd if seccomp_fd >= 0 else None)
                argv += ["-I", "-S", "-c", PRELUDE, *harness_args]
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
                cwd = "/"
            cgroup = _run_cgroup(memory_limit_bytes)
            if cgroup is not None:
                cleanup.callback(cgroup.remove)
                argv = [python, "-I", "-S", "-c", ENTER_CGROUP, cgroup.procs_file, *argv]
            passed_fds = tuple(fd for fd in (program_fd, verdict_write, seccomp_fd) if fd >= 0)
            try:
                process = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True, pass_fds=passed_fds,
                )
            except OSError as exc:
                return SandboxResult(False, "error", None, "", f"sandbox: could not start {argv[0]}: {exc}",
                                     time.monotonic() - started)
            # The evaluator keeps only the read end: once the run is over, nothing can write a verdict.
            os.close(verdict_write)
            verdict_write = -1
            os.close(program_fd)
            program_fd = -1
            returncode, timed_out, stdout, stderr = _supervise(process, timeout_s)
            over_memory = cgroup is not None and cgroup.oom_kills() > 0
        os.set_blocking(verdict_read, False)
        try:
            verdict = os.read(verdict_read, NONCE_BYTES + 1)
        except BlockingIOError:
            verdict = b""
    finally:
        for fd in (program_fd, verdict_write, verdict_read, seccomp_fd):
            if fd >= 0:
                os.close(fd)
    finished = hmac.compare_digest(verdict, nonce)
    status = _status(returncode, timed_out, finished, stderr, over_memory, seccomp is not None)
    # The reason a limit of the sandbox ended the run, where the program's own output cannot say it.
    if status == "memory" and over_memory:
        stderr += (f"\nsandbox: the run went over its memory limit of {memory_mb + disk_mb} MB (memory_mb + "
                   "disk_mb: all its processes, in-memory files, /dev/shm, /tmp and the work directory)\n")
    elif status == "forbidden" and returncode in _SIGSYS_CODES and seccomp is not None:
        stderr += ("\nsandbox: forbidden operation: a system call the sandbox refuses (memfd_create, or System V "
                   "shared memory, semaphores or message queues: memory outside the run's limits)\n")
    elif returncode == CGROUP_EXIT_CODE and "sandbox: could not enter the memory cgroup" in stderr:
        status = "error"
    return SandboxResult(status == "passed", status, returncode, stdout, stderr, time.monotonic() - started)


_SIGSYS_CODES = (-signal.SIGSYS, 128 + signal.SIGSYS)  # killed by the seccomp filter (bwrap reports 128 + signal)
_warned_no_cgroup = False


def _run_cgroup(limit_bytes: int) -> MemoryCgroup | None:
    """A memory cgroup for one run, where the evaluator may create them (see memory_cgroup_parent)."""
    global _warned_no_cgroup
    parent = memory_cgroup_parent()
    if parent is None:
        return None
    try:
        return MemoryCgroup.create(parent, limit_bytes)
    except OSError as exc:
        if not _warned_no_cgroup:
            _warned_no_cgroup = True
            logger.warning("running sandboxed code without a memory cgroup, could not create one under %s: %s",
                           parent.path, exc)
        return None


def _supervise(process: subprocess.Popen, timeout_s: float) -> tuple[int, bool, str, str]:
    """Waits for the run while keeping the head of its output; kills it all at the deadline."""
    deadline = time.monotonic() + timeout_s
    heads = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    exited = os.pidfd_open(process.pid)
    timed_out = False
    ended = False
    # Once the process has ended or been killed, its pipes are read for at most this long: under bwrap
    # they close with it (the PID namespace ends), without bwrap a process that left the group may
    # hold them open.
    grace_until: float | None = None
    with selectors.DefaultSelector() as selector:
        for fd in heads:
            selector.register(fd, selectors.EVENT_READ)
        selector.register(exited, selectors.EVENT_READ)
        try:
            while not ended or len(selector.get_map()) > 0:
                now = time.monotonic()
                if grace_until is None and now >= deadline:
                    timed_out = True
                    _kill(process)
                    grace_until = now + 1.0
                if grace_until is not None and now >= grace_until:
                    break
                for key, _ in selector.select((grace_until if grace_until is not None else deadline) - now):
                    if key.fd == exited:
                        selector.unregister(exited)
                        ended = True
                        _kill(process)  # whatever it left behind in its group
                        grace_until = min(grace_until or float("inf"), time.monotonic() + 1.0)
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                    elif len(heads[key.fd]) < _OUTPUT_LIMIT_BYTES:
                        heads[key.fd] += chunk[: _OUTPUT_LIMIT_BYTES - len(heads[key.fd])]
        finally:
            os.close(exited)
    returncode = process.wait()
    stdout_head, stderr_head = heads[process.stdout.fileno()], heads[process.stderr.fileno()]
    process.stdout.close()
    process.stderr.close()
    return returncode, timed_out, stdout_head.decode("utf-8", "replace"), stderr_head.decode("utf-8", "replace")


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL to the run's process group (it leads its own session). Under bwrap that is bwrap itself,
    and its --die-with-parent and PID namespace end everything inside."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _bwrap_command(isolation: _Isolation, python: str, disk_mb: int, seccomp_fd: int | None) -> list[str]:
    extra = _outside_system_dirs([sys.base_prefix, sys.base_exec_prefix, str(Path(python).parent.parent)])
    inner = [
        isolation.bwrap,
        "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
        *_read_only_view(extra),
        "--proc", "/proc", "--dev", "/dev",
        # bwrap's /dev has a devpts instance of its own, but its terminals come from the host-wide pool
        # (kernel.pty.max): an empty, read-only /dev/pts covers it (and /dev/ptmx links into it).
        "--tmpfs", "/dev/pts", "--remount-ro", "/dev/pts",
        "--size", str(disk_mb * 1024 * 1024), "--tmpfs", _SANDBOX_DISK,
        "--dir", _SANDBOX_WORKDIR, "--dir", _SANDBOX_TMP, "--symlink", _SANDBOX_TMP, "/tmp",
        "--chdir", _SANDBOX_WORKDIR,
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", _SANDBOX_WORKDIR,
        "--setenv", "TMPDIR", _SANDBOX_WORKDIR, "--setenv", "LANG", "C.UTF-8",
        # Last: the root and /dev are tmpfs mounts bwrap made writable for its own set-up; left so, they
        # would be unbounded places to write.
        "--remount-ro", "/dev", "--remount-ro", "/",
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        python,
    ]
    if isolation.setpriv is None:
        return inner
    tools = _outside_system_dirs([str(Path(isolation.bwrap).parent), str(Path(isolation.setpriv).parent)])
    outer = [
        isolation.bwrap,
        "--unshare-pid", "--die-with-parent", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
        "--cap-add", "CAP_SETGID",
        *_read_only_view(_outside_system_dirs(extra + tools)),
        # The inner bwrap mounts its own /proc, which the kernel allows in a user namespace only where a
        # procfs is already fully visible: the host's, not one with bwrap's read-only overlays.
        "--bind", "/proc", "/proc", "--dev", "/dev",
        "--dir", "/tmp",  # where the inner bwrap assembles its root
        isolation.setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
        "--inh-caps=-all",
    ]
    return outer + inner


def _read_only_view(extra: list[str]) -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    made = set()
    for path in extra:
        # Directories on the way are created traversable: a privileged bwrap would make them 0700.
        for parent in reversed(Path(path).parents):
            if str(parent) != "/" and str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
    return args


def _outside_system_dirs(paths: list[str]) -> list[str]:
    """The real paths among `paths` not already inside /usr & co. or inside each other, shortest first."""
    kept: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths}, key=len):
        covered = [*(os.path.realpath(d) for d in _SYSTEM_DIRS if os.path.isdir(d)), *kept]
        if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in covered):
            kept.append(path)
    return kept


def _search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin", "/usr/sbin", "/sbin"])


def _status(
    returncode: int, timed_out: bool, finished: bool, stderr: str, over_memory: bool = False,
    seccomp: bool = False,
) -> SandboxStatus:
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"
    if over_memory:  # even if the program carried on after the kernel killed one of its processes
        return "memory"
    if returncode == FORBIDDEN_EXIT_CODE and "sandbox: forbidden operation" in stderr:
        return "forbidden"
    if seccomp and returncode in _SIGSYS_CODES:
        return "forbidden"
    if returncode == MEMORY_EXIT_CODE or "MemoryError" in stderr[-2000:]:
        return "memory"
    if returncode == 0 and finished:
        return "passed"
    return "failed"
