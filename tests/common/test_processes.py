"""Children that can be stopped although their parent ignores SIGTERM (moce_model.common.processes), and the Dagster
behaviour that makes a parent ignore it."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time

import pytest

from moce_model.common.processes import stop_processes, terminable_children

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def child_ignores_sigterm() -> bool:
    status = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"], capture_output=True,
                            text=True, check=True).stdout
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & SIGTERM_BIT)


@pytest.fixture
def sigterm_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_children_started_inside_take_sigterm_again(sigterm_ignored):
    assert child_ignores_sigterm(), "an ignored signal is inherited: the condition the helper is for"
    with terminable_children():
        assert not child_ignores_sigterm()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, "the parent's own disposition is restored"
    assert child_ignores_sigterm()


def _ignore_sigterm_and_wait(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


def test_a_worker_that_outlives_sigterm_is_killed_not_waited_for():
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    stubborn = context.Process(target=_ignore_sigterm_and_wait, args=(ready,), daemon=True)
    plain = context.Process(target=time.sleep, args=(600,), daemon=True)
    with terminable_children():  # as the embedding pool starts them: the suite's own SIGTERM may be ignored
        stubborn.start()
        plain.start()
    pid = stubborn.pid
    assert ready.wait(120), "the stubborn worker did not start"
    started = time.perf_counter()
    assert stop_processes([stubborn, plain], grace_seconds=2) == [pid]
    assert time.perf_counter() - started < 30


def test_a_dagster_run_leaves_sigterm_doing_what_sigint_does():
    """Why children inherit an ignored SIGTERM: after an in-process Dagster run, SIGTERM does what SIGINT does, and
    SIGINT is ignored in a background job of a non-interactive shell. If Dagster stops doing this, the helper is
    still harmless; this test then says so."""
    import dagster as dg

    @dg.asset
    def one() -> int:
        return 1

    previous_int, previous_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with dg.instance_for_test() as instance:
            assert dg.materialize([one], instance=instance).success
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
