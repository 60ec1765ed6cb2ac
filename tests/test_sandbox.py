import time
from pathlib import Path

import pytest

from moce_model.evaluation.sandbox import run_sandboxed, run_sandboxed_many


def _process_is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no longer runs; its reaping is up to init


def _wait_until_gone(pid: int, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _process_is_gone(pid):
            return True
        time.sleep(0.05)
    return _process_is_gone(pid)


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


def test_process_group_is_killed_on_timeout_without_audit_hook():
    # With the audit layer off, the program really forks: the group kill must still end both processes.
    code = (
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(1000)\n"
        "print(child, flush=True)\n"
        "time.sleep(1000)\n"
    )
    result = run_sandboxed(code, timeout_s=1.0, audit_hook=False)
    assert result.status == "timeout"
    child_pid = int(result.stdout.split()[0])
    assert _wait_until_gone(child_pid)


def test_left_behind_child_is_killed_after_normal_exit_without_audit_hook():
    code = (
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(1000)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
    )
    result = run_sandboxed(code, timeout_s=5.0, audit_hook=False)
    assert result.status == "passed"
    child_pid = int(result.stdout.split()[0])
    assert _wait_until_gone(child_pid)


def test_output_is_bounded():
    result = run_sandboxed("import sys\nfor _ in range(10**5):\n    sys.stdout.write('x' * 100)\n")
    assert len(result.stdout) <= 64 * 1024


def test_many_runs_keep_order():
    codes = ["assert True", "assert False", "while True: pass", "print(3)"]
    results = run_sandboxed_many(codes, timeout_s=1.0, max_workers=2)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_sandboxed("pass", memory_mb=1)
