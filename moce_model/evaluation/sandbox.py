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

SandboxStatus = Literal["passed", "failed", "timeout", "memory", "forbidden", "error"]

ALLOW_UNSANDBOXED_ENV = "MOCE_ALLOW_UNSANDBOXED_CODE"
BWRAP_ENV = "MOCE_BWRAP"
SANDBOX_UID = 65534  # "nobody": what the sandbox runs as when the evaluator is root

_MEMORY_EXIT_CODE = 85
_FORBIDDEN_EXIT_CODE = 86
_EARLY_EXIT_CODE = 87
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
_NONCE_BYTES = 32
# One size-limited tmpfs, mounted as /dev/shm, holds the work directory (cwd, HOME, TMPDIR) and /tmp, so
# that the bound is on their total, POSIX shared memory (shm_open, multiprocessing's shared_memory and
# semaphores) included: a tmpfs of its own for /dev/shm would double what a run can write, and bwrap
# cannot link /dev/shm elsewhere (its --dev makes /dev/shm a directory). /tmp is kept apart from the work
# directory because the audit hook allows writes in the latter only, and host paths under /tmp must not
# look like paths inside it.
_SANDBOX_DISK = "/dev/shm"
_SANDBOX_WORKDIR = "/dev/shm/work"
_SANDBOX_TMP = "/dev/shm/tmp"
_CGROUP_EXIT_CODE = 88
# The evaluator starts each run through this when the run has a memory cgroup: the process moves itself
# into the cgroup ("0" is the writer) and only then becomes bwrap, so that every process of the run,
# bwrap's first fork included, is born inside it. Popen's preexec_fn could do the same without the extra
# interpreter, but it is not safe in a process with threads, and runs are started from a thread pool.
_ENTER_CGROUP = r'''
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)
except OSError as exc:
    os.write(2, ("sandbox: could not enter the memory cgroup %%s: %%s\n" %% (sys.argv[1], exc)).encode())
    os._exit(%(code)d)
os.execv(sys.argv[2], sys.argv[2:])
''' % {"code": _CGROUP_EXIT_CODE}
# Directories next to /usr that a distribution may have as links into it (merged /usr) or as real ones.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

logger = logging.getLogger(__name__)

