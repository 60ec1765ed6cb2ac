"""The `moce` commands' runs go through the instance's run queue: queued, then started by the daemon within the
instance's limits (runs at once, steps of a pool at once), and a failed run is reported with its id and the
failing step's error."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines.instance import LOCK_ENV, experiment_lock, write_instance_config
from pipelines.queue import RunQueue

DEFINITIONS = '''
import time
import dagster as dg

@dg.asset(partitions_def=dg.StaticPartitionsDefinition(["a", "b", "c", "bad"]), pool="training")
def trained(context: dg.AssetExecutionContext) -> None:
    time.sleep(2)
    if context.partition_key == "bad":
        raise ValueError("partition bad: no rows to train on")

defs = dg.Definitions(assets=[trained], jobs=[dg.define_asset_job("train", selection=[trained])])
'''
RUN_EVENTS = [dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING, dg.DagsterEventType.RUN_START]


def _intervals(instance, run_ids, start, ends) -> list[tuple[float, float]]:
    spans = []
    for run_id in run_ids:
        begun = None
        for entry in instance.all_logs(run_id):
            kind = entry.dagster_event and entry.dagster_event.event_type
            if kind == start:
                begun = entry.timestamp
            elif kind in ends and begun is not None:
                spans.append((begun, entry.timestamp))
                begun = None
    return spans


def _most_at_once(spans) -> int:
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


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
        run_spans = _intervals(instance, run_ids, dg.DagsterEventType.RUN_START,
                               {dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE})
        step_spans = _intervals(instance, run_ids, dg.DagsterEventType.STEP_START,
                                {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE})
        assert len(run_spans) == len(step_spans) == 4
        assert _most_at_once(run_spans) <= 2, run_spans
        assert _most_at_once(step_spans) == 1, "the training pool's one slot was shared"
    printed, errors = out.getvalue(), capsys.readouterr().err
    assert "part a: queued" in printed and "part a: started" in printed and "part a: done in" in printed
    assert "part bad: FAILED in" in errors and f"(run {run_ids[3]})" in errors
    assert "step trained failed: ValueError: partition bad: no rows to train on" in errors
