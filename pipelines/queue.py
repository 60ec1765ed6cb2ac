"""The runs of `moce run`, `moce sweep` and `moce study` go through the experiment's Dagster run queue.

A command submits each run (one per partition of the k sweep or the study) to the instance's run queue, as the UI
does: through Dagster's GraphQL client, against `dagster dev` started on the experiment's instance and workspace
(workspace.yaml) for as long as the command runs. Its daemon dequeues the runs within the instance's limits
(`concurrency` in dagster.yaml, pipelines/instance.py) and its run launcher starts each one in a process of its
own; the command follows them in the instance (queued, started, every step, finished) and prints the failing
step's error of a run that failed. So the CLI drives the same engine as the UI, and another run launcher in
dagster.yaml (Docker, Kubernetes: docs/orchestration.md) runs the CLI's runs there too.

`dagster dev` gets the experiment's lock (`held_lock_descriptors`): it holds it with the command, and on after
the command when the command was killed, until it has stopped. The automation sensor is left out of the code
location it loads (`AUTOMATION_ENV`): `moce run` materializes what is stale itself, and a sweep or a study must not
start the main graph's runs beside its own.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import dagster as dg
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from moce_model.common.processes import terminable_children, unignored_signal
from pipelines.instance import held_lock_descriptors, max_concurrent_runs

# workspace.yaml loads `python_module: pipelines.definitions`: the code location is named after the module, and a
# Definitions object is its one repository.
LOCATION_NAME = "pipelines.definitions"
REPOSITORY_NAME = "__repository__"
# Read by pipelines/definitions.py: "0" leaves the automation sensor out of the code location.
AUTOMATION_ENV = "MOCE_AUTOMATION_SENSOR"
PARTITION_TAG = "dagster/partition"
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
STEP_EVENTS = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
               dg.DagsterEventType.STEP_FAILURE}
STARTUP_SECONDS = 300  # a loaded 2-core machine needs most of a minute to import the code location


class RunQueueError(RuntimeError):
    """The run queue's server did not start, or refused a run."""


@dataclass
class RunOutcome:
    run_id: str
    label: str
    status: dg.DagsterRunStatus = dg.DagsterRunStatus.QUEUED
    seconds: float | None = None
    errors: list[str] = field(default_factory=list)
    log_cursor: str | None = None  # the run's event log is printed up to here

    @property
    def success(self) -> bool:
        return self.status == dg.DagsterRunStatus.SUCCESS


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _interruptible_children():
    """SIGINT not ignored in the processes started here (a shell running this in the background ignores it):
    `dagster dev` stops on SIGINT, and on SIGTERM only as SIGINT does, so with SIGINT ignored it could not be
    stopped but by SIGKILL, which leaves its code server and runs behind."""
    return unignored_signal(signal.SIGINT, signal.default_int_handler)


