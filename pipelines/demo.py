"""`make demo`: materialize every unsynced asset of the profile in the persistent DAGSTER_HOME, then say where
to look. A second run with nothing changed finds every asset fresh (same code and data versions) and runs
nothing; a change of k re-runs exactly the assets downstream of it, as "Materialize unsynced" does in the UI.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest


def unsynced_asset_keys(
    defs: dg.Definitions, instance: dg.DagsterInstance, selection: dg.AssetSelection | None = None
) -> list[dg.AssetKey]:
    """Assets that are missing or unsynced, plus everything downstream of them.

    The status is the one the UI shows (same resolver). Dagster marks only the direct children of a changed
    asset as unsynced (their recorded input data version differs); the grandchildren's inputs have not
    changed *yet*, but will when their parents re-run, so they are included.
    """
    from pipelines.definitions import PIPELINE

    graph = defs.resolve_asset_graph()
    in_scope = (selection or PIPELINE).resolve(graph) & graph.materializable_asset_keys
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    not_fresh = [key for key in in_scope if resolver.get_status(key) != StaleStatus.FRESH]
    if not not_fresh:
        return []
    with_downstream = (
        dg.AssetSelection.assets(*not_fresh).downstream().required_multi_asset_neighbors().resolve(graph)
    )
    return sorted(with_downstream & in_scope, key=lambda key: key.to_user_string())


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            started[event.step_key] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and event.step_key in started:
            seconds[event.step_key] = entry.timestamp - started[event.step_key]
    return seconds


def main() -> int:
    from pipelines.definitions import defs
    from pipelines.instance import fail_runs_of_dead_processes
    from pipelines.profiles import load_profile

    profile = load_profile()
    instance = dg.DagsterInstance.get()
    for run_id in fail_runs_of_dead_processes(instance):
        print(f"run {run_id} was left STARTED by a process that is gone (killed?): marked failed")
    graph = defs.resolve_asset_graph()
    todo = unsynced_asset_keys(defs, instance)
    print(f"profile={profile.name} DAGSTER_HOME={instance.root_directory}")
    if not todo:
        print("every asset is up to date (same code and data versions): nothing to run")
    else:
        print("materializing:", ", ".join(key.to_user_string() for key in todo))
        started = time.perf_counter()
        result = defs.resolve_job_def("demo_pipeline").execute_in_process(
            instance=instance,
            asset_selection=todo,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
        total = time.perf_counter() - started
        per_group: dict[str, float] = defaultdict(float)
        seconds = step_seconds(instance, result.run_id)
        print("\nseconds per step:")
        for step, secs in sorted(seconds.items(), key=lambda item: -item[1]):
            print(f"  {secs:8.1f}  {step}")
        # A multi-asset (e.g. benchmark_results + benchmark_item_scores) is one step: count it once, by its op.
        steps_per_group: dict[str, set[str]] = defaultdict(set)
        for key in todo:
            node = graph.get(key)
            steps_per_group[node.group_name or "default"].add(node.assets_def.node_def.name)
        for group, steps in steps_per_group.items():
            per_group[group] = sum(seconds.get(step, 0.0) for step in steps)
        print("seconds per asset group:", {group: round(secs, 1) for group, secs in per_group.items()})
        print(f"total: {total:.1f} s")
        if not result.success:
            print("the run FAILED; see the errors above or open the run in `make ui`", file=sys.stderr)
            return 1
    report = profile.storage_root / "report" / "benchmark_report.md"
    if report.exists():
        print(f"\nbenchmark report: {report}")
    print("explore the lineage, plots and metadata: make ui  (then open http://127.0.0.1:3000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
