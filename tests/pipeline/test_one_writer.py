"""One experiment, one writer: commands on one experiment take turns, and `moce doctor` repairs an instance that two
commands at once left with two alembic_version rows."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from moce_model.experiment import load_experiment
from pipelines import cli
from pipelines.instance import (
    LOCK_ENV,
    ExperimentBusy,
    experiment_instance,
    experiment_lock,
)
from tests.pipeline_fixtures import small_experiment_values

REPO = Path(__file__).resolve().parents[2]
# A writer as `moce run` is one: it waits for `go` (so that both start together), then, under the experiment's lock,
# opens (the first time: creates) the instance and materializes one asset in it.
WRITER = """
import json, sys, time
from pathlib import Path
import dagster as dg
from moce_model.experiment import load_experiment
from pipelines.instance import experiment_instance, experiment_lock

experiment_file, go, name = sys.argv[1:]
experiment = load_experiment(experiment_file)

@dg.asset(name=f"written_by_{name}")
def written() -> int:
    return 1

while not Path(go).exists():
    time.sleep(0.01)
with experiment_lock(experiment.storage_root, f"writer {name}"):
    started = time.time()
    instance = experiment_instance(experiment)
    assert dg.materialize([written], instance=instance).success
    finished = time.time()
    instance.dispose()
print(json.dumps([started, finished]))
"""


@pytest.fixture
def experiment_file(tmp_path, monkeypatch) -> Path:
    for variable in ("DAGSTER_HOME", "MOCE_EXPERIMENT", LOCK_ENV):
        monkeypatch.delenv(variable, raising=False)
    path = tmp_path / "writers.yaml"
    values = small_experiment_values(tmp_path)
    del values["name"]
    path.write_text(yaml.safe_dump(values))
    return path


def _environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in ("DAGSTER_HOME", LOCK_ENV)}
    return {**environment, "PYTHONPATH": os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])}


def _moce(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _alembic_rows(home: Path) -> dict[str, list[str]]:
    rows = {}
    for database in sorted(home.rglob("*.db")):
        connection = sqlite3.connect(database)
        try:
            if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone():
                rows[str(database.relative_to(home))] = [row[0] for row in
                                                         connection.execute("SELECT version_num FROM alembic_version")]
        finally:
            connection.close()
    return rows


def test_two_writers_at_once_take_turns_and_leave_a_usable_instance(experiment_file, tmp_path):
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(experiment_file), str(go), name], cwd=REPO,
                                env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    time.sleep(1.0)  # both past their imports, or nearly: then both are let go at once
    go.touch()
    outcomes = [writer.communicate(timeout=240) for writer in writers]
    for writer, (out, err) in zip(writers, outcomes):
        assert writer.returncode == 0, err
    (first, first_end), (second, second_end) = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes)
    assert first_end <= second, "the two writers worked on the instance at the same time"

    home = load_experiment(experiment_file).storage_root / "dagster_home"
    rows = _alembic_rows(home)
    assert rows and all(len(versions) == 1 for versions in rows.values()), rows
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)


def test_a_second_command_says_which_holds_the_experiment_and_waits_or_refuses(experiment_file):
    experiment = load_experiment(experiment_file)
    with experiment_lock(experiment.storage_root, "moce run --experiment writers.yaml"):
        refused = _moce("doctor", "--no-wait", "--experiment", str(experiment_file))
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == cli.EXIT_BUSY
        assert f"is in use by process {os.getpid()}" in err
        assert "`moce run --experiment writers.yaml`" in err

        waiting = _moce("doctor", "--experiment", str(experiment_file))
        line = waiting.stderr.readline()
        assert f"is in use by process {os.getpid()}" in line and "waiting for it to finish" in line
        time.sleep(0.5)
        assert waiting.poll() is None, "the second command went on while the first held the experiment"
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "nothing to check" in out


def test_the_lock_is_reentrant_and_needed_to_open_the_instance(experiment_file):
    experiment = load_experiment(experiment_file)
    with pytest.raises(RuntimeError, match="only under its lock"):
        experiment_instance(experiment)
    with experiment_lock(experiment.storage_root, "outer"), experiment_lock(experiment.storage_root, "inner"):
        experiment_instance(experiment).dispose()
    with experiment_lock(experiment.storage_root, "again", wait=False):  # released by the outer one
        pass


def test_doctor_repairs_duplicate_alembic_rows_and_keeps_the_history(experiment_file, capsys):
    experiment = load_experiment(experiment_file)

    @dg.asset
    def kept() -> int:
        return 1

    with experiment_lock(experiment.storage_root, "setup"):
        instance = experiment_instance(experiment)
        run_id = dg.materialize([kept], instance=instance).run_id
        instance.dispose()
    home = experiment.storage_root / "dagster_home"
    schedules = home / "schedules" / "schedules.db"
    [head] = _alembic_rows(home)["schedules/schedules.db"]
    connection = sqlite3.connect(schedules)
    with connection:
        # What a second process stamping the storage at the same time left: the last revision Dagster stamps on a
        # storage whose tables exist but whose version table is empty (dagster/_core/storage/sqlite.py).
        connection.execute("INSERT INTO alembic_version (version_num) VALUES ('5771160a95ad')")
    connection.close()

    assert cli.main(["set-k", "3", "--experiment", str(experiment_file)]) == 1
    assert "more than one head" in capsys.readouterr().err

    assert cli.main(["doctor", "--dry-run", "--experiment", str(experiment_file)]) == 1
    assert "would keep" in capsys.readouterr().out
    assert cli.main(["doctor", "--experiment", str(experiment_file)]) == 0
    out = capsys.readouterr().out
    assert "schedules/schedules.db: 2 alembic_version rows" in out and f"kept {head}" in out
    assert "the instance opens: 1 runs" in out
    assert _alembic_rows(home)["schedules/schedules.db"] == [head]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        assert instance.get_latest_materialization_event(dg.AssetKey("kept")) is not None


def test_the_run_queues_daemon_holds_its_commands_lock(experiment_file, tmp_path, monkeypatch):
    from pipelines.queue import start_service

    experiment = load_experiment(experiment_file)
    # As `dagster dev` started by a command's run queue: it shares the command's lock, and holds it on after the
    # command let go of it, until it ends.
    child = ("import sys, time; from pathlib import Path; from pipelines.instance import experiment_lock, lock_is_held\n"
             "with experiment_lock(sys.argv[1], 'daemon', wait=False):\n"
             "    assert lock_is_held(sys.argv[1])\n"
             "    Path(sys.argv[2]).touch()\n"
             "    while not Path(sys.argv[3]).exists(): time.sleep(0.05)\n")
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    command = [sys.executable, "-c", child, str(experiment.storage_root), str(ready), str(stop)]
    with experiment_lock(experiment.storage_root, "moce sweep"):
        daemon = start_service(command, tmp_path / "daemon.log", _environment() | {
            LOCK_ENV: os.environ[LOCK_ENV]}, cwd=REPO)
        deadline = time.monotonic() + 120
        while not ready.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), (tmp_path / "daemon.log").read_text()
    with pytest.raises(ExperimentBusy):  # the command is done, its daemon is not
        with experiment_lock(experiment.storage_root, "next", wait=False):
            pass
    stop.touch()
    assert daemon.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()
    # The daemon did not release the lock for the command, and the lock is free once both have ended.
    with experiment_lock(experiment.storage_root, "next", wait=False):
        pass
