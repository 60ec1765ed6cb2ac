"""The code a sandboxed run executes before the program: the harness that sets the run's limits, installs the
audit hook and runs the program (`PRELUDE`), the step that enters a run's memory cgroup (`ENTER_CGROUP`), and the
exit codes by which they report what stopped a run."""

from __future__ import annotations

MEMORY_EXIT_CODE = 85
FORBIDDEN_EXIT_CODE = 86
EARLY_EXIT_CODE = 87
NONCE_BYTES = 32
CGROUP_EXIT_CODE = 88

# The evaluator starts each run through this when the run has a memory cgroup: the process moves itself
# into the cgroup ("0" is the writer) and only then becomes bwrap, so that every process of the run,
# bwrap's first fork included, is born inside it. Popen's preexec_fn could do the same without the extra
# interpreter, but it is not safe in a process with threads, and runs are started from a thread pool.
ENTER_CGROUP = r'''
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)
except OSError as exc:
    os.write(2, ("sandbox: could not enter the memory cgroup %%s: %%s\n" %% (sys.argv[1], exc)).encode())
    os._exit(%(code)d)
os.execv(sys.argv[2], sys.argv[2:])
''' % {"code": CGROUP_EXIT_CODE}

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
PRELUDE = r'''
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
''' % {"forbidden": FORBIDDEN_EXIT_CODE, "memory": MEMORY_EXIT_CODE, "early_exit": EARLY_EXIT_CODE,
       "nonce_bytes": NONCE_BYTES}