# The success signal. A run passes only when the evaluator reads, from a pipe of its own, the per-run
# nonce that the harness writes after the program has run to its end. The program cannot forge it by
# printing (stdout and stderr are not read for it), by exiting early in any way (sys.exit, os._exit, a
# signal, exec, killing its parent: the nonce is written only after `exec` of the program returns), or
# by reading it from where it came from: the nonce arrives with the source on a descriptor that is
# read and closed before the program starts, and it is never in argv, the environment or a file.
# What no design can give while the harness and the program share one interpreter: a program written
# to find the harness's own objects in memory (gc, frames) can still find the nonce and the verdict
# descriptor, exactly as it can defeat the tests appended to it. Moving the verdict to another process
# does not help: that process could learn that the program finished only from the program itself,
# which can then say so early. A pass is therefore as trustworthy as in-process tests are; the
# sandbox's guarantees are about the host, not about the score.
#
# Runs in the sandboxed interpreter before the program: reads the nonce and the source, applies the
# limits, installs the audit hook (unless told not to), runs the program, then writes the verdict.
# Everything lives in function scopes so that the program, which runs as `__main__`, does not see the
# harness's state among its module's globals.
_PRELUDE = r'''
def _harness():
    import os, sys, resource
    program_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    memory_bytes, cpu_seconds, file_bytes, max_processes, max_files = (int(value) for value in sys.argv[3:8])
    audited = sys.argv[8] == "audit"
    chunks = []
    while True:
        chunk = os.read(program_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(program_fd)
    data = b"".join(chunks)
    nonce, source = data[:%(nonce_bytes)d], data[%(nonce_bytes)d:].decode("utf-8", "surrogatepass")
    del data, chunks
    os.set_inheritable(verdict_fd, False)  # a program it execs does not get the verdict descriptor
    code = compile(source, "<program>", "exec")
    del source
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_files != resource.RLIM_INFINITY:
        max_files = min(max_files, hard_files)  # lowering is all an unprivileged process may do
    resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
    if audited:
        _install_audit_hook(os.path.realpath(os.getcwd()))
    write, exit_now = os.write, os._exit
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except MemoryError:
        exit_now(%(memory)d)
    except SystemExit as exc:
        if exc.code in (None, 0):
            write(2, b"sandbox: program exited before it finished\n")
            exit_now(%(early_exit)d)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    write(verdict_fd, nonce)
    os.close(verdict_fd)

def _install_audit_hook(root):
    import os, sys
    realpath, join, isabs, fspath = os.path.realpath, os.path.join, os.path.isabs, os.fspath
    write, exit_now, readlink, sep = os.write, os._exit, os.readlink, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    process_events = frozenset({
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
    })
    network_events = frozenset({
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request", "http.client.connect",
    })
    blocked_modules = frozenset({"ctypes", "_ctypes", "cffi"})
    # event -> positions of path arguments, and the position of their dir_fd argument (or None).
    path_events = {
        "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
        "os.rename": ((0, 1), None), "os.link": ((0, 1), None), "os.symlink": ((1,), 2),
        "os.truncate": ((0,), None), "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.lchown": ((0,), None),
        "os.chflags": ((0,), None), "os.lchflags": ((0,), None), "os.lchmod": ((0,), None),
        "os.utime": ((0,), 3), "os.setxattr": ((0,), None), "os.removexattr": ((0,), None),
        "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3),
        "shutil.rmtree": ((0,), 1), "shutil.copyfile": ((1,), None), "shutil.copymode": ((1,), None),
        "shutil.copystat": ((1,), None), "shutil.move": ((0, 1), None), "shutil.chown": ((0,), None),
    }
    in_hook = [False]

    def forbid(what):
        write(2, ("sandbox: forbidden operation: " + what + "\n").encode("utf-8", "replace"))
        exit_now(%(forbidden)d)

    def inside_workdir(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already-open descriptor: its opening was checked
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not isabs(path) and dir_fd is not None and dir_fd >= 0:
            path = join(readlink("/proc/self/fd/%%d" %% dir_fd), path)
        resolved = realpath(path)
        return resolved == root or resolved.startswith(root + sep)

    def audit(event, args):
        if in_hook[0]:
            return
        in_hook[0] = True
        try:
            if event in process_events or event in network_events or event.startswith("ctypes."):
                forbid(event)
            elif event == "import" and args[0] in blocked_modules:
                forbid("import " + args[0])
            elif event == "open":
                path, mode, flags = args
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & write_flags)
                if writing and path is not None and not inside_workdir(path):
                    forbid("open %%r for writing" %% (path,))
            elif event in path_events:
                positions, dir_fd_position = path_events[event]
                dir_fd = None
                if dir_fd_position is not None and len(args) > dir_fd_position:
                    dir_fd = args[dir_fd_position] if isinstance(args[dir_fd_position], int) else None
                for position in positions:
                    if position < len(args) and not inside_workdir(args[position], dir_fd):
                        forbid("%%s %%r" %% (event, args[position]))
        finally:
            in_hook[0] = False

    import _posixsubprocess

    def no_fork_exec(*args, **kwargs):
        forbid("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = no_fork_exec
    sys.addaudithook(audit)

_harness()
''' % {"forbidden": _FORBIDDEN_EXIT_CODE, "memory": _MEMORY_EXIT_CODE, "early_exit": _EARLY_EXIT_CODE,
       "nonce_bytes": _NONCE_BYTES}


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
    # Absolute, because runs may start it through _ENTER_CGROUP's execv, which does not search PATH.
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
    nonce = secrets.token_bytes(_NONCE_BYTES)
    started = time.monotonic()
    program_fd = os.memfd_create("moce-sandbox-program", os.MFD_CLOEXEC)
    verdict_read, verdict_write = os.pipe2(os.O_CLOEXEC)
    seccomp = _seccomp_filter() if isolation.bwrap is not None else None
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
                argv = [python, "-I", "-S", "-c", _PRELUDE, *harness_args]
                env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
                cwd = scratch
            else:
                argv = _bwrap_command(isolation, python, disk_mb, seccomp_fd if seccomp_fd >= 0 else None)
                argv += ["-I", "-S", "-c", _PRELUDE, *harness_args]
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
                cwd = "/"
            cgroup = _run_cgroup(memory_limit_bytes)
            if cgroup is not None:
                cleanup.callback(cgroup.remove)
                argv = [python, "-I", "-S", "-c", _ENTER_CGROUP, cgroup.procs_file, *argv]
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
            verdict = os.read(verdict_read, _NONCE_BYTES + 1)
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
    elif returncode == _CGROUP_EXIT_CODE and "sandbox: could not enter the memory cgroup" in stderr:
        status = "error"
    return SandboxResult(status == "passed", status, returncode, stdout, stderr, time.monotonic() - started)


