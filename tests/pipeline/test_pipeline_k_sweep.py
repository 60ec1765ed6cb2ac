"""`moce sweep --ks 2,3` on a tiny model: each k is a partition of the k_sweep branch (one run each), every k's
merged model is checked against the unmerged one, the comparison table has a column per k, and the main graph's
k-dependent assets are never materialized."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from assets.k_sweep import COMPARISON_KEY, K_PARTITIONS, RESULTS_KEY, partition_k
from pipelines.cli import main as moce
from pipelines.definitions import K_SWEEP, PIPELINE, build_definitions
from pipelines.sweep import sweep_selection
from pipelines.instance import max_concurrent_runs
from tests.pipeline_fixtures import most_at_once, run_spans, small_experiment, small_experiment_values
from tests.tiny_models import save_tiny_llama

MERGE_CHECK = dg.AssetCheckKey(dg.AssetKey(["k_sweep", "merged_model", "moce"]), "merged_equals_unmerged")
# What depends on the main graph's k: a sweep reads the main graph but must leave these alone.
MAIN_GRAPH_K_ASSETS = ["selected_k", "kmeans_centroids", "cluster_assignments", "moce_adapters/moce",
                       "merged_model/moce", "benchmark_results/moce", "benchmark_report"]


def test_the_sweep_is_a_partitioned_branch_outside_the_pipeline(tmp_path):
    defs = build_definitions(small_experiment(tmp_path))
    graph = defs.resolve_asset_graph()
    per_k = sweep_selection().resolve(graph)
    assert {key.to_user_string() for key in per_k} == {
        "k_sweep/kmeans_centroids", "k_sweep/cluster_assignments", "k_sweep/moce_adapters/moce",
        "k_sweep/merged_model/moce", "k_sweep/benchmark_results/moce", "k_sweep/benchmark_item_scores/moce",
        "k_sweep/benchmark_expert_use/moce", "k_sweep/benchmark_prompt_embeddings/moce"}
    assert all(graph.get(key).partitions_def == K_PARTITIONS for key in per_k)
    assert graph.get(COMPARISON_KEY).partitions_def is None
    assert not (K_SWEEP.resolve(graph) & PIPELINE.resolve(graph))
    assert not (K_SWEEP.resolve_checks(graph) & PIPELINE.resolve_checks(graph))
    assert MERGE_CHECK in K_SWEEP.resolve_checks(graph)
    # The heavy steps keep their tag, so that the executor's limit on them holds for the sweep's runs too.
    for name in ("moce_adapters/moce", "merged_model/moce", "benchmark_results/moce"):
        assert defs.resolve_assets_def(dg.AssetKey.from_user_string(f"k_sweep/{name}")).op.tags == {"moce/compute": "heavy"}, name


@pytest.mark.parametrize("key", ["x", "1", "-2", "2.5", ""])
def test_a_partition_that_is_not_a_k_is_refused_by_name(key):
    with pytest.raises(ValueError, match=f"k sweep partition {key!r}"):
        partition_k(key)


def test_moce_sweep_runs_each_k_as_a_partition_and_compares_them(tmp_path, monkeypatch, capsys):
    for name in ("MOCE_EXPERIMENT", "MOCE_DATA_DIR", "DAGSTER_HOME"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    save_tiny_llama(tmp_path / "tiny_base")
    values = small_experiment_values(
        tmp_path,
        sources=[{"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": 12, "seed": 0}],
        variants=["moce", "pesc"],
        training={"overrides": {"per_device_batch_size": 4, "max_length": 96, "save_steps": 2, "lora_r": 2,
                                "lora_alpha": 4, "warmup_steps": 0}},
        evaluation={"limit_per_benchmark": 2},
    )
    del values["name"]  # an experiment file is named by its file
    experiment_file = tmp_path / "sweep.yaml"
    experiment_file.write_text(yaml.safe_dump(values, sort_keys=False))

    # `--workers 1`: one run at a time, where the machine's default (one per core) would run both k side by side.
    assert moce(["sweep", "--experiment", str(experiment_file), "--ks", "3,2", "--max-steps", "2",
                 "--workers", "1"]) == 0
    output = capsys.readouterr().out

    store = tmp_path / "store"
    instance = dg.DagsterInstance.get()  # the one `moce` used: <storage_root>/dagster_home
    assert list(instance.get_dynamic_partitions(K_PARTITIONS.name)) == ["2", "3"]
    defs = build_definitions(small_experiment(tmp_path))
    for key in sweep_selection().resolve(defs.resolve_asset_graph()):
        assert instance.get_materialized_partitions(key) == {"2", "3"}, key.to_user_string()

    # One run per k, each materializing its partition and running the merge check on it.
    result_runs = {record.partition_key: record.run_id for record in
                   instance.fetch_materializations(RESULTS_KEY, limit=10).records}
    assert set(result_runs) == {"2", "3"} and result_runs["2"] != result_runs["3"]
    checks = instance.event_log_storage.get_asset_check_execution_history(MERGE_CHECK, limit=10)
    evaluations = {record.run_id: record.event.dagster_event.event_specific_data for record in checks}
    for k, run_id in result_runs.items():
        evaluation = evaluations[run_id]
        assert evaluation.passed, k
        assert evaluation.metadata["k"].value == int(k)
        assert evaluation.metadata["max_abs_logit_diff"].value < evaluation.metadata["tolerance"].value
        assert evaluation.target_materialization_data.run_id == run_id
        assert instance.get_run_by_id(run_id).tags["dagster/partition"] == k
        # Submitted to the instance's run queue and launched by its daemon, as a run launched from the UI.
        kinds = [entry.dagster_event.event_type for entry in instance.all_logs(run_id) if entry.dagster_event]
        assert kinds.index(dg.DagsterEventType.RUN_ENQUEUED) < kinds.index(dg.DagsterEventType.RUN_STARTING) \
            < kinds.index(dg.DagsterEventType.RUN_START) < kinds.index(dg.DagsterEventType.RUN_SUCCESS), k
    spans = run_spans(instance, list(result_runs.values()), dg.DagsterEventType.RUN_START,
                      {dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE})
    assert len(spans) == 2 and most_at_once(spans) == 1, spans
    assert max_concurrent_runs(instance) == 1

    # Each k's artifacts are its own: centroids at that k, a merged model that routes over k groups.
    for k in (2, 3):
        centroids = json.loads((store / "refs" / "k_sweep" / "kmeans_centroids" / f"{k}.json").read_text())
        assert centroids["k"] == k
        merged = store / "artifacts" / "k_sweep" / "merged_model" / "moce" / str(k)
        assert json.loads((merged / "config.json").read_text())["num_groups"] == k
        assert np.load(merged / "centroids.npy").shape[0] == k
        labels = pl.read_parquet(store / "tables" / "k_sweep" / "cluster_assignments" / f"{k}.parquet")
        assert labels["cluster"].n_unique() == k

    # The comparison: a column per k, a row per (benchmark, metric), every row scored at both k.
    table = pl.read_parquet(store / "tables" / "k_sweep" / "comparison.parquet")
    assert {"k=2", "k=3", "k=2_ci_low", "n_items_k=3"} <= set(table.columns)
    per_k = {k: pl.read_parquet(store / "tables" / "k_sweep" / "benchmark_results" / "moce" / f"{k}.parquet")
             for k in (2, 3)}
    assert table.height == per_k[2].height == per_k[3].height > 0
    for k, results in per_k.items():
        joined = table.join(results, on=["benchmark", "metric"])
        assert joined.height == table.height and (joined[f"k={k}"] == joined["value"]).all(), k
    comparison = instance.get_latest_materialization_event(COMPARISON_KEY).asset_materialization
    assert comparison.metadata["ks"].value == [2, 3] and comparison.metadata["missing_ks"].value == []
    header = next(line for line in comparison.metadata["comparison"].value.splitlines() if line.startswith("| bench"))
    assert header == "| benchmark | metric | n | k=2 | k=3 |"
    assert header in output and "k=2: done" in output and "k=3: done" in output

    # The main graph was read (its inputs materialized for the sweep), never written at its own k.
    assert instance.get_latest_materialization_event(dg.AssetKey("instruction_embeddings")) is not None
    for key in MAIN_GRAPH_K_ASSETS:
        assert instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key)) is None, key
    assert not (store / "artifacts" / "merged_model").exists()
