"""`moce study` (`make study`): materialize what the study reads (the experiment's instructions, clusters and base
model) when it is missing or unsynced, then every run of the study not yet materialized (one partition of
`study_runs`) with its evaluation-only conditions (the same partition of `study_conditions`), then `study_table`;
prints the seconds of each run and where the table and figure are.

Each partition is one Dagster run submitted to the experiment's run queue (pipelines/queue.py), which runs as many
side by side as the instance allows (`concurrency` in dagster.yaml: runs at once, and steps of the `training` pool
at once) in processes of their own: a process that ran 11 runs in turn grew to 13 GiB and was killed by the kernel
(2-core, 24 GB machine), a run's process gives all its memory back when it ends. On a CPU, runs side by side share
its cores (`threads_per_run`): a run is a single-threaded chain of small matmuls, so on the 2-core machine two
one-thread runs side by side use both cores better than one run on two threads.

`--workers N` sets the run queue's limits; `--runs moce/e4/s0,base` runs only those partitions (and the table over
what is materialized); `--rerun` runs the named (or all) partitions again even when they are materialized;
`--no-conditions` leaves the conditions out. A run already materialized gets only its missing conditions, so on an
existing study `moce study` trains the runs it lacks and scores the conditions of all.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import dagster as dg

from assets.study import CONDITIONS_KEY, RUNS_KEY, conditions_to_score
from pipelines.queue import RunQueue, threads_per_run

if TYPE_CHECKING:
    from moce_model.experiment import Experiment


def partition_steps(wanted: list[str], runs_done: set[str], conditions_done: set[str], rerun: bool,
                    with_conditions: bool) -> dict[str, list[dg.AssetKey]]:
    """Partition -> what to materialize for it, in the order of `wanted`: `study_runs` where the run is missing
    (or `rerun`), then `study_conditions` where its conditions are missing or its run is materialized again
    (conditions scored on an earlier training would be stale); partitions with nothing to do are left out."""
    steps = {}
    for key in wanted:
        run = rerun or key not in runs_done
        conditions = with_conditions and (run or key not in conditions_done)
        if run or conditions:
            steps[key] = [*([RUNS_KEY] if run else []), *([CONDITIONS_KEY] if conditions else [])]
    return steps


def run_study(experiment: Experiment, instance: dg.DagsterInstance, queue: RunQueue, *, runs: list[str],
              rerun: bool = False, conditions: bool = True, table: bool = True) -> int:
    """The study's runs through `queue` (the command's status: 0, 1 when a run failed, 2 for unknown runs)."""
    from pipelines.definitions import defs
    from pipelines.runner import materialize_unsynced, unsynced_asset_keys

    graph = defs.resolve_asset_graph()
    all_runs = list(graph.get(RUNS_KEY).partitions_def.get_partition_keys())
    wanted = runs or all_runs
    unknown = [key for key in wanted if key not in all_runs]
    if unknown:
        print(f"not runs of this study: {unknown}; runs: {all_runs}", file=sys.stderr)
        return 2
    print(f"experiment={experiment.name} DAGSTER_HOME={instance.root_directory}")
    started_all = time.perf_counter()

    condition_names = graph.get(CONDITIONS_KEY).metadata.get("conditions", [])
    # A run whose conditions were scored before a condition joined the study is scored again, all conditions.
    conditions_complete = {key for key, missing in conditions_to_score(instance, wanted, condition_names).items()
                           if not missing}
    steps = partition_steps(wanted, set(instance.get_materialized_partitions(RUNS_KEY)), conditions_complete,
                            rerun, conditions)
    queue.environment.update(threads_per_run(instance, len(steps)))

    upstream = (dg.AssetSelection.assets(RUNS_KEY).upstream() - dg.AssetSelection.groups("study")
                ).required_multi_asset_neighbors()
    inputs_changed = bool(unsynced_asset_keys(defs, instance, selection=upstream))
    print("the study's inputs:")
    if not materialize_unsynced(defs, instance, upstream, queue=queue):
        print("materializing the study's inputs FAILED; no run of the study was started", file=sys.stderr)
        return 1
    split_key = dg.AssetKey("study_heldout_split")
    if instance.get_latest_materialization_event(split_key) is None or inputs_changed:
        [split] = queue.wait([queue.submit("study", [split_key], label="study_heldout_split")])
        if not split.success:
            print("study_heldout_split FAILED; no run of the study was started", file=sys.stderr)
            return 1

    run_ids = {key: queue.submit("study", assets, partition=key,
                                 label=f"run {key} ({' + '.join(a.to_user_string() for a in assets)})")
               for key, assets in steps.items()}
    outcomes = dict(zip(run_ids, queue.wait(list(run_ids.values()))))
    failed_runs = [key for key, outcome in outcomes.items() if not outcome.success]
    if table:
        [made] = queue.wait([queue.submit("study", [dg.AssetKey("study_table")], label="study_table")])
        if made.success:
            print(f"\nstudy table: {experiment.storage_root / 'study' / 'study_table.md'}")
            print(f"study figure: {experiment.storage_root / 'study' / 'study_figure.png'}")
        else:
            failed_runs.append("study_table")
    if outcomes:
        print("seconds per run:", {key: round(outcome.seconds, 1) for key, outcome in outcomes.items()
                                   if outcome.seconds is not None})
    print(f"total: {time.perf_counter() - started_all:.1f} s")
    if failed_runs:
        print(f"FAILED: {', '.join(failed_runs)} (their errors are above, all of their logs in `moce ui`)",
              file=sys.stderr)
    return 1 if failed_runs else 0