_SIGSYS_CODES = (-signal.SIGSYS, 128 + signal.SIGSYS)  # killed by the seccomp filter (bwrap reports 128 + signal)
_warned_no_cgroup = False


def _run_cgroup(limit_bytes: int) -> _MemoryCgroup | None:
    """A memory cgroup for one run, where the evaluator may create them (see _memory_cgroup_parent)."""
    global _warned_no_cgroup
    parent = _memory_cgroup_parent()
    if parent is None:
        return None
    try:
        return _MemoryCgroup.create(parent, limit_bytes)
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
    if returncode == _FORBIDDEN_EXIT_CODE and "sandbox: forbidden operation" in stderr:
        return "forbidden"
    if seccomp and returncode in _SIGSYS_CODES:
        return "forbidden"
    if returncode == _MEMORY_EXIT_CODE or "MemoryError" in stderr[-2000:]:
        return "memory"
    if returncode == 0 and finished:
        return "passed"
    return "failed"


# System calls refused inside bwrap, by the machine they run on: (the kernel's AUDIT_ARCH of its native
# ABI, the bit that marks x32 calls on x86-64 or 0, the numbers of memfd_create, shmget, semget, msgget).
# Each of those makes memory that outlives any mapping and is counted by no per-process limit: an
# in-memory file needs no address space to be written, and a System V segment, semaphore set or message
# queue needs no descriptor either. Python programs get POSIX shared memory through /dev/shm instead,
# which the run's tmpfs bounds.
_SECCOMP_REFUSED = {
    "x86_64": (0xC000003E, 0x40000000, (319, 29, 64, 68)),
    "aarch64": (0xC00000B7, 0, (279, 194, 190, 186)),
}
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x80000000


@functools.lru_cache(maxsize=1)
def _seccomp_filter() -> bytes | None:
    """The classic-BPF program bwrap's --seccomp loads: a refused call, or any call through another ABI
    than the native one (a 32-bit compat or x32 call has other numbers), kills the process with SIGSYS.
    None on a machine not in _SECCOMP_REFUSED.

    Assembled here because libseccomp's Python binding is packaged only for the distribution's own
    interpreter (python3-seccomp), not on PyPI for the project's environment, and the program is a
    dozen instructions (struct seccomp_data: the call's number at offset 0, its ABI at offset 4)."""
    import platform
    import struct

    known = _SECCOMP_REFUSED.get(platform.machine())
    if known is None:
        return None
    arch, x32_bit, refused = known
    checks = [(_BPF_JGE_K, x32_bit)] if x32_bit else []
    checks += [(_BPF_JEQ_K, number) for number in refused]
    length = 3 + len(checks) + 2
    kill = length - 1
    program = [(_BPF_LD_W_ABS, 0, 0, 4), (_BPF_JEQ_K, 0, kill - 2, arch), (_BPF_LD_W_ABS, 0, 0, 0)]
    for opcode, value in checks:
        program.append((opcode, kill - len(program) - 1, 0, value))
    program += [(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


@dataclass(frozen=True)
class _CgroupParent:
    """A cgroup under which each run can get a child with a memory limit of its own."""

    path: str
    version: int  # 1: the v1 memory hierarchy; 2: the unified one


@dataclass(frozen=True)
class _MemoryCgroup:
    """One run's memory cgroup: every process of the run is born in it (see _ENTER_CGROUP), and all the
    memory they cause is charged to it: their RAM, in-memory files, tmpfs pages (the run's /dev/shm,
    /tmp and work directory), System V segments, pipe and socket buffers, page cache. No swap: over the
    limit, the kernel's OOM killer ends a process of the run (cgroup v2: all of them)."""

    path: str
    version: int

    @classmethod
    def create(cls, parent: _CgroupParent, limit_bytes: int) -> _MemoryCgroup:
        path = os.path.join(parent.path, f"moce-sandbox-{os.getpid()}-{secrets.token_hex(6)}")
        os.mkdir(path, 0o755)
        group = cls(path, parent.version)
        try:
            if group.version == 2:
                group._write("memory.max", limit_bytes)
                group._write("memory.swap.max", 0, optional=True)
                group._write("memory.oom.group", 1, optional=True)
            else:
                group._write("memory.limit_in_bytes", limit_bytes)
                # Memory + swap; absent where the kernel does not account swap.
                group._write("memory.memsw.limit_in_bytes", limit_bytes, optional=True)
        except OSError:
            group.remove()
            raise
        return group

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for going over the limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as handle:
                fields = dict(line.split() for line in handle if len(line.split()) == 2)
        except OSError:
            return 0
        return int(fields.get("oom_kill", 0))

    def remove(self, wait_s: float = 2.0) -> None:
        """Kills whatever of the run is still in the cgroup and removes it. Under bwrap nothing is left
        once bwrap has exited but processes the kernel is still tearing down; without bwrap a program
        may have left its session, and the cgroup is what still finds it."""
        deadline = time.monotonic() + wait_s
        while True:
            self._kill_members()
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    logger.warning("could not remove the sandbox's memory cgroup %s: %s", self.path, exc)
                    return
            time.sleep(0.01)

    def _kill_members(self) -> None:
        kill_file = os.path.join(self.path, "cgroup.kill")
        if self.version == 2 and os.path.exists(kill_file):
            with contextlib.suppress(OSError):
                self._write("cgroup.kill", 1)
            return
        try:
            with open(self.procs_file, encoding="ascii") as handle:
                members = [int(line) for line in handle if line.strip()]
        except OSError:
            return
        # Without cgroup.kill (v1) the members are signalled one by one; a pid read here belongs to a
        # process of the run, and could be another's only if it exited and its number came round again
        # within these few microseconds.
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        path = os.path.join(self.path, name)
        if optional and not os.path.exists(path):
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(value).encode("ascii"))
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _memory_cgroup_parent() -> _CgroupParent | None:
    """The evaluator's own cgroup, where it may create children with a memory limit: on cgroup v2 when
    its cgroup.subtree_control lists `memory` (the root cgroup of a container, or a delegated cgroup
    whose processes live in a leaf below it), on cgroup v1 in the memory hierarchy. Found through
    /proc/self/cgroup and /proc/self/mountinfo and tried by creating and removing a child; None where
    neither works (then the seccomp filter and the tmpfs sizes are what bound a run's memory)."""
    for parent in _cgroup_candidates():
        try:
            _MemoryCgroup.create(parent, 64 * 1024 * 1024).remove()
        except OSError as exc:
            logger.debug("no memory cgroups for the sandbox under %s: %s", parent.path, exc)
            continue
        _remove_abandoned_cgroups(parent)
        return parent
    return None


def _remove_abandoned_cgroups(parent: _CgroupParent) -> None:
    """Removes the empty run cgroups of evaluators that are gone: one killed mid-run cannot remove its
    own. Those of live evaluators are left alone, even when empty: a run may be about to enter one."""
    prefix = "moce-sandbox-"
    with contextlib.suppress(OSError):
        for name in os.listdir(parent.path):
            owner = name[len(prefix):].split("-", 1)[0]
            if not name.startswith(prefix) or not owner.isdigit():
                continue
            try:
                os.kill(int(owner), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent.path, name))  # refused while a process is still in it


