"""The `moce` commands' runs go through the instance's run queue: queued, then started by the daemon within the
instance's limits (runs at once, steps of a pool at once), and a failed run is reported with its id and the
failing step's error."""

from __future__ import annotations

import io
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines.instance import LOCK_ENV, experiment_lock, max_concurrent_runs, write_instance_config
from pipelines.queue import RunQueue
from pipelines.study import partition_steps
from tests.pipeline_fixtures import most_at_once, run_spans

DEFINITIONS = '''
import json
import os
import time
from pathlib import Path

import dagster as dg

@dg.asset(partitions_def=dg.StaticPartitionsDefinition(["a", "b", "c", "bad", "killed"]), pool="training")
def trained(context: dg.AssetExecutionContext) -> None:
    context.log.info(f"training partition {context.partition_key}")
    context.log.debug("a debug line the command does not print")
    time.sleep(2)
    if context.partition_key == "bad":
        raise ValueError("partition bad: no rows to train on")
    marker = Path(__file__).parent / "kill-me.json"
    if context.partition_key == "killed" and not (Path(__file__).parent / "killed-once").exists():
        # The step's process and the run worker above it, for the test to kill as the OOM killer would.
        marker.write_text(json.dumps({"step": os.getpid(), "run_worker": os.getppid()}))
        time.sleep(600)

defs = dg.Definitions(assets=[trained], jobs=[dg.define_asset_job("train", selection=[trained])])
'''
RUN_EVENTS = [dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING, dg.DagsterEventType.RUN_START]


@pytest.fixture
def queue_home(tmp_path, monkeypatch) -> Path:
    for variable in ("DAGSTER_HOME", LOCK_ENV, "MOCE_RUN_SLOTS"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "definitions.py").write_text(DEFINITIONS)
    (tmp_path / "workspace.yaml").write_text(textwrap.dedent("""
        load_from:
          - python_file:
              relative_path: definitions.py
              location_name: queue_test
    """))
    home = tmp_path / "dagster_home"
    home.mkdir()
    # The file's own pool limit wins over the one sized to the machine: 2 runs at once, 1 training step at once.
    (home / "dagster.yaml").write_text(yaml.safe_dump({"concurrency": {"pools": {"default_limit": 1}}}))
    write_instance_config(home, slots=2)
    return home


def test_runs_go_through_the_queue_within_its_limits_and_a_failure_is_reported(queue_home, capsys):
    settings = yaml.safe_load((queue_home / "dagster.yaml").read_text())
    assert settings["concurrency"] == {"runs": {"max_concurrent_runs": 2},
                                       "pools": {"default_limit": 1, "granularity": "op"}}
    assert settings["run_coordinator"]["class"] == "QueuedRunCoordinator"
    out = io.StringIO()
    with experiment_lock(queue_home.parent, "test"), dg.DagsterInstance.from_config(str(queue_home)) as instance:
        with RunQueue(instance, workspace=queue_home.parent / "workspace.yaml", location="queue_test",
                      out=out, poll_seconds=0.5) as queue:
            run_ids = [queue.submit("train", [dg.AssetKey("trained")], label=f"part {key}", partition=key)
                       for key in ("a", "b", "c", "bad")]
            outcomes = queue.wait(run_ids)
        assert [outcome.status for outcome in outcomes] == [dg.DagsterRunStatus.SUCCESS] * 3 + [
            dg.DagsterRunStatus.FAILURE]
        for run_id in run_ids:
            run = instance.get_run_by_id(run_id)
            assert run.tags["dagster/partition"] in {"a", "b", "c", "bad"}
            # Queued by the command, dequeued and launched by the daemon: the run's status went
            # QUEUED -> STARTING -> STARTED -> SUCCESS (or FAILURE), in that order.
            kinds = [entry.dagster_event.event_type for entry in instance.all_logs(run_id) if entry.dagster_event]
            seen = [kind for kind in kinds if kind in RUN_EVENTS]
            assert seen == RUN_EVENTS, (run_id, kinds)
            assert kinds.index(dg.DagsterEventType.RUN_START) < kinds.index(
                dg.DagsterEventType.RUN_SUCCESS if run.tags["dagster/partition"] != "bad"
                else dg.DagsterEventType.RUN_FAILURE)
        assert {key for key in instance.get_materialized_partitions(dg.AssetKey("trained"))} == {"a", "b", "c"}
        spans_of_runs = run_spans(instance, run_ids, dg.DagsterEventType.RUN_START,
                               {dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE})
        step_spans = run_spans(instance, run_ids, dg.DagsterEventType.STEP_START,
                                {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE})
        assert len(spans_of_runs) == len(step_spans) == 4
        assert most_at_once(spans_of_runs) <= 2, spans_of_runs
        assert most_at_once(step_spans) == 1, "the training pool's one slot was shared"
    printed, errors = out.getvalue(), capsys.readouterr().err
    assert "part a: queued" in printed and "part a: started" in printed and "part a: done in" in printed
    # What a step logs at INFO (its progress) is printed under it; debug lines are not.
    assert printed.index("part a:   step trained started") < printed.index("part a:     training partition a") \
        < printed.index("part a:   step trained done in")
    assert "debug line" not in printed
    assert "part bad: FAILED in" in errors and f"(run {run_ids[3]})" in errors
    assert "step trained failed: ValueError: partition bad: no rows to train on" in errors


