"""The Dagster instance of this project: its `dagster.yaml`, and runs whose process was killed marked failed.

`python -m pipelines.instance DAGSTER_HOME` writes (or updates) `DAGSTER_HOME/dagster.yaml` with the settings
below; every `moce` command writes it the same way before it runs (pipelines/cli.py), and the tests' instance uses
the same settings.

Run monitoring (`run_monitoring`, run by the daemon that `dagster dev` starts) fails runs stuck starting or
cancelling; a run worker that dies under `dagster dev` is failed by its code server. Neither sees a run executed
in-process (`make demo`, `dagster asset materialize`) whose process is SIGKILLed: it would stay STARTED for ever.
Such runs record their process (`resources.run_process`), and `fail_runs_of_dead_processes` marks the runs whose
process is gone as failed: at the start of `make demo` and, while `dagster dev` runs, from the
`fail_runs_of_killed_processes` sensor.

One experiment, one writer: two `moce run` on one experiment at once both did the work, and two processes creating
the instance at once could both stamp its SQLite storages, leaving two `alembic_version` rows that make every later
command fail ("more than one head present"). Every command that writes to an experiment's instance or storage holds
`experiment_lock` (an exclusive `flock` on `<storage_root>/.moce.lock`) for as long as it runs, and opens the
instance (`experiment_instance`) only while it holds it. `repair_alembic_versions` (`moce doctor`) repairs an
instance an older version left with several rows.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import dagster as dg
import yaml

from moce_model.common.io import atomic_write_text
from moce_model.experiment import deep_merged
from resources.run_process import RUN_PROCESS_TAG, process_is_gone

if TYPE_CHECKING:
    from moce_model.experiment import Experiment

INSTANCE_FILE = "dagster.yaml"
INSTANCE_SETTINGS: dict[str, Any] = {
    "telemetry": {"enabled": False},
    # The UI's "Join the Dagster community" dialog, which covers the asset graph on the first visit.
    "nux": {"enabled": False},
    "run_monitoring": {
        "enabled": True,
        # Dagster's documented defaults, written out so the file says what is in force.
        "start_timeout_seconds": 180,
        "cancel_timeout_seconds": 180,
        # Not the default 120 s: the same loop frees the pool slots of killed runs (below), and a queued
        # run waits for it. One query of the run storage per loop.
        "poll_interval_seconds": 30,
        # A run whose process is killed (the OOM killer) is marked failed but keeps its `training` pool slot,
        # and with it every later run of the pool stays queued for ever; this frees such slots.
        "free_slots_after_run_end_seconds": 10,
        # The default run launcher cannot resume a run on a new worker: fail it instead of trying.
        "max_resume_run_attempts": 0,
    },
}
# Warnings that libraries log (transformers, peft, lm-eval, ...) reach each step's Dagster event log, not only
# the terminal; `warnings.warn` messages go through logging's `py.warnings` (pipelines/definitions.py).
# No `python_log_level`: Dagster would set that one level on every managed logger at the start of each run, and at
# INFO the libraries print their chatter (transformers a whole model config on every load). Each logger keeps the
# level `moce_model.common.logs.quiet_library_logs` gives it when the definitions load: ours INFO, the libraries'
# WARNING.
INSTANCE_SETTINGS["python_logs"] = {
    "managed_python_loggers": ["moce_model", "transformers", "peft", "accelerate", "sentence_transformers",
                               "lm-eval", "lm_eval", "bitsandbytes", "py.warnings"],
}
# Settings earlier versions wrote that this one removes from an existing dagster.yaml.
DROPPED_SETTINGS = {"python_logs": ("python_log_level",)}
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
# How many runs, and steps of the `training` pool, at once (pipelines/queue.py): default `machine_run_slots()`.
RUN_SLOTS_ENV = "MOCE_RUN_SLOTS"
TRAINING_POOL = "training"


def machine_run_slots(gpus_per_run: int = 1) -> int:
    """How many runs this machine runs side by side: MOCE_RUN_SLOTS, else one per `gpus_per_run` visible GPUs,
    else one per core (runs side by side on a CPU share its cores: `pipelines.queue.threads_per_run`)."""
    value = os.environ.get(RUN_SLOTS_ENV)
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{RUN_SLOTS_ENV}={value!r}: expected how many runs may run at once (an integer >= 1)")
        return int(value)
    import torch  # only now: `moce --help` and the instance's other uses do not need it

    gpus = torch.cuda.device_count()  # NVML, without initialising CUDA in this process
    if gpus:
        return max(1, gpus // max(1, gpus_per_run))
    return max(1, os.cpu_count() or 1)


def queue_settings(slots: int) -> dict[str, Any]:
    """The run queue sized to `slots`: at most `slots` runs in progress, and `slots` steps of the `training` pool
    (and of any other pool) at once over every run; the daemon looks at the queue every second."""
    return {
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": 1}},
        "concurrency": {"runs": {"max_concurrent_runs": slots},
                        "pools": {"default_limit": slots, "granularity": "op"}},
    }


def max_concurrent_runs(instance: dg.DagsterInstance) -> int:
    """The instance's limit on runs in progress (10, Dagster's default, when the file sets none; -1: no limit)."""
    path = Path(instance.root_directory) / INSTANCE_FILE
    settings = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    runs = (settings.get("concurrency") or {}).get("runs") or {}
    queue = (settings.get("run_coordinator") or {}).get("config") or settings.get("run_queue") or {}
    return int(runs.get("max_concurrent_runs", queue.get("max_concurrent_runs", 10)))


def write_instance_config(home: str | Path, slots: int | None = None, *, override: bool = False) -> Path:
    """Write `home/dagster.yaml` with `INSTANCE_SETTINGS`, keeping any other setting an existing file has. The run
    queue's settings (`queue_settings(slots)`, default `machine_run_slots()`) are written where the file has
    none of its own: a limit set in the file, or a run coordinator, stays; with `override` (a person asked for
    `slots`: `--workers`, MOCE_RUN_SLOTS) `slots` replaces the file's limits on runs and pool steps at once."""
    path = Path(home) / INSTANCE_FILE
    existing: Any = {}
    if path.is_file():
        try:
            existing = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error}); fix or remove it") from error
        if not isinstance(existing, dict):
            raise ValueError(f"{path}: expected a mapping of instance settings, got {type(existing).__name__}")
    queue = queue_settings(machine_run_slots() if slots is None else slots)
    own_coordinator = existing.get("run_coordinator") or {}
    if "run_queue" in existing or {"max_concurrent_runs", "tag_concurrency_limits"} & set(
            own_coordinator.get("config") or {}):
        # The older places of the run limits: Dagster refuses them beside `concurrency > runs`, and they stay.
        queue.pop("run_coordinator")
        queue["concurrency"].pop("runs")
    settings = deep_merged(deep_merged(queue, existing), INSTANCE_SETTINGS)
    if override:
        limits = settings.setdefault("concurrency", {})
        limits.setdefault("pools", {})["default_limit"] = slots
        if "runs" in queue["concurrency"]:
            limits.setdefault("runs", {})["max_concurrent_runs"] = slots
        else:
            older = settings["run_queue"] if "run_queue" in settings else settings["run_coordinator"]["config"]
            older["max_concurrent_runs"] = slots
    for section, keys in DROPPED_SETTINGS.items():
        for key in keys:
            settings.get(section, {}).pop(key, None)
    atomic_write_text(yaml.safe_dump(settings, sort_keys=False), path)
    return path


