"""`make study`: materialize what the study reads (the experiment's instructions, clusters and base model) when it
is missing or unsynced, then every run of the study not yet materialized (one partition of `study_runs` at a
time) with its evaluation-only conditions (the same partition of `study_conditions`), then `study_table`; prints
the seconds of each run and where the table and figure are.

`--runs moce/e4/s0,base` runs only those partitions (and the table over what is materialized); `--rerun` runs
the named (or all) partitions again even when they are materialized; `--no-conditions` leaves the conditions
out. A run already materialized gets only its missing conditions, so on an existing study `moce study` trains
the runs it lacks and scores the conditions of all. `--workers 2` runs the partitions in two processes of one
thread each: a run is a single-threaded chain of small matmuls, so on the 2-core machine two one-thread runs side
by side use both cores better than one run on two threads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import dagster as dg

from assets.study import CONDITIONS_KEY, RUNS_KEY, conditions_to_score
from moce_model.common.processes import terminable_children
from pipelines.instance import (
    experiment_instance,
    experiment_lock,
    held_lock_descriptors,
)

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


def run_each(keys: list[str], execute: Callable[[str], bool]) -> list[str]:
    """Run every key in turn; the keys whose run failed. A failed run does not stop the others (a study is hours of
    runs): they go on, the table is then built over what is materialized (it names what is missing), and the exit
    status says that something failed."""
    return [key for key in keys if not execute(key)]


def run_in_processes(keys: list[str], workers: int, command: Callable[[str], list[str]]) -> list[str]:
    """Run `command(key)` for every key in a fresh process of one thread, `workers` at a time; the keys whose
    process failed or was killed. One process per run, not one per worker: a worker process that ran 11 runs
    in turn grew to 13 GiB and was killed by the kernel (2-core, 24 GB machine); a run's process gives all its
    memory back when it ends. The processes inherit the environment, so the experiment (MOCE_EXPERIMENT) and
    its Dagster instance (DAGSTER_HOME) are the parent's, and the experiment's lock, which they write under."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def succeeded(key: str) -> bool:
        return subprocess.run(command(key), env=environment, check=False,
                              pass_fds=held_lock_descriptors()).returncode == 0

    with terminable_children(), ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(succeeded, keys))
    return [key for key, ok in zip(keys, outcomes) if not ok]


def main(argv: list[str] | None = None) -> int:
    from moce_model.experiment import load_experiment

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="", help="comma-separated run keys (default: every run of the study)")
    parser.add_argument("--rerun", action="store_true", help="run the partitions even when already materialized")
    parser.add_argument("--no-table", action="store_true", help="do not materialize study_table")
    parser.add_argument("--no-conditions", action="store_true",
                        help="do not materialize study_conditions (the evaluation-only conditions of each run)")
    parser.add_argument("--workers", type=int, default=1, help="processes running partitions side by side")
    parser.add_argument("--skip-inputs", action="store_true", help=argparse.SUPPRESS)  # a worker: the parent did them
    args = parser.parse_args(argv)
    experiment = load_experiment()
    command = shlex.join(["python", "-m", "pipelines.study", *(sys.argv[1:] if argv is None else argv)])
    with experiment_lock(experiment.storage_root, command):
        return _study(args, experiment)


def _study(args: argparse.Namespace, experiment: Experiment) -> int:
    from pipelines.definitions import defs
    from pipelines.runner import unsynced_asset_keys

    instance = experiment_instance(experiment)
    graph = defs.resolve_asset_graph()
    all_runs = list(graph.get(RUNS_KEY).partitions_def.get_partition_keys())
    wanted = [key for key in args.runs.split(",") if key] or all_runs
    unknown = [key for key in wanted if key not in all_runs]
    if unknown:
        print(f"not runs of this study: {unknown}; runs: {all_runs}", file=sys.stderr)
        return 2
    log_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    print(f"experiment={experiment.name} DAGSTER_HOME={instance.root_directory}")
    started_all = time.perf_counter()

    upstream = (dg.AssetSelection.assets(RUNS_KEY).upstream() - dg.AssetSelection.groups("study")
                ).required_multi_asset_neighbors()
    todo = [] if args.skip_inputs else unsynced_asset_keys(defs, instance, selection=upstream)
    if todo:
        print("materializing the study's inputs:", ", ".join(key.to_user_string() for key in todo))
        started = time.perf_counter()
        if not defs.resolve_job_def("demo_pipeline").execute_in_process(
                instance=instance, asset_selection=todo, raise_on_error=False, run_config=log_config).success:
            print("materializing the study's inputs FAILED", file=sys.stderr)
            return 1
        print(f"inputs: {time.perf_counter() - started:.1f} s")
    study_job = defs.resolve_job_def("study")
    split_key = dg.AssetKey("study_heldout_split")
    if not args.skip_inputs and (instance.get_latest_materialization_event(split_key) is None or todo):
        study_job.execute_in_process(instance=instance, asset_selection=[split_key], run_config=log_config)

    conditions = graph.get(CONDITIONS_KEY).metadata.get("conditions", [])
    # A run whose conditions were scored before a condition joined the study is scored again, all conditions.
    conditions_complete = {key for key, missing in conditions_to_score(instance, wanted, conditions).items()
                           if not missing}
    steps = partition_steps(wanted, set(instance.get_materialized_partitions(RUNS_KEY)), conditions_complete,
                            args.rerun, not args.no_conditions)
    pending = list(steps)
    seconds: dict[str, float] = {}
    failed_workers: list[str] = []  # runs of the per-run processes that failed
    if args.workers > 1 and len(pending) > 1:
        started = time.perf_counter()

        def worker_command(key: str) -> list[str]:
            return [sys.executable, "-m", "pipelines.study", "--runs", key, "--no-table", "--skip-inputs",
                    *(["--rerun"] if args.rerun else []), *(["--no-conditions"] if args.no_conditions else [])]

        failed_workers = run_in_processes(pending, args.workers, worker_command)
        print(f"{len(pending)} runs, {args.workers} at a time: {time.perf_counter() - started:.1f} s")
        if failed_workers:
            print(f"runs that FAILED or were killed: {', '.join(failed_workers)}", file=sys.stderr)
        pending = []

    def execute(key: str) -> bool:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = study_job.execute_in_process(instance=instance, asset_selection=steps[key], partition_key=key,
                                              raise_on_error=False, run_config=log_config)
        seconds[key] = time.perf_counter() - started
        what = " + ".join(asset.to_user_string() for asset in steps[key])
        print(f"run {key} ({what}): {'done' if result.success else 'FAILED'} in {seconds[key]:.1f} s "
              f"({time.process_time() - cpu_started:.1f} CPU seconds)", flush=True)
        return result.success

    failed_runs = run_each(pending, execute)
    if not args.no_table:
        study_job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("study_table")],
                                     run_config=log_config)
        print(f"\nstudy table: {experiment.storage_root / 'study' / 'study_table.md'}")
        print(f"study figure: {experiment.storage_root / 'study' / 'study_figure.png'}")
    if not args.skip_inputs:  # a worker process has printed its one run's line
        if seconds:
            print("seconds per run:", {key: round(value, 1) for key, value in seconds.items()})
        print(f"total: {time.perf_counter() - started_all:.1f} s")
    if failed_runs:
        print(f"FAILED runs: {', '.join(failed_runs)} (their errors are in the log above and in `moce ui`)",
              file=sys.stderr)
    return 1 if failed_runs or failed_workers else 0


if __name__ == "__main__":
    raise SystemExit(main())