def test_a_killed_run_is_marked_failed_and_the_next_call_runs_it_again(queue_home, capsys):
    """The OOM killer (or a person) kills a run's processes: the command's wait ends with the run FAILED instead of
    following it for ever, and the next call, which submits the partitions not materialized (as `moce study`
    does: `partition_steps`), runs it again to success."""
    key = dg.AssetKey("trained")
    out = io.StringIO()
    marker = queue_home.parent / "kill-me.json"
    with experiment_lock(queue_home.parent, "test"), dg.DagsterInstance.from_config(str(queue_home)) as instance:
        with RunQueue(instance, workspace=queue_home.parent / "workspace.yaml", location="queue_test",
                      out=out, poll_seconds=0.5) as queue:
            run_ids = [queue.submit("train", [key], label=f"part {name}", partition=name) for name in ("a", "killed")]
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert time.monotonic() < deadline, "the run to kill never started"
                time.sleep(0.5)
            for pid in json.loads(marker.read_text()).values():
                os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            outcomes = queue.wait(run_ids)
            noticed_after = time.monotonic() - started
        assert [outcome.status for outcome in outcomes] == [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
        assert noticed_after < 120, noticed_after
        assert set(instance.get_materialized_partitions(key)) == {"a"}

        (queue_home.parent / "killed-once").touch()
        again = partition_steps(["a", "killed"], set(instance.get_materialized_partitions(key)), set(),
                                rerun=False, with_conditions=False)
        assert list(again) == ["killed"]
        with RunQueue(instance, workspace=queue_home.parent / "workspace.yaml", location="queue_test",
                      out=out, poll_seconds=0.5) as queue:
            [rerun] = queue.wait([queue.submit("train", [key], label="part killed", partition="killed")])
        assert rerun.success
        assert set(instance.get_materialized_partitions(key)) == {"a", "killed"}
    assert "part killed: FAILED" in capsys.readouterr().err


def test_workers_set_the_queue_limits_over_the_file(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"concurrency": {"runs": {"max_concurrent_runs": 5},
                                                                       "pools": {"default_limit": 5}}}))
    write_instance_config(home, slots=2)  # sized to the machine: the file's own limits stay
    assert yaml.safe_load((home / "dagster.yaml").read_text())["concurrency"]["runs"]["max_concurrent_runs"] == 5
    write_instance_config(home, slots=2, override=True)  # `--workers 2`
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    assert settings["concurrency"] == {"runs": {"max_concurrent_runs": 2},
                                       "pools": {"default_limit": 2, "granularity": "op"}}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert max_concurrent_runs(instance) == 2
