"""The study job on a tiny model: three runs (the base model, one trained layout and its AC-router counterpart at
one seed) on two sources, the evaluation-only conditions of two of them, and the table."""

from __future__ import annotations

import json

import dagster as dg
import polars as pl
import pytest

from assets.common import DATA_VERSION_TAG, INPUT_DATA_VERSION_TAG
from assets.study import check_run_inputs_current
from moce_model.study.config import StudyConfig
from pipelines.definitions import PIPELINE, STUDY, build_definitions
from tests.pipeline_fixtures import dagster_instance, small_experiment
from tests.tiny_models import save_tiny_llama

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
]


def test_study_runs_their_conditions_and_the_table(tmp_path, monkeypatch):
    gsm8k = tmp_path / "gsm8k_test.jsonl"
    gsm8k.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    monkeypatch.setenv("MOCE_GSM8K_PATH", str(gsm8k))
    save_tiny_llama(tmp_path / "tiny_base")
    experiment = small_experiment(
        tmp_path,
        # Two sources, so that the blended condition has a pair of sources to blend.
        sources=[{"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": 12, "seed": 0},
                 {"name": "synthetic_more", "kind": "synthetic", "n_per_domain": 3, "seed": 1}],
        clustering={"k_max": 3},
        training={"overrides": {"save_steps": 2, "lora_r": 2, "lora_alpha": 4, "warmup_steps": 0}},
    )
    study = StudyConfig(seeds=(0,), variants=("moce",), experts_per_group_sweep=(2,), router_top_k=1,
                        adapter_dim=4, train_rows=16, max_steps=2, per_device_batch_size=4, max_length=192,
                        heldout_rows_per_source=3, gsm8k_items=2, gsm8k_max_new_tokens=8, bootstrap_resamples=200,
                        blend_items=2, humaneval_choice_items=2)
    defs = build_definitions(experiment, study)
    graph = defs.resolve_asset_graph()
    assert not (STUDY.resolve(graph) & PIPELINE.resolve(graph)), "the study is not part of the pipeline job"
    with dagster_instance(tmp_path) as instance:
        inputs = dg.AssetSelection.groups("data", "embedding", "clustering") | dg.AssetSelection.assets("base_model")
        assert defs.resolve_job_def("demo_pipeline").execute_in_process(
            instance=instance, asset_selection=list(inputs.resolve(graph))).success
        job = defs.resolve_job_def("study")
        assert job.execute_in_process(instance=instance,
                                      asset_selection=[dg.AssetKey("study_heldout_split")]).success
        partitions = graph.get(dg.AssetKey("study_runs")).partitions_def.get_partition_keys()
        assert list(partitions) == ["base", "moce/e2/s0", "moce+ac/e2/s0"]
        for key in ("base", "moce/e2/s0", "moce+ac/e2/s0"):
            assert job.execute_in_process(instance=instance, partition_key=key,
                                          asset_selection=[dg.AssetKey("study_runs")]).success, key
            run = instance.get_latest_materialization_event(dg.AssetKey("study_runs")).asset_materialization
            if key != "base":
                assert run.metadata["merge_check_max_abs_logit_diff"].value < run.metadata["merge_check_tolerance"].value
        # The conditions of two runs only: the table names the run whose conditions are missing.
        for key in ("base", "moce/e2/s0"):
            assert job.execute_in_process(instance=instance, partition_key=key,
                                          asset_selection=[dg.AssetKey("study_conditions")]).success, key
        conditions = instance.get_latest_materialization_event(dg.AssetKey("study_conditions")).asset_materialization
        assert conditions.partition == "moce/e2/s0"
        assert conditions.metadata["conditions_applied"].value == ["noised", "soft", "adaptive", "blended"]
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("study_table")]).success

        table = instance.get_latest_materialization_event(dg.AssetKey("study_table")).asset_materialization
        assert table.metadata["runs"].value == 3 and table.metadata["missing_runs"].value == []
        assert table.metadata["missing_conditions"].value == ["moce+ac/e2/s0"]
        markdown = table.metadata["table"].value

        # A run trained with other centroids than the current ones is not scored under conditions.
        check_run_inputs_current(instance, "moce/e2/s0", ["base_model", "kmeans_centroids"])
        record = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("study_runs"), asset_partitions=["moce/e2/s0"]), limit=1).records[0]
        assert INPUT_DATA_VERSION_TAG + "kmeans_centroids" in record.asset_materialization.tags
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "kmeans_centroids", tags={DATA_VERSION_TAG: "refit"}))
        with pytest.raises(ValueError, match="another kmeans_centroids"):
            check_run_inputs_current(instance, "moce/e2/s0", ["base_model", "kmeans_centroids"])

    out_dir = experiment.storage_root / "study"
    assert (out_dir / "study_figure.png").read_bytes().startswith(b"\x89PNG")
    aggregated = pl.read_parquet(out_dir / "study_aggregate.parquet")
    benchmarks = set(aggregated["benchmark"])
    assert benchmarks == {"heldout_synthetic_mix", "heldout_synthetic_more", "gsm8k_test", "blended_heldout",
                          "humaneval_choice"}
    loss = aggregated.filter(pl.col("benchmark") == "heldout_synthetic_mix")
    assert set(loss["n_items"]) == {3} and set(loss["n_seeds"]) == {1}
    # The conditions' rows: the base model has no centroids to adapt or to be near the boundary of.
    assert set(aggregated["layout"]) == {"base", "moce/e2", "moce+ac/e2", "base @noised", "moce/e2 @noised",
                                         "moce/e2 @soft", "moce/e2 @adaptive", "base @blended", "moce/e2 @blended"}
    assert set(aggregated.filter(pl.col("layout").str.contains("@") & ~pl.col("layout").str.contains("@blended"))[
        "benchmark"]) == {"heldout_synthetic_mix", "heldout_synthetic_more"}
    blended = aggregated.filter(pl.col("layout").str.contains("@blended"))
    assert set(blended["benchmark"]) == {"blended_heldout"} and set(blended["n_items"]) == {2}
    assert set(blended.filter(pl.col("layout") == "base @blended")["metric"]) == {"heldout_loss",
                                                                                  "heldout_loss_of_parts"}
    assert set(blended.filter(pl.col("layout") == "moce/e2 @blended")["metric"]) == {
        "heldout_loss", "heldout_loss_of_parts", "routed_as_first_part", "routed_as_second_part"}
    differences = pl.read_parquet(out_dir / "study_differences.parquet")
    # The blends are items of their own: compared model with model and blend with parts, never with the clean runs.
    assert set(differences.select("layout", "reference").rows()) == {
        ("moce/e2", "base"), ("moce+ac/e2", "base"), ("moce+ac/e2", "moce/e2"),
        ("base @noised", "base"), ("moce/e2 @noised", "base @noised"), ("moce/e2 @noised", "moce/e2"),
        ("moce/e2 @soft", "moce/e2"), ("moce/e2 @adaptive", "moce/e2"),
        ("moce/e2 @blended", "base @blended"), ("moce/e2 @blended", "moce/e2 @blended"),
        ("base @blended", "base @blended")}
    # The probe outside the training mix: every run scored on the same problems, paired with the base model.
    probe = differences.filter(pl.col("benchmark") == "humaneval_choice")
    assert {("moce/e2", "base", "acc"), ("moce/e2", "base", "acc_norm")} <= set(
        probe.select("layout", "reference", "metric").rows())
    within = differences.filter(pl.col("layout") == pl.col("reference"))
    assert set(within.select("metric", "reference_metric").rows()) == {("heldout_loss", "heldout_loss_of_parts")}
    assert "- `@noised`: 15% of the words" in markdown and "- `@adaptive`: " in markdown
    assert "- `@soft`: " in markdown
    assert "- `@blended`: " in markdown and "moce/e2: routed as the first part" in markdown
    assert "| moce/e2 @noised |" in markdown and "moce+ac/e2 (moce/e2 with the ac router)" in markdown

    # What the conditions scored: the corrupted prompts beside the run's clean ones, the same items, another loss.
    conditions_dir = experiment.storage_root / "artifacts" / "study_conditions" / "moce" / "e2" / "s0"
    assert not (conditions_dir / "merged").exists()  # the rebuilt model is removed after scoring
    noised = pl.read_parquet(conditions_dir / "noised" / "heldout_synthetic_mix.parquet")
    heldout = pl.read_parquet(experiment.storage_root / "artifacts" / "study_heldout_split"
                              / "heldout_synthetic_mix.parquet")
    assert noised["id"].to_list() == heldout["id"].to_list() and noised["response"].equals(heldout["response"])
    assert (noised["replaced_words"] > 0).all() and not noised["instruction"].equals(heldout["instruction"])
    scores = pl.read_parquet(out_dir / "study_item_scores.parquet").filter(
        pl.col("benchmark") == "heldout_synthetic_mix")

    def loss_of(layout):
        return dict(scores.filter(pl.col("layout") == layout).select("item_id", "score").iter_rows())

    clean, noisy, adapted = loss_of("moce/e2"), loss_of("moce/e2 @noised"), loss_of("moce/e2 @adaptive")
    soft = loss_of("moce/e2 @soft")
    assert clean.keys() == noisy.keys() == adapted.keys() == soft.keys() and clean != noisy
    soft_details = pl.read_parquet(conditions_dir / "details_soft.parquet")
    assert soft_details["items"].sum() == 3 + 3
    # Items far from a boundary keep their clean loss; a soft item is scored again with two groups.
    if soft_details["soft_items"].sum() == 0:
        assert soft == clean
    drift = pl.read_parquet(conditions_dir / "details_adaptive.parquet")
    assert drift.height == 3 and drift["heldout_rows"].sum() == 3 + 3
    # Items the adapted centroids route to the same group keep their clean loss.
    if drift["rerouted_items"].sum() == 0:
        assert adapted == clean
    # The blends: item i of one source with item i of the other; their parts' loss is the clean runs' own.
    blends = pl.read_parquet(conditions_dir / "blended" / "blended_heldout.parquet")
    more = pl.read_parquet(experiment.storage_root / "artifacts" / "study_heldout_split"
                           / "heldout_synthetic_more.parquet")
    assert blends["id"].to_list() == [f"{heldout['id'][0]}+{more['id'][0]}", f"{more['id'][1]}+{heldout['id'][1]}"]
    blend_scores = pl.read_parquet(out_dir / "study_item_scores.parquet").filter(
        (pl.col("layout") == "moce/e2 @blended") & (pl.col("metric") == "heldout_loss_of_parts"))
    clean_all = pl.read_parquet(out_dir / "study_item_scores.parquet").filter(
        (pl.col("layout") == "moce/e2") & (pl.col("metric") == "heldout_loss"))
    clean_of = dict(clean_all.select("item_id", "score").iter_rows())
    first = blends.row(0, named=True)
    assert blend_scores.filter(pl.col("item_id") == f"blended_heldout/{first['id']}")["score"].item() == pytest.approx(
        (clean_of[f"{first['first_benchmark']}/{first['first_id']}"]
         + clean_of[f"{first['second_benchmark']}/{first['second_id']}"]) / 2)
    assert pl.read_parquet(conditions_dir / "details_blended.parquet")["items"].sum() == 2
    # Parameter counts in the table: the base model trains nothing, moce/e2 its LoRA + experts + routers.
    assert "| base (the base model, not trained) | 0 | 0 |" in markdown
    record = json.loads((experiment.storage_root / "artifacts" / "study_runs" / "moce" / "e2" / "s0" / "run.json")
                        .read_text())
    assert record["total_trainable"] > record["active_trainable"] > 0
    assert f"| moce/e2 | {record['total_trainable']:,} | {record['active_trainable']:,} | 1 |" in markdown
    # The split holds out 3 rows of each source (the rest is what the runs train on).
    split = pl.read_parquet(experiment.storage_root / "artifacts" / "study_heldout_split" / "split.parquet")
    assert split["heldout"].sum() == 3 + 3


