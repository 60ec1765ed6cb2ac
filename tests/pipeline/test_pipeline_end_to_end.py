"""The whole graph on a tiny model: materialize everything, then change k and re-run only what depends on it."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from pipelines.definitions import PIPELINE, build_definitions
from pipelines.runner import unsynced_asset_keys
from tests.pipeline_fixtures import dagster_instance, small_experiment
from tests.tiny_models import save_tiny_llama

NEVER_RERUN_ON_K = [
    "raw/synthetic_mix",
    "instructions",
    "rejected_instructions",
    "instruction_embeddings",
    "elbow_curve",
    "base_model",
    "moce_adapters/pesc",
    "moce_adapters/dense_adapter",
    "merged_model/pesc",
    "merged_model/dense_adapter",
    "benchmark_results/pesc",
    "benchmark_results/dense_adapter",
    "benchmark_results/base",
    "benchmark_item_scores/pesc",
    "benchmark_item_scores/dense_adapter",
    "benchmark_item_scores/base",
    "benchmark_expert_use/pesc",
    "benchmark_expert_use/dense_adapter",
]
RERUN_ON_K = [
    "kmeans_centroids",
    "cluster_assignments",
    "moce_adapters/moce",
    "merged_model/moce",
    "benchmark_results/moce",
    "benchmark_item_scores/moce",
    "benchmark_expert_use/moce",
    "benchmark_prompt_embeddings/moce",
    "benchmark_report",
]


def _counts(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, int]:
    return {
        key: len(instance.fetch_materializations(dg.AssetKey.from_user_string(key), limit=100).records)
        for key in keys
    }


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    save_tiny_llama(root / "tiny_base")
    experiment = small_experiment(
        root,
        sources=[{"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": 24, "seed": 0}],
        training={"overrides": {
            "max_steps": 3,
            "per_device_batch_size": 4,
            "max_length": 96,
            "save_steps": 2,
            "lora_r": 2,
            "lora_alpha": 4,
            "warmup_steps": 0,
        }},
        evaluation={"limit_per_benchmark": 2},
    )
    defs = build_definitions(experiment)
    with dagster_instance(root) as instance:
        result = defs.resolve_job_def("demo_pipeline").execute_in_process(instance=instance)
        assert result.success
        yield experiment, defs, instance


def test_every_asset_materialized_and_checks_pass(materialized):
    experiment, defs, instance = materialized
    for key in PIPELINE.resolve(defs.resolve_asset_graph()):
        assert instance.get_latest_materialization_event(key) is not None, key.to_user_string()
    assert unsynced_asset_keys(defs, instance) == []
    for variant in experiment.variants:
        check_key = dg.AssetCheckKey(dg.AssetKey(["merged_model", variant]), "merged_equals_unmerged")
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key])[check_key]
        assert record.event.dagster_event.event_specific_data.passed, variant
    results = pl.read_parquet(experiment.storage_root / "tables" / "benchmark_results" / "moce.parquet")
    assert results.columns == ["model_variant", "benchmark", "metric", "value", "n_items", "stderr", "ci_low",
                               "ci_high", "ci_method", "seconds"]
    scores = pl.read_parquet(experiment.storage_root / "tables" / "benchmark_item_scores" / "moce.parquet")
    per_metric = scores.group_by("benchmark", "metric").len()
    assert results.join(per_metric, on=["benchmark", "metric"]).select((pl.col("len") == pl.col("n_items")).all()).item()
    report = (experiment.storage_root / "report" / "benchmark_report.md").read_text()
    assert "## Paired differences" in report and "## Paper average" in report
    assert pl.read_parquet(experiment.storage_root / "report" / "paired_differences.parquet").height > 0
    # The analyses on the evaluation prompts: expert use recorded while the evaluation ran, every routed prompt
    # in the contingency, both in the report.
    use = pl.read_parquet(experiment.storage_root / "tables" / "benchmark_expert_use" / "moce.parquet")
    assert set(use["benchmark"]) == set(results["benchmark"]) and (use["group_tokens"] > 0).all()
    shares = use.group_by("benchmark", "layer", "group").agg(pl.col("share").sum())["share"]
    assert ((shares - 1.0).abs() < 1e-9).all()
    assert "## Routing of the evaluation prompts (cluster × benchmark)" in report
    assert "## Expert use on the evaluation prompts" in report and "**moce**" in report
    contingency = pl.read_parquet(experiment.storage_root / "report" / "routing_contingency.parquet")
    assert contingency["n_prompts"].sum() == scores.select("benchmark", "item_id").unique().height
    assert (experiment.storage_root / "report" / "expert_use_moce.png").is_file()
    embedded = pl.read_parquet(experiment.storage_root / "tables" / "benchmark_prompt_embeddings" / "moce.parquet")
    assert embedded.select("benchmark", "item_id").unique().height == contingency["n_prompts"].sum()
    assert "## 2-D map of the evaluation prompts" in report


def test_change_of_k_retrains_only_cluster_variants(materialized):
    experiment, defs, instance = materialized
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert tick.total_requested == 0
    before = _counts(instance, NEVER_RERUN_ON_K + RERUN_ON_K)

    old_k = instance.get_latest_materialization_event(dg.AssetKey("selected_k")).asset_materialization
    new_k = 3 if old_k.metadata["k"].value != 3 else 2
    assert defs.resolve_job_def("demo_pipeline").execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("selected_k")],
        run_config=dg.RunConfig(ops={"selected_k": {"config": {"k": new_k}}}),
    ).success

    unsynced = {key.to_user_string() for key in unsynced_asset_keys(defs, instance)}
    assert unsynced == set(RERUN_ON_K)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    requested = {result.key.to_user_string() for result in tick.results if result.true_subset.size}
    assert requested == set(RERUN_ON_K)
    assert defs.resolve_job_def("demo_pipeline").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey.from_user_string(key) for key in requested]
    ).success

    after = _counts(instance, NEVER_RERUN_ON_K + RERUN_ON_K)
    assert {key: after[key] - before[key] for key in NEVER_RERUN_ON_K} == {key: 0 for key in NEVER_RERUN_ON_K}
    assert {key: after[key] - before[key] for key in RERUN_ON_K} == {key: 1 for key in RERUN_ON_K}
    adapters = instance.get_latest_materialization_event(dg.AssetKey(["moce_adapters", "moce"]))
    assert adapters.asset_materialization.metadata["k"].value == new_k

