"""Which process runs a Dagster run, recorded on the run, so that a run whose process was killed can be found.

A SIGKILLed process cannot report its own failure, and for runs executed in-process (`make demo`, `dagster asset
materialize`) nothing else watches it: Dagster's run monitoring checks run workers only through run launchers
that support health checks, which the default one does not. Such a run therefore records the host, pid and start
time of its process (`pipelines.instance.fail_runs_of_dead_processes` reads it back).

Runs started by a code server (`dagster dev`, the UI) are not recorded: their run worker is a child process that
the code server watches itself (it fails the run when the worker dies), and their steps may run in further
child processes that end between steps while the run goes on, so a step's process says nothing about the run.
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import dagster as dg
import psutil

RUN_PROCESS_TAG = "moce/process"


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start time in ms``: the start time tells a reused pid from the process that had it."""
    pid = os.getpid() if pid is None else pid
    started_ms = round(psutil.Process(pid).create_time() * 1000)
    return f"{socket.gethostname()}:{pid}:{started_ms}"


def process_is_gone(identity: str) -> bool | None:
    """True when the process named by `process_identity` has ended; None when it ran on another host (or the
    identity cannot be parsed), where this machine cannot tell."""
    parts = identity.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    host, pid, started_ms = parts[0], int(parts[1]), int(parts[2])
    if host != socket.gethostname():
        return None
    try:
        return round(psutil.Process(pid).create_time() * 1000) != started_ms
    except psutil.NoSuchProcess:
        return True


def record_run_process(context: dg.InitResourceContext) -> None:
    """Tag the current run with this process (called when a resource every step uses is set up), when the run
    executes in the process that started it."""
    instance, run_id = context.instance, context.run_id
    if instance is None or run_id is None or multiprocessing.parent_process() is not None:
        return
    identity = process_identity()
    run = instance.get_run_by_id(run_id)
    if run is not None and run.tags.get(RUN_PROCESS_TAG) != identity:
        instance.add_run_tags(run_id, {RUN_PROCESS_TAG: identity})