def fail_runs_of_dead_processes(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every starting or started run whose recorded process has ended; returns their run ids.

    Runs without a recorded process, or whose process ran on another host, are left alone.
    """
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        identity = run.tags.get(RUN_PROCESS_TAG)
        if identity is None or not process_is_gone(identity):
            continue
        # Re-read: the run may have finished while the others were being checked.
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in IN_PROGRESS:
            continue
        instance.report_run_failed(
            current,
            message=f"the process that ran it ({identity}) ended without finishing the run (killed?); marked failed",
        )
        failed.append(run.run_id)
    return failed


@dg.sensor(
    name="fail_runs_of_killed_processes",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Marks failed the runs whose process was killed (they would otherwise stay STARTED).",
)
def fail_runs_of_killed_processes(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    failed = fail_runs_of_dead_processes(context.instance)
    return dg.SkipReason(f"marked failed: {failed}" if failed else "no run of a killed process")


# --------------------------------------------------------------------------------------------- one writer

LOCK_FILE = ".moce.lock"
# `fd:path` of the lock a parent process holds and passed to this one (`dagster dev` started by a command's run
# queue, pipelines/queue.py, or exec'd by `moce ui`): the lock belongs to the open file, which parent and children
# share.
LOCK_ENV = "MOCE_EXPERIMENT_LOCK"
_held: dict[str, int] = {}  # lock path -> descriptor, for the locks this process holds (or shares with its parent)


class ExperimentBusy(RuntimeError):
    """Another process holds the experiment's lock and the caller chose not to wait."""


class InstanceDamaged(RuntimeError):
    """An instance that does not open, or that `moce doctor` cannot repair without a person deciding."""


def _lock_path(storage_root: str | Path) -> Path:
    return Path(storage_root).resolve() / LOCK_FILE


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} (`{info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is writing it this very moment
        return "another process"


def _inherited_descriptor(path: Path) -> int | None:
    """The descriptor of `path`'s lock that a parent passed down, when it is really that file's (the variable
    alone could be stale or copied into an unrelated process's environment)."""
    fd_text, _, locked = os.environ.get(LOCK_ENV, "").partition(":")
    if locked != str(path) or not fd_text.isdigit():
        return None
    try:
        inherited, current = os.fstat(int(fd_text)), os.stat(path)
    except OSError:
        return None
    return int(fd_text) if (inherited.st_dev, inherited.st_ino) == (current.st_dev, current.st_ino) else None


@contextmanager
def experiment_lock(storage_root: str | Path, command: str, *, wait: bool = True,
                    out: TextIO | None = None) -> Iterator[None]:
    """Hold the experiment's lock: an exclusive `flock` on `<storage_root>/.moce.lock`, which records who holds it
    (process, host, `command`, since when). Held by another process: print who, to `out` (default stderr), and
    wait for it, or raise `ExperimentBusy` saying who when `wait` is False.

    Re-entering in the same process, or in a child process it was passed to (`held_lock_descriptors`), holds it
    already. The kernel releases the lock when its holder ends, killed or not: no stale lock to clean up.
    `flock` rather than the `filelock` package: the project does not depend on it, and this needs the descriptor
    itself, to pass the lock to child processes.
    """
    path = _lock_path(storage_root)
    key = str(path)
    if key in _held:
        yield
        return
    inherited = _inherited_descriptor(path)
    if inherited is not None:
        _held[key] = inherited
        try:
            yield
        finally:  # neither unlocked nor closed: the lock is the parent's
            del _held[key]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise ExperimentBusy(f"{command}: experiment storage {path.parent} is in use by {holder}; "
                                     f"run it again when that has finished") from None
            print(f"{command}: experiment storage {path.parent} is in use by {holder}; waiting for it to finish "
                  f"(Ctrl-C to give up)", file=out or sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        # Written in place, not replaced atomically: the lock is on this file (its inode), which must stay.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _held[key] = fd
        previous = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = f"{fd}:{key}"
        try:
            yield
        finally:
            del _held[key]
            if previous is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = previous
    finally:
        os.close(fd)  # releases the lock, unless a child process still shares it


def lock_is_held(storage_root: str | Path) -> bool:
    """Whether this process holds (or shares with its parent) the lock of the experiment at `storage_root`."""
    return str(_lock_path(storage_root)) in _held


def held_lock_descriptors() -> tuple[int, ...]:
    """The descriptors of the locks this process holds: pass them to a child process (`pass_fds`, or inheritable
    across `exec`) that writes on this process's behalf; `LOCK_ENV` tells it which is which."""
    return tuple(_held.values())


def experiment_instance(experiment: Experiment, run_slots: int | None = None) -> dg.DagsterInstance:
    """The experiment's persistent Dagster instance: one per experiment, so that one experiment's history
    never makes another's assets look fresh. DAGSTER_HOME, when set, wins. Created (its SQLite storages stamped)
    only under the experiment's lock, which the caller must hold. `run_slots` (`--workers`), else MOCE_RUN_SLOTS,
    sets the run queue's limits in its dagster.yaml; without either, the file keeps its own (first written as one
    per core or GPU)."""
    if not lock_is_held(experiment.storage_root):
        raise RuntimeError(f"the instance of experiment {experiment.name!r} is opened only under its lock: "
                           f"`with experiment_lock({str(experiment.storage_root)!r}, command)`")
    home = Path(os.environ.get("DAGSTER_HOME") or experiment.storage_root / "dagster_home")
    os.environ["DAGSTER_HOME"] = str(home)
    asked = run_slots is not None or os.environ.get(RUN_SLOTS_ENV) is not None  # MOCE_RUN_SLOTS: machine_run_slots
    write_instance_config(home, run_slots or machine_run_slots(gpus_per_run=experiment.launcher.nproc_per_node),
                          override=asked)
    try:
        instance = dg.DagsterInstance.get()
    except Exception as error:  # alembic's CommandError, among the many things that can fail opening an instance
        if "more than one head" not in str(error):
            raise
        raise InstanceDamaged(f"the Dagster instance at {home} does not open ({error}); `moce doctor` on "
                              f"experiment {experiment.name!r} repairs it") from error
    for run_id in fail_runs_of_dead_processes(instance):
        print(f"run {run_id} was left STARTED by a process that is gone (killed?): marked failed")
    return instance


# ------------------------------------------------------------------------------------------------ doctor


def _alembic_scripts():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    # Dagster has no public name for its migration scripts; its version is pinned (pyproject.toml).
    from dagster._core.storage.sql import ALEMBIC_SCRIPTS_LOCATION

    config = Config()
    config.set_main_option("script_location", ALEMBIC_SCRIPTS_LOCATION)
    return ScriptDirectory.from_config(config)


def _version_to_keep(database: Path, versions: Sequence[str], scripts) -> str:
    """Of several `alembic_version` rows, the one that is the current head, else the one every other row is an
    ancestor of (the newest migration applied); anything else needs a person."""
    head = scripts.as_revision_number("head")
    if head in versions:
        return head
    for candidate in versions:
        try:
            lineage = {revision.revision for revision in scripts.iterate_revisions(candidate, "base")}
        except Exception as error:  # alembic raises several error types for an unknown revision
            raise InstanceDamaged(f"{database}: alembic_version row {candidate!r} is no migration of this Dagster "
                                  f"({type(error).__name__}: {error})") from error
        if set(versions) <= lineage:
            return candidate
    raise InstanceDamaged(f"{database}: alembic_version rows {sorted(versions)} are on different branches of "
                          f"Dagster's migrations: not repaired; back the instance up and run `dagster instance "
                          f"migrate`")


def repair_alembic_versions(home: str | Path, *, dry_run: bool = False) -> list[str]:
    """Find every SQLite storage under `home` (runs, event logs, schedules) whose `alembic_version` table has more
    than one row, and keep only the right one (`_version_to_keep`); nothing else in the database is touched, so the
    run history stays. Returns what was found (and repaired, unless `dry_run`), one line per database."""
    scripts = None
    found = []
    for database in sorted(Path(home).rglob("*.db")):
        with closing(sqlite3.connect(database)) as connection:
            if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
                                  ).fetchone() is None:
                continue
            versions = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
            if len(versions) <= 1:
                continue
            if scripts is None:
                scripts = _alembic_scripts()
            keep = _version_to_keep(database, versions, scripts)
            found.append(f"{database.relative_to(home)}: {len(versions)} alembic_version rows {versions}: "
                         f"{'would keep' if dry_run else 'kept'} {keep}")
            if not dry_run:
                with connection:  # one transaction: all rows replaced by the one, or nothing changed
                    connection.execute("DELETE FROM alembic_version")
                    connection.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (keep,))
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.instance DAGSTER_HOME", file=sys.stderr)
        return 2
    print(f"wrote {write_instance_config(args[0])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
