"""The sandbox for model-generated code. Escape attempts are judged by their effect on the host (files,
processes, the evaluator, its environment, the network, disk and process counts), not by the status."""

import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moce_model.evaluation import sandbox as sandbox_module
from moce_model.evaluation import sandbox_limits
from moce_model.evaluation.sandbox import (
    SandboxUnavailableError,
    run_sandboxed,
    run_sandboxed_many,
    sandbox_problem,
)

SANDBOX_PROBLEM = sandbox_problem()
needs_bwrap = pytest.mark.skipif(SANDBOX_PROBLEM is not None, reason=f"no OS sandbox here: {SANDBOX_PROBLEM}")

# Switches the in-process audit hook off from inside, as code written to escape would: through the old
# harness's module globals, or by finding the hook's closure with gc; and puts back the process-creating
# function the hook replaced, from a fresh instance of its module. Then proves the hook is off by doing
# something it forbids (a signal-0 kill of itself) and printing HOOK-OFF.
DISARM = """
import gc, importlib.util, os, sys
import _posixsubprocess
_spec = importlib.util.find_spec("_posixsubprocess")
_fresh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fresh)
_posixsubprocess.fork_exec = _fresh.fork_exec
_main = sys.modules["__main__"]
if hasattr(_main, "_in_hook"):
    _main._in_hook = True
for _obj in gc.get_objects():
    if callable(_obj) and getattr(_obj, "__name__", "") in ("audit", "_audit") and getattr(_obj, "__closure__", None):
        for _cell in _obj.__closure__:
            try:
                if _cell.cell_contents == [False]:
                    _cell.cell_contents[0] = True
            except ValueError:
                pass
os.kill(os.getpid(), 0)
print("HOOK-OFF", flush=True)
"""

# Runs one program through the sandbox module in a separate evaluator process, loaded from its files without
# the packages' __init__ (which load the model classes) so that the process starts in a fraction of a second:
# for escapes whose target is the evaluator itself.
EVALUATOR = """
import json, pathlib, sys, types
evaluation_dir = pathlib.Path(sys.argv[1]).parent
for name, path in (("moce_model", evaluation_dir.parent), ("moce_model.evaluation", evaluation_dir)):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package
from moce_model.evaluation import sandbox as module
result = module.run_sandboxed(sys.stdin.read(), timeout_s=5.0)
print(json.dumps({"status": result.status, "stdout": result.stdout, "stderr": result.stderr}))
"""


def _evaluate_in_child(code: str, extra_env: dict[str, str] | None = None) -> tuple[int, dict | None]:
    env = {**os.environ, **(extra_env or {})}
    done = subprocess.run(
        [sys.executable, "-c", EVALUATOR, sandbox_module.__file__], input=code, capture_output=True,
        text=True, env=env, timeout=60,
    )
    result = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, result