def start_service(command: Sequence[str], log: Path, environment: Mapping[str, str],
                  cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` writing to `log`, in a session of its own (a Ctrl-C reaches the command, which stops it in
    order), with the experiment's lock passed down: it holds the lock as long as it runs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink, terminable_children(), _interruptible_children():
        return subprocess.Popen(list(command), stdout=sink, stderr=subprocess.STDOUT, env=dict(environment),
                                cwd=cwd, pass_fds=held_lock_descriptors(), start_new_session=True)


def _error_text(error) -> str:
    """The message of a serialized error and of its causes, one line each; Dagster's wrapper around an error
    raised in a step is left out for the error itself."""
    lines = []
    while error is not None:
        if not (error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None):
            lines.append(error.message.strip())
        error = error.cause
    return "\n    caused by ".join(lines)


class RunQueue:
    """Submit runs to the instance's run queue and follow them; `dagster dev` is started on the first submission
    (a command with nothing to run starts nothing) and stopped by `close`, after the command's runs have finished
    or been cancelled."""

    def __init__(self, instance: dg.DagsterInstance, *, workspace: Path, out: TextIO | None = None,
                 environment: Mapping[str, str] | None = None, poll_seconds: float = 1.0,
                 location: str = LOCATION_NAME):
        self.instance = instance
        self.workspace = Path(workspace)
        self.location = location
        self.out = out or sys.stdout
        self.environment = dict(environment or {})
        self.poll_seconds = poll_seconds
        self.runs: dict[str, RunOutcome] = {}
        self._server: subprocess.Popen | None = None
        self._client: DagsterGraphQLClient | None = None
        self.log: Path | None = None

    def _print(self, text: str, *, error: bool = False) -> None:
        print(text, file=sys.stderr if error else self.out, flush=True)

    def _start(self) -> DagsterGraphQLClient:
        if self._client is not None:
            return self._client
        port = _free_port()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.log = Path(self.instance.root_directory) / "logs" / f"run-queue-{stamp}-{os.getpid()}.log"
        environment = {**os.environ, "DAGSTER_HOME": self.instance.root_directory, AUTOMATION_ENV: "0",
                       **self.environment}
        command = [sys.executable, "-m", "dagster", "dev", "-w", str(self.workspace), "-h", "127.0.0.1",
                   "-p", str(port), "--log-level", "warning"]
        self._print(f"starting the run queue's daemon (dagster dev on port {port}; its log: {self.log})")
        started = time.perf_counter()
        self._server = start_service(command, self.log, environment, cwd=self.workspace.parent)
        url = f"http://127.0.0.1:{port}/server_info"
        while True:
            if self._server.poll() is not None:
                raise RunQueueError(f"dagster dev ended (status {self._server.returncode}) before it served; "
                                    f"its log {self.log}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - started > STARTUP_SECONDS:
                self.close()
                raise RunQueueError(f"dagster dev did not serve within {STARTUP_SECONDS} s; its log {self.log}")
            time.sleep(0.5)
        self._client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        self._print(f"run queue ready in {time.perf_counter() - started:.1f} s")
        return self._client

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log else ""
        except OSError:
            return ""

    def submit(self, job_name: str, assets: Sequence[dg.AssetKey], *, label: str, partition: str | None = None,
               run_config: Mapping | None = None) -> str:
        """Queue a run of `job_name` materializing `assets` (with their checks), of `partition` when given;
        returns its run id."""
        client = self._start()
        tags = {PARTITION_TAG: partition} if partition is not None else {}
        try:
            run_id = client.submit_job_execution(
                job_name, repository_location_name=self.location, repository_name=REPOSITORY_NAME,
                run_config=dict(run_config or {}), tags=tags, asset_selection=list(assets))
        except DagsterGraphQLClientError as error:
            raise RunQueueError(f"{label}: the run queue refused the run of job {job_name}: {error}") from error
        self.runs[run_id] = RunOutcome(run_id, label)
        self._print(f"{label}: queued (run {run_id})")
        return run_id

    def wait(self, run_ids: Sequence[str] | None = None) -> list[RunOutcome]:
        """Follow `run_ids` (default: every run submitted) until each has finished, printing when each starts,
        its steps, and how it ended; a failed run's failing steps with their errors."""
        ids = list(self.runs if run_ids is None else run_ids)
        while True:
            pending = [self.runs[run_id] for run_id in ids if self.runs[run_id].status not in FINISHED]
            if not pending:
                return [self.runs[run_id] for run_id in ids]
            for outcome in pending:
                self._follow(outcome)
            if self._server is not None and self._server.poll() is not None and any(
                    self.runs[run_id].status not in FINISHED for run_id in ids):
                raise RunQueueError(f"dagster dev ended (status {self._server.returncode}) with runs unfinished; "
                                    f"its log {self.log}:\n{self._log_tail()}")
            time.sleep(self.poll_seconds)

    def _follow(self, outcome: RunOutcome) -> None:
        record = self.instance.get_run_record_by_id(outcome.run_id)
        if record is None:
            return
        status = record.dagster_run.status
        if status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED) and \
                outcome.status == dg.DagsterRunStatus.QUEUED:
            self._print(f"{outcome.label}: started")
        if status in (dg.DagsterRunStatus.STARTED, *FINISHED):
            self._print_steps(outcome)
        outcome.status = status if status != dg.DagsterRunStatus.NOT_STARTED else outcome.status
        if status in FINISHED:
            if record.start_time is not None and record.end_time is not None:
                outcome.seconds = record.end_time - record.start_time
            seconds = f" in {outcome.seconds:.1f} s" if outcome.seconds is not None else ""
            if outcome.success:
                self._print(f"{outcome.label}: done{seconds} (run {outcome.run_id})")
                return
            if not outcome.errors:  # no step failed: the run itself did (its process, its launch)
                for entry in self.instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.RUN_FAILURE):
                    data = entry.dagster_event.event_specific_data
                    error = getattr(data, "error", None)
                    outcome.errors.append(_error_text(error) if error else entry.dagster_event.message or "")
            word = "CANCELED" if status == dg.DagsterRunStatus.CANCELED else "FAILED"
            self._print(f"{outcome.label}: {word}{seconds} (run {outcome.run_id})", error=True)
            for error in outcome.errors:
                self._print(f"  {error}", error=True)

    def _print_steps(self, outcome: RunOutcome) -> None:
        """The run's steps as they start and end, and what they log at INFO (the progress of the long ones: an
        evaluation's benchmarks, a training's steps with their ETA); warnings and debug lines stay in the run's
        event log (the UI)."""
        # Only the entries since the last poll: a run's log grows to thousands of entries, polled every second.
        new = self.instance.get_records_for_run(outcome.run_id, cursor=outcome.log_cursor)
        for entry in (record.event_log_entry for record in new.records):
            event = entry.dagster_event
            if event is None:
                if entry.level == logging.INFO and entry.step_key:
                    self._print(f"{outcome.label}:     {entry.user_message}")
                continue
            if event.event_type not in STEP_EVENTS:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                self._print(f"{outcome.label}:   step {event.step_key} started")
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                self._print(f"{outcome.label}:   step {event.step_key} done "
                            f"in {event.event_specific_data.duration_ms / 1000:.1f} s")
            else:
                error = f"step {event.step_key} failed: {_error_text(event.event_specific_data.error)}"
                outcome.errors.append(error)
                self._print(f"{outcome.label}:   {error}", error=True)
        outcome.log_cursor = new.cursor

    def cancel_unfinished(self) -> None:
        unfinished = [run_id for run_id, outcome in self.runs.items() if outcome.status not in FINISHED]
        if not unfinished or self._client is None:
            return
        self._print(f"cancelling {len(unfinished)} unfinished runs: {', '.join(unfinished)}", error=True)
        try:
            self._client.terminate_runs(unfinished)
        except DagsterGraphQLClientError as error:
            self._print(f"could not cancel them all: {error}", error=True)
            return
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and any(
                self.instance.get_run_by_id(run_id).status not in FINISHED for run_id in unfinished):
            time.sleep(self.poll_seconds)

    def close(self) -> None:
        """Cancel the runs still queued or running (a command stopped half way), then stop `dagster dev`."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            self.cancel_unfinished()
        finally:
            self._client = None
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    self._print(f"dagster dev did not stop in 90 s: killed (its log: {self.log})", error=True)
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()

    def __enter__(self) -> RunQueue:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def threads_per_run(instance: dg.DagsterInstance, runs: int) -> dict[str, str]:
    """The environment of `runs` runs that the instance may run side by side on a CPU: its cores shared between
    them (a training is a chain of small matmuls; two trainings of all cores each on 2 cores were 5x slower than
    one after the other), unless OMP_NUM_THREADS is set already."""
    limit = max_concurrent_runs(instance)
    at_once = runs if limit < 0 else min(runs, limit)
    if "OMP_NUM_THREADS" in os.environ or at_once <= 1:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // at_once))}


def workspace_file() -> Path:
    """The project's workspace.yaml (its one code location: pipelines.definitions, the experiment MOCE_EXPERIMENT)."""
    return Path(__file__).resolve().parents[1] / "workspace.yaml"
