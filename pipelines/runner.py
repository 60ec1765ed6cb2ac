"""`moce run`: materialize what is missing or stale for an experiment, in the persistent Dagster instance.

A second run with nothing changed finds every asset fresh (same code and data versions) and runs nothing; a
change of k re-runs exactly the assets downstream of it, as "Materialize unsynced" does in the UI.

Freshness is read from what Dagster records on every materialization (its documented provenance tags: the
code version, the data version, and the data version of each input), through public APIs only. A source's files
are not Dagster's to watch: the data version of `raw/<source>` includes their content (assets/data.py), and a
`raw/<source>` whose source has another data version now than it recorded is stale, so an edited file re-runs it
and, through its new data version, everything downstream.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

import dagster as dg

from assets.common import CODE_VERSION_TAG, DATA_VERSION_TAG, INPUT_DATA_VERSION_TAG
from assets.data import current_source_data_version
from pipelines.queue import RunQueue


def _latest_tags(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, str] | None:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return dict(event.asset_materialization.tags or {})


def stale_reasons(defs: dg.Definitions, instance: dg.DagsterInstance, keys) -> dict[dg.AssetKey, str]:
    """Why each of `keys` is not fresh: never materialized, a new code version, source files whose content
    changed since they were read, or an input whose data version differs from the one it was last materialized
    with (or that it never read). Fresh keys are left out.

    Dagster calls only these assets stale; their descendants are not stale *yet* (see `unsynced_asset_keys`).
    """
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    tags_of: dict[dg.AssetKey, dict[str, str] | None] = {}

    def tags(key: dg.AssetKey) -> dict[str, str] | None:
        if key not in tags_of:
            tags_of[key] = _latest_tags(instance, key)
        return tags_of[key]

    reasons: dict[dg.AssetKey, str] = {}
    for key in keys:
        spec, recorded = specs[key], tags(key)
        if recorded is None:
            reasons[key] = "never materialized"
            continue
        if spec.code_version is not None and recorded.get(CODE_VERSION_TAG) != spec.code_version:
            reasons[key] = f"code version {recorded.get(CODE_VERSION_TAG)} -> {spec.code_version}"
            continue
        source = current_source_data_version(spec)
        if source is not None and recorded.get(DATA_VERSION_TAG) != source[0]:
            reasons[key] = f"source data changed since it was read ({', '.join(source[1]) or 'its spec'})"
            continue
        for dep in sorted(spec.deps, key=lambda dep: dep.asset_key.to_user_string()):
            name = dep.asset_key.to_user_string()
            used = recorded.get(INPUT_DATA_VERSION_TAG + name)
            upstream = tags(dep.asset_key)
            current = upstream.get(DATA_VERSION_TAG) if upstream else None
            if used is None:
                reasons[key] = f"new input {name}"
                break
            if used != current:
                reasons[key] = f"input {name} has a new data version"
                break
        else:
            recorded_inputs = {tag.removeprefix(INPUT_DATA_VERSION_TAG) for tag in recorded
                               if tag.startswith(INPUT_DATA_VERSION_TAG)}
            removed = recorded_inputs - {dep.asset_key.to_user_string() for dep in spec.deps}
            if removed:
                reasons[key] = f"no longer reads {', '.join(sorted(removed))}"
    return reasons


def unsynced_asset_keys(
    defs: dg.Definitions, instance: dg.DagsterInstance, selection: dg.AssetSelection | None = None
) -> list[dg.AssetKey]:
    """Assets of `selection` (default: the whole pipeline) that are missing or stale, plus everything
    downstream of them within the selection.

    Dagster marks only the direct children of a changed asset as stale (their recorded input data version
    differs); the grandchildren's inputs have not changed *yet*, but will when their parents re-run, so they are
    included. An asset materialized together with others (a multi-asset) brings its siblings along.
    """
    from pipelines.definitions import PIPELINE

    graph = defs.resolve_asset_graph()
    # The k sweep is not part of the pipeline (it runs on demand: `moce sweep`), whatever the selection says.
    scope = PIPELINE if selection is None else selection & PIPELINE
    in_scope = scope.required_multi_asset_neighbors().resolve(graph)
    not_fresh = stale_reasons(defs, instance, in_scope)
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
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[event.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            if event.step_key in started:
                seconds[event.step_key] = entry.timestamp - started[event.step_key]
    return seconds


def materialize_unsynced(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: dg.AssetSelection | None = None,
    *,
    queue: RunQueue | None = None,
    dry_run: bool = False,
    out: TextIO | None = None,
) -> bool:
    """Materialize `unsynced_asset_keys` in one run of `demo_pipeline` submitted to `queue` (the instance's run
    queue, as `moce run` does), or without a queue in this process (a test's instance, which no daemon serves),
    printing what runs, why, and the seconds per step and asset group (to `out`, default: the current
    sys.stdout). Returns whether everything succeeded (True when there was nothing to do)."""
    out = out or sys.stdout
    todo = unsynced_asset_keys(defs, instance, selection)
    if not todo:
        print("every asset is up to date (same code and data versions): nothing to run", file=out)
        return True
    reasons = stale_reasons(defs, instance, todo)
    print("to materialize:", file=out)
    for key in todo:
        print(f"  {key.to_user_string():40s} {reasons.get(key, 'downstream of a change')}", file=out)
    if dry_run:
        return True
    started = time.perf_counter()
    if queue is None:
        result = defs.resolve_job_def("demo_pipeline").execute_in_process(
            instance=instance, asset_selection=todo, raise_on_error=False)
        run_id, success = result.run_id, result.success
    else:
        run_id = queue.submit("demo_pipeline", todo, label="the pipeline's run")
        [outcome] = queue.wait([run_id])
        success = outcome.success
    total = time.perf_counter() - started
    seconds = step_seconds(instance, run_id)
    print("\nseconds per step:", file=out)
    for step, secs in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {secs:8.1f}  {step}", file=out)
    # A multi-asset (e.g. benchmark_results + benchmark_item_scores) is one step: count it once, by its op.
    steps_per_group: dict[str, set[str]] = defaultdict(set)
    for key in todo:
        assets_def = defs.resolve_assets_def(key)
        steps_per_group[assets_def.group_names_by_key.get(key) or "default"].add(assets_def.op.name)
    per_group = {group: round(sum(seconds.get(step, 0.0) for step in steps), 1)
                 for group, steps in steps_per_group.items()}
    print("seconds per asset group:", per_group, file=out)
    print(f"total: {total:.1f} s", file=out)
    if not success:
        print(f"the run FAILED (run {run_id}); its errors are above, all of its log in {how_to_run('ui')}", file=sys.stderr)
    return success


def how_to_run(command: str) -> str:
    """How to type `moce COMMAND` in a new shell. `make demo` installs `moce` into the project's .venv/bin, which a
    shell has on its PATH only while that environment is activated: name the script by its path (and the make
    target, from the project's folder) unless `moce` on the PATH is this very script."""
    script = Path(sys.executable).parent / "moce"
    found = shutil.which("moce")
    if found and script.is_file() and Path(found).resolve() == script.resolve():
        return f"moce {command}"
    if not script.is_file():  # run as `python -m pipelines.cli`, without the installed script
        return f"{shlex.quote(sys.executable)} -m pipelines.cli {command}"
    in_project = (Path.cwd() / "Makefile").is_file()  # where `make demo` ran, and a new shell likely starts
    shown = script.absolute()
    if in_project and shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    typed = f"{shlex.quote(str(shown))} {command}"
    return f"{typed} (or make {command})" if in_project and command == "ui" else typed