def _cgroup_candidates() -> list[_CgroupParent]:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            memberships = [line.rstrip("\n").split(":", 2) for line in handle]
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return []
    unified = next((path for hid, names, path in memberships if hid == "0" and names == ""), None)
    v1_memory = next((path for hid, names, path in memberships if "memory" in names.split(",")), None)
    candidates: list[_CgroupParent] = []
    for fields in mounts:
        # mountinfo: id parent major:minor root mount-point options [optional...] - type source super-options
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        fstype, super_options = fields[separator + 1], fields[-1].split(",")
        if fstype == "cgroup2" and unified is not None:
            directory = _cgroup_directory(mount_point, root, unified)
            if directory and "memory" in _read_words(os.path.join(directory, "cgroup.subtree_control")):
                candidates.insert(0, _CgroupParent(directory, 2))
        elif fstype == "cgroup" and "memory" in super_options and v1_memory is not None:
            directory = _cgroup_directory(mount_point, root, v1_memory)
            if directory and os.path.exists(os.path.join(directory, "memory.limit_in_bytes")):
                candidates.append(_CgroupParent(directory, 1))
    return candidates


def _cgroup_directory(mount_point: str, mount_root: str, cgroup_path: str) -> str | None:
    """Where the cgroup `cgroup_path` (as /proc/self/cgroup names it) is under a mount of its hierarchy
    whose root is `mount_root`; None when that mount does not show it."""
    if mount_root != "/":
        if cgroup_path != mount_root and not cgroup_path.startswith(mount_root.rstrip("/") + "/"):
            return None
        cgroup_path = cgroup_path[len(mount_root.rstrip("/")):] or "/"
    directory = os.path.join(mount_point, cgroup_path.lstrip("/"))
    return directory if os.path.isdir(directory) else None


def _read_words(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().split()
    except OSError:
        return []