def test_moce_study_adds_the_missing_runs_and_conditions_of_an_existing_study():
    from assets.study import CONDITIONS_KEY, RUNS_KEY
    from pipelines.study import partition_steps

    wanted = ["base", "pesc/s0", "moce+ac/e4/s0"]
    # An existing study: its runs are materialized, no condition yet, and the AC router run is new.
    steps = partition_steps(wanted, {"base", "pesc/s0"}, set(), rerun=False, with_conditions=True)
    assert steps == {"base": [CONDITIONS_KEY], "pesc/s0": [CONDITIONS_KEY],
                     "moce+ac/e4/s0": [RUNS_KEY, CONDITIONS_KEY]}
    assert partition_steps(wanted, set(wanted), set(wanted), rerun=False, with_conditions=True) == {}
    # A run trained again gets its conditions scored again.
    assert partition_steps(["base"], {"base"}, {"base"}, rerun=True, with_conditions=True) == {
        "base": [RUNS_KEY, CONDITIONS_KEY]}
    assert partition_steps(wanted, {"base"}, set(), rerun=False, with_conditions=False) == {
        "pesc/s0": [RUNS_KEY], "moce+ac/e4/s0": [RUNS_KEY]}


def test_runs_scored_before_a_condition_joined_the_study_have_it_still_to_score():
    from assets.study import CONDITIONS_KEY, conditions_to_score

    wanted = ["noised", "soft", "blended"]
    with dg.instance_for_test() as instance:
        def scored(key: str, **metadata) -> None:
            instance.report_runless_asset_event(dg.AssetMaterialization(
                CONDITIONS_KEY, partition=key, metadata={name: dg.MetadataValue.json(value)
                                                         for name, value in metadata.items()}))

        # Before `conditions_considered`: only the conditions that applied were listed (soft does not to pesc).
        scored("pesc/s0", conditions_applied=["noised"])
        scored("moce/e4/s0", conditions_applied=["noised", "soft"])
        scored("pesc/s1", conditions_applied=["noised", "blended"], conditions_considered=wanted)
        missing = conditions_to_score(instance, ["pesc/s0", "moce/e4/s0", "pesc/s1", "base"], wanted)
    assert missing == {"pesc/s0": ["soft", "blended"], "moce/e4/s0": ["blended"], "pesc/s1": [],
                       "base": wanted}
