"""The data half as Dagster assets: materialize, lineage, and a change of k that re-runs only downstream."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from moce_model.experiment import EXPERIMENTS_DIR
from pipelines.definitions import DATA_HALF, build_definitions
from pipelines.runner import unsynced_asset_keys
from tests.pipeline_fixtures import dagster_instance, small_experiment

UPSTREAM_OF_K = ["raw/synthetic_mix", "instructions", "rejected_instructions", "instruction_embeddings"]
DATA_HALF_KEYS = set(UPSTREAM_OF_K) | {"elbow_curve", "selected_k", "kmeans_centroids", "cluster_assignments"}


def _materialization_counts(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, int]:
    counts = {}
    for key in keys:
        records = instance.fetch_materializations(dg.AssetKey.from_user_string(key), limit=100).records
        counts[key] = len(records)
    return counts


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    experiment = small_experiment(root)
    defs = build_definitions(experiment)
    with dagster_instance(root) as instance:
        result = defs.resolve_job_def("cluster_instructions").execute_in_process(instance=instance)
        assert result.success
        yield experiment, defs, instance


def test_data_half_materializes_with_contracts(clustered):
    experiment, defs, instance = clustered
    tables = experiment.storage_root / "tables"
    instructions = pl.read_parquet(tables / "instructions.parquet")
    assert {"id", "source", "system", "instruction", "input", "response", "domain", "n_chars"} <= set(
        instructions.columns
    )
    assert instructions["id"].n_unique() == instructions.height
    assignments = pl.read_parquet(tables / "cluster_assignments.parquet")
    assert assignments.columns == ["id", "cluster", "distance"]
    assert set(assignments["id"]) == set(instructions["id"])
    curve = pl.read_parquet(tables / "elbow_curve.parquet")
    assert {"k", "inertia", "silhouette", "seconds"} <= set(curve.columns)
    record = instance.fetch_materializations(dg.AssetKey("cluster_assignments"), limit=1).records[0]
    metadata = record.asset_materialization.metadata
    # Four clearly different synthetic domains: the clusters follow them.
    assert metadata["purity_vs_domain"].value >= 0.9


def test_checks_pass(clustered):
    _, _, instance = clustered
    for asset, check in [
        ("instruction_embeddings", "embeddings_are_unit_norm_and_complete"),
        ("cluster_assignments", "every_instruction_clustered_and_no_tiny_cluster"),
    ]:
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey(asset), check)]
        )[dg.AssetCheckKey(dg.AssetKey(asset), check)]
        assert record.status.value == "SUCCEEDED"
        assert record.event.dagster_event.event_specific_data.passed, check


def test_change_of_k_reruns_only_downstream(clustered):
    experiment, defs, instance = clustered
    # First automation tick: establishes the cursor; nothing has changed yet, so nothing is requested.
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=DATA_HALF)
    assert tick.total_requested == 0
    before = _materialization_counts(instance, UPSTREAM_OF_K + ["kmeans_centroids", "cluster_assignments"])

    current_k = instance.get_latest_materialization_event(dg.AssetKey("selected_k")).asset_materialization
    new_k = 3 if current_k.metadata["k"].value != 3 else 5
    result = defs.resolve_job_def("cluster_instructions").execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("selected_k")],
        run_config=dg.RunConfig(ops={"selected_k": {"config": {"k": new_k}}}),
    )
    assert result.success

    unsynced = {key.to_user_string() for key in unsynced_asset_keys(defs, instance)} & DATA_HALF_KEYS
    assert unsynced == {"kmeans_centroids", "cluster_assignments"}

    tick = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=DATA_HALF, cursor=tick.cursor
    )
    requested = {result.key.to_user_string() for result in tick.results if result.true_subset.size}
    assert requested == {"kmeans_centroids", "cluster_assignments"}
    rerun = defs.resolve_job_def("cluster_instructions").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey.from_user_string(k) for k in requested]
    )
    assert rerun.success

    after = _materialization_counts(instance, UPSTREAM_OF_K + ["kmeans_centroids", "cluster_assignments"])
    for key in UPSTREAM_OF_K:
        assert after[key] == before[key], f"{key} re-materialized on a change of k"
    assert after["kmeans_centroids"] == before["kmeans_centroids"] + 1
    assert after["cluster_assignments"] == before["cluster_assignments"] + 1
    assignments = pl.read_parquet(experiment.storage_root / "tables" / "cluster_assignments.parquet")
    assert assignments["cluster"].n_unique() == new_k
    assert not {key.to_user_string() for key in unsynced_asset_keys(defs, instance)} & DATA_HALF_KEYS


@pytest.mark.parametrize("experiment_name", sorted(path.stem for path in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_experiment_loads_like_the_ui_loads_it(experiment_name):
    from moce_model.experiment import load_experiment

    experiment = load_experiment(experiment_name)
    defs = build_definitions(experiment)
    dg.Definitions.validate_loadable(defs)
    keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert {f"moce_adapters/{variant}" for variant in experiment.variants} <= keys
    assert {f"raw/{source.name}" for source in experiment.sources} <= keys
    assert {"selected_k", "benchmark_report", "k_sweep/comparison"} <= keys