def _live_processes_tagged(tag: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in cmdline.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def _wait_until_none_tagged(tag: str, timeout_s: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := _live_processes_tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.fixture
def tag():
    """A unique word for the command lines of processes a program starts; whatever still carries it at the
    end of the test (only when a test fails) is killed."""
    value = "moce-sandbox-test-" + secrets.token_hex(8)
    yield value
    for pid in _live_processes_tagged(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tagged_sleeper(tag: str, seconds: int = 30) -> str:
    """Python that replaces the current process with a shell that sleeps, `tag` in its command line."""
    return f"os.execv('/bin/sh', ['sh', '-c', 'sleep {seconds}; :', {tag!r}])"


# Ordinary behaviour: what callers rely on.


def test_correct_code_passes_and_failing_assert_fails():
    solution = "def add(a, b):\n    return a + b\n"
    tests = "assert add(2, 3) == 5\nprint('ok')\n"
    passed = run_sandboxed(solution + tests, timeout_s=5)
    assert passed.passed and passed.status == "passed" and passed.returncode == 0
    assert passed.stdout.strip() == "ok"

    wrong = run_sandboxed("def add(a, b):\n    return a - b\n" + tests, timeout_s=5)
    assert not wrong.passed and wrong.status == "failed"
    assert "AssertionError" in wrong.stderr


def test_syntax_error_and_exception_fail():
    assert run_sandboxed("def f(:\n  pass", timeout_s=5).status == "failed"
    assert run_sandboxed("raise ValueError('boom')", timeout_s=5).status == "failed"


def test_infinite_loop_times_out():
    started = time.monotonic()
    result = run_sandboxed("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - started < 4


def test_sleeping_forever_times_out():
    result = run_sandboxed("import time\ntime.sleep(1000)\n", timeout_s=0.5)
    assert result.status == "timeout" and not result.passed


def test_unbounded_allocation_is_contained():
    result = run_sandboxed("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", memory_mb=200)
    assert result.status == "memory" and not result.passed


def test_os_fork_is_blocked():
    result = run_sandboxed("import os\npid = os.fork()\nprint('forked', pid)\n")
    assert result.status == "forbidden" and not result.passed
    assert "forked" not in result.stdout
    assert "os.fork" in result.stderr


def test_subprocess_and_system_are_blocked():
    popen = run_sandboxed("import subprocess\nsubprocess.Popen(['sleep', '100'])\nprint('spawned')\n")
    assert popen.status == "forbidden" and "spawned" not in popen.stdout
    system = run_sandboxed("import os\nos.system('sleep 100')\nprint('spawned')\n")
    assert system.status == "forbidden" and "spawned" not in system.stdout


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    result = run_sandboxed(bomb, timeout_s=2)
    assert not result.passed and result.status == "forbidden"


def test_swallowing_the_block_does_not_rescue_the_program():
    code = "import os\ntry:\n    os.fork()\nexcept BaseException:\n    pass\nprint('carried on')\n"
    result = run_sandboxed(code)
    assert result.status == "forbidden" and "carried on" not in result.stdout


def test_write_outside_temp_dir_is_blocked(tmp_path: Path):
    target = tmp_path / "outside.txt"
    result = run_sandboxed(f"open({str(target)!r}, 'w').write('pwned')\n")
    assert result.status == "forbidden" and not result.passed
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    via_os_open = run_sandboxed(f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n")
    assert via_os_open.status == "forbidden" and not target.exists()


def test_delete_rename_and_rmtree_outside_temp_dir_are_blocked(tmp_path: Path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("also precious")
    attempts = [
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.unlink({str(victim)!r})\n",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n",
        f"import os\nos.rename('x', {str(tmp_path / 'new.txt')!r})\n",
        f"import shutil\nshutil.rmtree({str(folder)!r})\n",
        f"import os\nos.rmdir({str(folder)!r})\n",
        f"import os\nos.chmod({str(victim)!r}, 0)\n",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('changed')\n",
    ]
    for code in attempts:
        result = run_sandboxed(code)
        assert result.status == "forbidden", (code, result)
    assert victim.read_text() == "precious"
    assert (folder / "inner.txt").read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "keep.txt"]


def test_symlink_escape_is_blocked(tmp_path: Path):
    target = tmp_path / "escape.txt"
    code = f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escape.txt', 'w').write('x')\n"
    result = run_sandboxed(code)
    assert result.status == "forbidden" and not target.exists()


def test_files_inside_temp_dir_are_allowed():
    code = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('hello')\n"
        "assert open('scratch.txt').read() == 'hello'\n"
        "os.rename('scratch.txt', 'moved.txt')\n"
        "os.remove('moved.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as handle:\n"
        "    handle.write('x')\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
    )
    result = run_sandboxed(code)
    assert result.status == "passed", result


def test_network_and_ctypes_are_blocked():
    connect = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert connect.status == "forbidden"
    native = run_sandboxed("import ctypes\n")
    assert native.status == "forbidden"


def test_early_exit_before_tests_is_not_a_pass():
    result = run_sandboxed("import sys\nsys.exit(0)\nassert False\n")
    assert not result.passed and result.status == "failed"


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("MOCE_SECRET_VALUE", "do-not-leak")
    result = run_sandboxed("import os\nassert 'MOCE_SECRET_VALUE' not in os.environ\n")
    assert result.passed


def test_processes_are_killed_on_timeout_without_audit_hook(tag):
    # With the audit layer off, the program really forks: the kill at the deadline must end the child too.
    code = f"import os, time\nif os.fork() == 0:\n    {_tagged_sleeper(tag, 1000)}\ntime.sleep(1000)\n"
    result = run_sandboxed(code, timeout_s=1.0, audit_hook=False)
    assert result.status == "timeout"
    assert _wait_until_none_tagged(tag) == []


def test_left_behind_child_is_killed_after_normal_exit_without_audit_hook(tag):
    code = f"import os, time\nif os.fork() == 0:\n    {_tagged_sleeper(tag, 1000)}\ntime.sleep(0.3)\n"
    result = run_sandboxed(code, timeout_s=5.0, audit_hook=False)
    assert result.status == "passed"
    assert _wait_until_none_tagged(tag) == []


def test_output_is_bounded():
    result = run_sandboxed("import sys\nfor _ in range(10**5):\n    sys.stdout.write('x' * 100)\n")
    assert result.passed and len(result.stdout) <= 64 * 1024


def test_many_runs_keep_order():
    codes = ["assert True", "assert False", "while True: pass", "print(3)"]
    results = run_sandboxed_many(codes, timeout_s=1.0, max_workers=2)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_sandboxed("pass", memory_mb=1)
    with pytest.raises(ValueError, match="disk_mb"):
        run_sandboxed("pass", disk_mb=0)


# Without an OS sandbox: refuse, unless explicitly allowed.


def test_without_bwrap_evaluation_refuses_to_run_code(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(sandbox_module.BWRAP_ENV, str(tmp_path / "no-such-bwrap"))
    monkeypatch.delenv(sandbox_module.ALLOW_UNSANDBOXED_ENV, raising=False)
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    with pytest.raises(SandboxUnavailableError) as refused:
        run_sandboxed(code)
    message = str(refused.value)
    assert "no-such-bwrap" in message and "bubblewrap" in message and "apt-get install bubblewrap" in message
    assert "MOCE_ALLOW_UNSANDBOXED_CODE=1" in message
    with pytest.raises(SandboxUnavailableError):
        run_sandboxed_many([code, code])
    assert not marker.exists()

    monkeypatch.setenv(sandbox_module.ALLOW_UNSANDBOXED_ENV, "1")
    allowed = run_sandboxed("print('ran without bwrap')\n")
    assert allowed.status == "passed" and allowed.stdout.strip() == "ran without bwrap"


def test_bwrap_that_cannot_create_namespaces_is_refused_with_its_message(tmp_path: Path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(sandbox_module.BWRAP_ENV, str(fake))
    monkeypatch.delenv(sandbox_module.ALLOW_UNSANDBOXED_ENV, raising=False)
    with pytest.raises(SandboxUnavailableError, match="No permissions to create new namespace"):
        run_sandboxed("pass")


# Escapes. Each one is tried with the audit hook switched off from inside (DISARM) or left out, because
# the hook is not the boundary; each checks the host.


@needs_bwrap
@pytest.mark.parametrize(
    "attempt",
    [
        "open(TARGET, 'w').write('pwned')",
        "os.system('touch ' + TARGET)",
        "import subprocess; subprocess.run(['touch', TARGET])",
        "import ctypes; ctypes.CDLL(None).system(('touch ' + TARGET).encode())",
        "import ctypes; ctypes.CDLL(None).creat(TARGET.encode(), 0o644)",
        "pid = os.fork()\nif pid == 0:\n    open(TARGET, 'w').write('pwned'); os._exit(0)\nos.waitpid(pid, 0)",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM).close(); open(TARGET, 'w')",
    ],
    ids=["open", "os.system", "subprocess", "ctypes-system", "ctypes-creat", "fork", "socket"],
)
def test_switched_off_audit_hook_gives_no_way_onto_the_host(tmp_path: Path, attempt: str):
    target = tmp_path / "pwned"
    code = DISARM + f"TARGET = {str(target)!r}\n" + attempt + "\nprint('ATTEMPTED', flush=True)\n"
    result = run_sandboxed(code)
    assert "HOOK-OFF" in result.stdout, result  # the attempt really ran without the hook
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


@needs_bwrap
def test_freshly_loaded_posixsubprocess_spawns_nothing_on_the_host(tmp_path: Path):
    # With the audit hook on: a second instance of _posixsubprocess has the fork_exec the hook replaced.
    target = tmp_path / "pwned"
    code = f"""
import importlib.util, os, sys
spec = importlib.util.find_spec("_posixsubprocess")
fresh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fresh)
errpipe_read, errpipe_write = os.pipe()
args = ([b"touch", {str(target).encode()!r}], [b"/usr/bin/touch"], True, (errpipe_write,), None, None,
        -1, -1, -1, -1, -1, -1, errpipe_read, errpipe_write, True, False)
args += (-1, None, None, None, -1, None, False) if sys.version_info >= (3, 11) else (None, None, None, -1, None)
pid = fresh.fork_exec(*args)
print("SPAWNED", os.waitpid(pid, 0)[1], flush=True)
"""
    result = run_sandboxed(code)
    assert "SPAWNED" in result.stdout, result  # the process was created, inside the sandbox
    assert not target.exists()


@needs_bwrap
def test_dir_fd_writes_and_renames_cannot_leave_the_work_dir(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    code = f"""
import os
for attempt in ("open", "rename"):
    try:
        fd = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)
        if attempt == "open":
            os.write(os.open("pwned", os.O_CREAT | os.O_WRONLY, dir_fd=fd), b"x")
        else:
            os.rename("victim.txt", "moved.txt", src_dir_fd=fd, dst_dir_fd=fd)
        print(attempt, "DONE")
    except OSError as exc:
        print(attempt, "FAILED", exc.errno)
"""
    result = run_sandboxed(code)
    assert "DONE" not in result.stdout, result
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


@needs_bwrap
def test_visible_system_directories_are_read_only(tmp_path: Path):
    names = [f"/usr/moce-sandbox-{secrets.token_hex(6)}", f"{sys.base_prefix}/moce-sandbox-{secrets.token_hex(6)}"]
    code = DISARM + f"""
for path in {names!r}:
    try:
        open(path, "w").write("x")
        print(path, "WRITTEN")
    except OSError as exc:
        print(path, "ERRNO", exc.errno)
    try:
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        os.open(os.path.basename(path), os.O_CREAT | os.O_WRONLY, dir_fd=fd)
        print(path, "WRITTEN")
    except OSError as exc:
        print(path, "ERRNO", exc.errno)
"""
    try:
        result = run_sandboxed(code)
        assert "HOOK-OFF" in result.stdout and "WRITTEN" not in result.stdout, result
        assert result.stdout.count(f"ERRNO {errno.EROFS}") == 4, result
        assert not any(os.path.exists(name) for name in names)
    finally:
        for name in names:  # only a broken sandbox leaves them
            if os.path.exists(name):
                os.remove(name)


@needs_bwrap
def test_host_files_and_the_project_are_out_of_sight(tmp_path: Path):
    secret = "secret-" + secrets.token_hex(8)
    (tmp_path / "secret.txt").write_text(secret)
    project = Path(__file__).resolve().parents[2]
    code = DISARM + f"""
for path in ({str(tmp_path / 'secret.txt')!r}, {str(project / 'README.md')!r}, "/etc/hostname", "/etc/passwd"):
    try:
        print(path, "CONTENT:", open(path).read())
    except OSError as exc:
        print(path, "ERRNO", exc.errno)
for path in ("/root", "/home", "/etc", "/run", "/var", {str(project)!r}, {str(tmp_path)!r}):
    print(path, "EXISTS" if os.path.exists(path) else "ABSENT")
"""
    result = run_sandboxed(code)
    assert "HOOK-OFF" in result.stdout, result
    assert secret not in result.stdout and "CONTENT:" not in result.stdout, result
    for path in ("/home", "/etc", "/run", "/var", str(project), str(tmp_path)):
        assert f"{path} ABSENT" in result.stdout, result


@needs_bwrap
@pytest.mark.parametrize(
    "attack",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.kill(os.getppid(), signal.SIGTERM)",
        "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
    ],
    ids=["kill-sigkill", "kill-sigterm", "pidfd"],
)
def test_the_evaluator_cannot_be_killed(attack: str):
    # The pidfd route is not an audited event: the hook stays on for it, as in the escape it stops.
    prefix = "import os, signal\n" if attack.startswith("signal.pidfd") else DISARM + "import signal\n"
    returncode, result = _evaluate_in_child(prefix + attack + "\nimport time\ntime.sleep(0.5)\nprint('ALIVE')\n")
    assert returncode == 0 and result is not None, "the evaluator process was killed"


@needs_bwrap
def test_the_evaluators_environment_cannot_be_read():
    secret = "secret-" + secrets.token_hex(12)
    code = DISARM + """
found = []
for pid in [os.getppid()] + [entry for entry in os.listdir("/proc") if entry.isdigit()]:
    try:
        found.append(open(f"/proc/{pid}/environ", "rb").read().decode("utf-8", "replace"))
    except OSError as exc:
        found.append(f"{pid}: errno {exc.errno}")
print("\\n".join(found))
"""
    returncode, result = _evaluate_in_child(code, {"MOCE_EVALUATOR_SECRET": secret})
    assert returncode == 0 and "HOOK-OFF" in result["stdout"], result
    assert secret not in result["stdout"] and secret not in result["stderr"]


@needs_bwrap
def test_forged_success_signals_do_not_pass():
    forgeries = {
        # the old success token was argv[3]: print every argument and that one last, then leave early
        "print-argv-and-exit": (
            "import os, sys\nprint('\\n'.join(sys.argv + sys.argv[3:4]), flush=True)\nos._exit(0)\nassert False\n"
        ),
        # scribble plausible verdicts on every inherited descriptor, then leave
        "write-every-fd": (
            "import os\nfor fd in range(3, 1024):\n    for data in (b'passed', b'\\0' * 32, b'\\n'):\n"
            "        try:\n            os.write(fd, data)\n        except OSError:\n            pass\n"
            "os._exit(0)\nassert False\n"
        ),
        "sys-exit-0": "import sys\nsys.exit(0)\nassert False\n",
        "exec-true": DISARM + "os.execv('/bin/true', ['true'])\nassert False\n",
    }
    for name, code in forgeries.items():
        result = run_sandboxed(code)
        assert not result.passed and result.status != "passed", (name, result)
    assert run_sandboxed("import os, sys\nprint('\\n'.join(sys.argv))\n").passed  # the same code, run to its end


@needs_bwrap
@pytest.mark.parametrize("deadline", ["normal-exit", "timeout"])
def test_no_setsid_grandchild_outlives_the_run(tag, deadline: str):
    code = DISARM + f"""
import time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        {_tagged_sleeper(tag)}
    os._exit(0)
time.sleep(0.3)
""" + ("time.sleep(1000)\n" if deadline == "timeout" else "")
    result = run_sandboxed(code, timeout_s=1.5)
    assert "HOOK-OFF" in result.stdout, result
    assert result.status == ("timeout" if deadline == "timeout" else "passed"), result
    assert _live_processes_tagged(tag) == []  # gone when run_sandboxed returns, not later


@needs_bwrap
def test_nothing_outlives_a_killed_evaluator(tag):
    code = DISARM + f"""
import time
if os.fork() == 0:
    {_tagged_sleeper(tag)}
time.sleep(30)
"""
    evaluator = subprocess.Popen(
        [sys.executable, "-c", EVALUATOR, sandbox_module.__file__], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        evaluator.stdin.write(code)
        evaluator.stdin.close()
        deadline = time.monotonic() + 10
        while not _live_processes_tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _live_processes_tagged(tag), "the program did not start its child"
    finally:
        evaluator.kill()
        evaluator.wait()
    assert _wait_until_none_tagged(tag) == []


@needs_bwrap
def test_no_network_not_even_the_hosts_loopback():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = "\0moce-sandbox-test-" + secrets.token_hex(8)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        abstract.bind(abstract_name)
        abstract.listen(8)
        port = listener.getsockname()[1]
        code = DISARM + f"""
import socket
for family, address in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_UNIX, {abstract_name!r})):
    try:
        socket.socket(family, socket.SOCK_STREAM).connect(address)
        print(family, "CONNECTED")
    except OSError as exc:
        print(family, "ERRNO", exc.errno)
"""
        result = run_sandboxed(code)
        assert "HOOK-OFF" in result.stdout and "CONNECTED" not in result.stdout, result
        for server in (listener, abstract):
            server.settimeout(0.2)
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        listener.close()
        abstract.close()


@needs_bwrap
def test_total_disk_written_is_bounded():
    # Fills every writable-looking place, 1 MB per file, and stops by itself at 3x the bound (then removes
    # what it wrote), so that a sandbox without the bound neither fills nor litters the host.
    code = DISARM + """
import os, tempfile
written, errors, paths = 0, set(), []
for place in (os.getcwd(), tempfile.gettempdir(), "/tmp", "/dev/shm"):
    while written < 24 * 2**20:
        path = os.path.join(place, f"moce-sandbox-fill-{os.getpid()}-{len(paths)}")
        try:
            with open(path, "wb") as handle:
                paths.append(path)
                handle.write(b"x" * 2**20)
            written += 2**20
        except OSError as exc:
            errors.add(exc.errno)
            break
print("WRITTEN", written, "ERRNOS", sorted(errors))
for path in paths:
    os.remove(path)
"""
    result = run_sandboxed(code, disk_mb=8, timeout_s=10)
    assert "HOOK-OFF" in result.stdout, result
    written = int(result.stdout.split("WRITTEN")[1].split()[0])
    assert written <= 8 * 2**20, result
    assert f"{errno.ENOSPC}" in result.stdout.split("ERRNOS")[1], result


@needs_bwrap
def test_process_count_is_bounded(tag):
    # Forks sleepers until refused, stopping by itself at 200 so that an unbounded sandbox stays harmless.
    code = DISARM + f"""
import time
forked, refused = 0, None
while forked < 200:
    try:
        pid = os.fork()
    except OSError as exc:
        refused = exc.errno
        break
    if pid == 0:
        {_tagged_sleeper(tag)}
    forked += 1
print("FORKED", forked, "REFUSED", refused, flush=True)
time.sleep(0.2)
"""
    result = run_sandboxed(code, timeout_s=10)
    assert "HOOK-OFF" in result.stdout, result
    forked = int(result.stdout.split("FORKED")[1].split()[0])
    assert forked < sandbox_module._MAX_PROCESSES, result
    assert f"REFUSED {errno.EAGAIN}" in result.stdout, result
    assert _live_processes_tagged(tag) == []


@needs_bwrap
def test_no_privileges_and_no_new_user_namespaces():
    # A user namespace of its own would give the program root there, and with it tmpfs mounts of any size.
    code = DISARM + """
import subprocess
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("CAPEFF", status["CapEff"].strip(), "UID", os.getuid())
done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                       "mount -t tmpfs none /tmp && echo MOUNTED"], capture_output=True, text=True)
print(done.stdout, done.stderr)
"""
    result = run_sandboxed(code)
    assert "HOOK-OFF" in result.stdout, result
    assert "CAPEFF 0000000000000000" in result.stdout, result
    if os.geteuid() == 0:
        assert f"UID {sandbox_module.SANDBOX_UID}" in result.stdout, result
    assert "MOUNTED" not in result.stdout, result


# Memory, descriptors and terminals that no per-process address-space limit sees. Each probe stops by
# itself at what the unbounded sandbox let through (40 in-memory files of 16 MB, 300 descriptors, 300
# terminals), so that a sandbox without the bound neither exhausts nor litters the host.


def _host_shared_memory_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def _run_watching_shared_memory(code: str, **kwargs) -> tuple[object, float]:
    """Runs `code` while sampling the host's shared memory (tmpfs, in-memory files, System V segments);
    returns the result and the largest rise over the value before the run, in MB."""
    import threading

    before = _host_shared_memory_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _host_shared_memory_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run_sandboxed(code, **kwargs)
    finally:
        done.set()
        sampler.join()
    return result, peak[0] - before


# Each creates 40 blocks of 16 MB (the file-size limit) that need no address space once written, holds
# them for a moment and reports how many it made.
SHARED_MEMORY_PROBES = {
    "memfd": """
import os, time
held = []
for _ in range(40):
    fd = os.memfd_create("probe")
    os.write(fd, b"x" * (16 * 2**20 - 1))
    held.append(fd)
print("MADE", len(held), flush=True)
time.sleep(0.5)
""",
    "sysv-shm": """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
made = 0
for _ in range(40):
    segment = libc.shmget(0, 16 * 2**20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if segment < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    address = libc.shmat(segment, None, 0)
    ctypes.memset(address, 1, 16 * 2**20)
    libc.shmdt(ctypes.c_void_p(address))
    made += 1
print("MADE", made, flush=True)
time.sleep(0.5)
""",
    "dev-shm": """
import os, time
held = []
for index in range(40):
    with open(f"/dev/shm/probe-{index}", "wb") as handle:
        handle.write(b"x" * (16 * 2**20 - 1))
    held.append(index)
print("MADE", len(held), flush=True)
time.sleep(0.5)
""",
}


@needs_bwrap
@pytest.mark.parametrize("probe", sorted(SHARED_MEMORY_PROBES))
def test_shared_memory_beyond_the_limits_is_refused_and_the_host_does_not_hold_it(probe: str):
    result, rise_mb = _run_watching_shared_memory(
        SHARED_MEMORY_PROBES[probe], memory_mb=64, disk_mb=1, timeout_s=20, audit_hook=False)
    assert not result.passed and "MADE" not in result.stdout, result
    if probe == "dev-shm":  # the run's tmpfs is full at disk_mb: the write fails, the program with it
        assert result.status == "failed" and "No space left on device" in result.stderr, result
    else:  # refused by the seccomp filter, or (on machines it does not know) stopped by the memory cgroup
        assert result.status in ("forbidden", "memory"), result
        assert "sandbox: " in result.stderr, result
    # Unbounded, the probe held 640 MB. What it may legitimately hold is at most the run's tmpfs (1 MB),
    # or, where the memory cgroup rather than the filter stops it, up to that cgroup's limit; the rest of
    # the allowance is for other processes on the host.
    allowance_mb = 16 if sandbox_limits.seccomp_filter() is not None or probe == "dev-shm" else 64 + 1 + 16
    assert rise_mb < allowance_mb, (rise_mb, result)


@needs_bwrap
def test_open_descriptors_are_bounded():
    # Pipes: each holds a kernel buffer that no address-space limit counts.
    code = """
import os
held = []
try:
    while len(held) < 300:
        held.extend(os.pipe())
finally:
    print("OPENED", len(held), flush=True)
"""
    result = run_sandboxed(code, audit_hook=False)
    assert result.status == "failed" and "Too many open files" in result.stderr, result
    opened = int(result.stdout.split("OPENED")[1].split()[0])
    assert opened < sandbox_module._MAX_OPEN_FILES, result


@needs_bwrap
def test_no_pseudo_terminals_can_be_opened():
    # Every pty comes from the host-wide pool (kernel.pty.max), whichever devpts instance hands it out.
    code = """
import os
opened, refused = 0, []
for attempt in range(300):
    try:
        if attempt % 3 == 0:
            os.openpty()
        else:
            os.open("/dev/ptmx" if attempt % 3 == 1 else "/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY)
        opened += 1
    except OSError as exc:
        refused.append(exc.errno)
print("OPENED", opened, "REFUSED", sorted(set(refused)), flush=True)
assert opened == 0
"""
    result = run_sandboxed(code, audit_hook=False)
    assert "OPENED 0 " in result.stdout, result
    assert f"REFUSED [{errno.ENOENT}]" in result.stdout, result
    assert result.status == "passed", result


MEMORY_CGROUP = sandbox_limits.memory_cgroup_parent()


@needs_bwrap
@pytest.mark.skipif(MEMORY_CGROUP is None, reason="no memory cgroups can be created here")
def test_the_memory_of_a_run_as_a_whole_is_bounded():
    # Ten processes of 30 MB each: every one within its own address-space limit, together far over the
    # run's memory_mb + disk_mb. The control run with room for them passes, so the program itself is fine.
    code = """
import os, time
children = []
for _ in range(10):
    pid = os.fork()
    if pid == 0:
        block = bytearray(30 * 2**20)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        time.sleep(0.5)
        os._exit(0)
    children.append(pid)
statuses = [os.waitpid(pid, 0)[1] for pid in children]
print("STATUSES", statuses, flush=True)
assert statuses == [0] * len(children)
"""
    bounded = run_sandboxed(code, memory_mb=64, disk_mb=1, timeout_s=20, audit_hook=False)
    assert bounded.status == "memory" and not bounded.passed, bounded
    assert "over its memory limit of 65 MB" in bounded.stderr, bounded
    roomy = run_sandboxed(code, memory_mb=512, disk_mb=1, timeout_s=20, audit_hook=False)
    assert roomy.status == "passed", roomy
    # Each run's cgroup is gone with it.
    assert not [name for name in os.listdir(MEMORY_CGROUP.path)
                if name.startswith(f"moce-sandbox-{os.getpid()}-")], MEMORY_CGROUP


@needs_bwrap
@pytest.mark.skipif(MEMORY_CGROUP is None, reason="no memory cgroups can be created here")
def test_run_cgroups_left_by_a_killed_evaluator_are_removed_by_the_next():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    abandoned = Path(MEMORY_CGROUP.path) / f"moce-sandbox-{gone.stdout.strip()}-{secrets.token_hex(6)}"
    ours = Path(MEMORY_CGROUP.path) / f"moce-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
    abandoned.mkdir()
    ours.mkdir()
    try:
        sandbox_limits.memory_cgroup_parent.cache_clear()
        assert sandbox_limits.memory_cgroup_parent() == MEMORY_CGROUP
        assert not abandoned.exists()
        assert ours.exists()  # a live evaluator's, perhaps about to be entered
    finally:
        for path in (abandoned, ours):
            if path.exists():
                path.rmdir()
