"""Child processes that can be stopped.

An ignored signal stays ignored across fork and exec, and Dagster, after every in-process run, maps SIGTERM to
whatever SIGINT does (`dagster._utils.interrupts.setup_interrupt_handlers`, meant for Kubernetes). In a process
started in the background by a non-interactive shell (a CI job, `nohup`, `&`) SIGINT is ignored, so after the
first Dagster run SIGTERM is ignored too, and so is it in every child started from then on: sentence-transformers'
pool workers then outlive `terminate()` and the pool's `join()` waits for ever (found in the full test suite, with
py-spy: the workers idle in `Queue.get` with SIGTERM in their SigIgn mask, the parent in `join`), and a training
launcher or a study run could not be stopped with SIGTERM either. Children started inside `terminable_children`
get SIGTERM's default action back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unignored_signal(signum: int, action) -> Iterator[None]:
    """Within the block, `signum` has `action` (SIG_DFL, or a handler, which `exec` resets to the default) when it
    was ignored, so that processes started here do not inherit it ignored; the previous disposition is restored
    afterwards. Signal dispositions can only be changed from the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signum) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signum, action)
    try:
        yield
    finally:
        signal.signal(signum, signal.SIG_IGN)


def terminable_children():
    """Processes started in the block end on SIGTERM even where this process ignores it (stop children started
    elsewhere than the main thread with SIGKILL)."""
    return unignored_signal(signal.SIGTERM, signal.SIG_DFL)


def stop_processes(processes, grace_seconds: float = 10.0) -> list[int]:
    """SIGTERM to each `multiprocessing` process, then SIGKILL to those still alive after `grace_seconds`; joins
    and closes them all. The pids that had to be killed (a worker that ignores SIGTERM must not hang its parent)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    killed = []
    for process in processes:
        process.join(grace_seconds)
        if process.is_alive():
            killed.append(process.pid)
            process.kill()
            process.join()
        process.close()
    return killed
