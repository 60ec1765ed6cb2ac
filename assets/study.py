"""The study (on demand, job `study`): study_heldout_split → study_runs/<layout>/s<seed> (one partition per
run) → study_conditions/<layout>/s<seed> (the same partitions) → study_table.

Each partition trains one layout at one seed, merges it (and checks the merged model against the unmerged one),
and evaluates it on the held-out split, with the same library calls as moce_adapters, merged_model and
benchmark_results. `study_conditions` scores the trained run again under each evaluation-only condition
(`moce_model.study.conditions`) from the adapters it kept, never retraining it. The table aggregates whichever
runs and conditions are materialized over seeds and items.
"""


import json
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import polars as pl

from assets.common import (
    DATA_VERSION_TAG,
    INPUT_DATA_VERSION_TAG,
    artifact_metadata,
    md_table,
)
from assets.steps import train_variant
from moce_model.experiment import Experiment
from moce_model.study.config import StudyConfig, parse_run_key, run_keys, study_layouts
from moce_model.study.run import (
    StudyRunInputs,
    TrainedAdapters,
    TrainRequest,
    rescore_run_conditions,
    run_study_layout,
)
from resources.refs import BaseModelRef, CentroidsRef, EmbeddingsRef, HeldoutSplitRef
from resources.storage import ArtifactStorage
from resources.trainer import TrainerResource

STUDY_CODE_VERSION = "2"
STUDY_GROUP = "study"
RUNS_KEY = dg.AssetKey("study_runs")
CONDITIONS_KEY = dg.AssetKey("study_conditions")


def partition_dir(storage: ArtifactStorage, key: dg.AssetKey, partition: str) -> Path:
    return storage.path_for([*key.path, *partition.split("/")])


def check_run_inputs_current(instance: dg.DagsterInstance, partition: str, names: list[str]) -> None:
    """Fails when the study_runs partition was materialized with other versions of `names` than the current ones:
    its adapters would then be merged with (or routed by) another base model or clustering than they were trained
    with."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=RUNS_KEY, asset_partitions=[partition]), limit=1).records
    if not records:
        raise ValueError(f"study_runs {partition} is not materialized: materialize it before its conditions")
    used = records[0].asset_materialization.tags or {}
    for name in names:
        latest = instance.get_latest_materialization_event(dg.AssetKey(name))
        current = (latest.asset_materialization.tags or {}).get(DATA_VERSION_TAG) if latest else None
        recorded = used.get(INPUT_DATA_VERSION_TAG + name)
        if recorded is not None and current is not None and recorded != current:
            raise ValueError(f"study_runs {partition} was trained with another {name} (data version {recorded}) than "
                             f"the current one ({current}): materialize study_runs {partition} again first")


def conditions_to_score(instance: dg.DagsterInstance, keys: Sequence[str], wanted: Sequence[str]
                        ) -> dict[str, list[str]]:
    """Run key -> the conditions of `wanted` that its latest study_conditions materialization did not consider (all
    of them where there is none). A run scored before a condition joined the study has that condition still to
    score: its partition is materialized but not complete."""
    missing = {}
    for key in keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=CONDITIONS_KEY, asset_partitions=[key]), limit=1).records
        if not records:
            missing[key] = list(wanted)
            continue
        metadata = records[0].asset_materialization.metadata
        # Materializations before `conditions_considered` existed list only the conditions that applied.
        considered = metadata.get("conditions_considered") or metadata.get("conditions_applied")
        considered_names = set(considered.value) if considered is not None else set()
        missing[key] = [name for name in wanted if name not in considered_names]
    return missing


def build_study_assets(experiment: Experiment, config: StudyConfig) -> list[dg.AssetsDefinition]:
    """The study group: study_heldout_split, study_runs, study_conditions, study_table. Long: it holds the four nested definitions, each a library call plus metadata."""
    preset = experiment.training_config()
    partitions = dg.StaticPartitionsDefinition(run_keys(config))

    @dg.asset(
        group_name=STUDY_GROUP,
        kinds={"parquet"},
        code_version=STUDY_CODE_VERSION,
        io_manager_key="json_io_manager",
        description=(
            f"A deterministic held-out split of each source ({config.heldout_rows_per_source} rows per source, "
            "chosen by content id, the same for every seed): the study trains on the rest and scores these."
        ),
    )
    def study_heldout_split(
        context: dg.AssetExecutionContext, storage: ArtifactStorage, instructions: pl.DataFrame
    ) -> dg.Output[HeldoutSplitRef]:
        from moce_model.common.io import atomic_write_parquet
        from moce_model.study.config import heldout_split

        split = heldout_split(instructions, config.heldout_rows_per_source)
        out_dir = storage.path_for(context.asset_key)
        atomic_write_parquet(split.select("id", "source", "heldout"), out_dir / "split.parquet")
        files = {}
        for source in sorted(split["source"].unique().to_list()):
            rows = split.filter(pl.col("heldout") & (pl.col("source") == source)).sort("id")
            files[source] = str(out_dir / f"heldout_{source}.parquet")
            atomic_write_parquet(rows.select("id", "source", "system", "instruction", "input", "response"),
                                 Path(files[source]))
        counts = split.group_by("source", "heldout").len().sort("source", "heldout")
        return dg.Output(
            HeldoutSplitRef(path=str(out_dir), heldout_files=files),
            metadata={**artifact_metadata(out_dir), "rows_per_source": dg.MetadataValue.md(md_table(counts)),
                      "heldout_rows": int(split["heldout"].sum()), "training_rows": int((~split["heldout"]).sum())},
        )

    @dg.asset(
        partitions_def=partitions,
        group_name=STUDY_GROUP,
        kinds={"pytorch", "safetensors", "parquet"},
        code_version=STUDY_CODE_VERSION,
        pool="training",
        ins={
            "base_model": dg.AssetIn(),
            "instructions": dg.AssetIn(),
            "study_heldout_split": dg.AssetIn(),
            "kmeans_centroids": dg.AssetIn(),
            "cluster_assignments": dg.AssetIn(),
        },
        description=(
            "One run of the study: train the partition's layout at its seed on the training split, merge it "
            "(merged logits checked against the unmerged model), evaluate it on the held-out split of every "
            "source, the GSM8K test sample and the HumanEval multiple-choice probe; writes every item's score and the trainable parameter counts."
        ),
    )
    def study_runs(
        context: dg.AssetExecutionContext,
        trainer: TrainerResource,
        storage: ArtifactStorage,
        base_model: BaseModelRef,
        instructions: pl.DataFrame,
        study_heldout_split: HeldoutSplitRef,
        kmeans_centroids: CentroidsRef,
        cluster_assignments: pl.DataFrame,
    ) -> dg.MaterializeResult:
        experiment.check_devices()  # before training: the run evaluates on evaluation.device at its end
        _, seed = parse_run_key(config, context.partition_key)
        heldout_ids = pl.read_parquet(Path(study_heldout_split.path) / "split.parquet").filter("heldout")["id"]

        def train(request: TrainRequest) -> TrainedAdapters:
            centroids_ref = kmeans_centroids if request.centroids_path else None
            ref, facts = train_variant(
                context, trainer, experiment, request.variant, base_model_dir=base_model.path,
                rows=request.rows, num_clusters=request.num_clusters, cluster_ids=request.cluster_ids,
                centroids_ref=centroids_ref, training_config=request.training_config, run_dir=request.run_dir,
                moce_config=request.moce_config,
            )
            return TrainedAdapters(Path(ref.path), facts)

        result = run_study_layout(StudyRunInputs(
            config=config, run_key=context.partition_key, base_model_dir=Path(base_model.path),
            instructions=instructions, heldout_ids=heldout_ids, heldout_files=study_heldout_split.heldout_files,
            k=int(kmeans_centroids.k), centroids_path=kmeans_centroids.path,
            embedder=kmeans_centroids.embedder,
            cluster_ids=dict(cluster_assignments.select("id", "cluster").iter_rows()),
            training_config=preset.with_overrides(config.training_overrides(seed if seed is not None else 0)),
            evaluation_settings=experiment.evaluation_settings(),
            run_dir=partition_dir(storage, RUNS_KEY, context.partition_key),
        ), train)
        if result.gsm8k_missing:
            context.log.warning("no GSM8K test file found (MOCE_GSM8K_PATH / MOCE_REALMIX_DIR): GSM8K left out")
        return dg.MaterializeResult(metadata={
            **{name: value for name, value in result.facts.items() if value is not None},
            **artifact_metadata(partition_dir(storage, RUNS_KEY, context.partition_key)),
            "scores": dg.MetadataValue.md(md_table(result.scores_table)),
        })

    @dg.asset(
        partitions_def=partitions,
        group_name=STUDY_GROUP,
        kinds={"pytorch", "parquet"},
        code_version=STUDY_CODE_VERSION,
        pool="training",
        deps=[study_runs],
        metadata={"conditions": list(config.conditions)},  # read by `moce study` to find runs with some to score
        ins={
            "base_model": dg.AssetIn(),
            "study_heldout_split": dg.AssetIn(),
            "kmeans_centroids": dg.AssetIn(),
            "instruction_embeddings": dg.AssetIn(),
        },
        description=(
            "The partition's trained run scored again on its held-out items under each evaluation-only condition "
            f"({', '.join(config.conditions) or 'none configured'}; moce_model.study.conditions): the model is "
            "rebuilt from the adapters the run kept (merged again, never retrained); writes every item's score "
            "under the rows `layout @condition`."
        ),
    )
    def study_conditions(
        context: dg.AssetExecutionContext,
        storage: ArtifactStorage,
        base_model: BaseModelRef,
        study_heldout_split: HeldoutSplitRef,
        kmeans_centroids: CentroidsRef,
        instruction_embeddings: EmbeddingsRef,
    ) -> dg.MaterializeResult:
        experiment.check_devices()
        key = context.partition_key
        check_run_inputs_current(context.instance, key, ["base_model", "kmeans_centroids"])
        out_dir = partition_dir(storage, CONDITIONS_KEY, key)
        result = rescore_run_conditions(
            config, key, partition_dir(storage, RUNS_KEY, key), out_dir, base_model_dir=Path(base_model.path),
            heldout_files=study_heldout_split.heldout_files, centroids_path=kmeans_centroids.path,
            embedder=kmeans_centroids.embedder, embeddings_path=instruction_embeddings.path,
            evaluation_settings=experiment.evaluation_settings(),
        )
        return dg.MaterializeResult(metadata={
            **artifact_metadata(out_dir),
            "layout": result.record["layout"], "seed": result.record["seed"],
            "conditions_applied": dg.MetadataValue.json(result.record["conditions"]),
            "conditions_considered": dg.MetadataValue.json(list(config.conditions)),
            **result.timings,
            "scores": dg.MetadataValue.md(md_table(result.means)),
            **{f"details_{name}": dg.MetadataValue.md(md_table(details)) for name, details in result.details.items()},
        })

    @dg.asset(
        deps=[study_runs, study_conditions],
        group_name=STUDY_GROUP,
        kinds={"markdown", "matplotlib", "parquet"},
        code_version=STUDY_CODE_VERSION,
        description=(
            "Every layout's mean over seeds and items with a two-level bootstrap interval (seeds, then items), "
            "and the same for each layout under the evaluation-only conditions (rows `layout @condition`); paired "
            "differences against pesc and base, of each token router against its linear counterpart, of "
            "random_group against moce (hash vs cluster) and of each condition against the clean runs; total and active trainable parameters; one figure. Aggregates the "
            "runs and conditions that are materialized and names those that are not."
        ),
    )
    def study_table(context: dg.AssetExecutionContext, storage: ArtifactStorage) -> dg.MaterializeResult:
        from moce_model.common.io import (
            atomic_write_bytes,
            atomic_write_parquet,
            atomic_write_text,
        )
        from moce_model.common.plots import png_markdown
        from moce_model.study.conditions import study_condition
        from moce_model.study.config import counterparts
        from moce_model.study.table import build_study_table

        done = context.instance.get_materialized_partitions(RUNS_KEY)
        keys = run_keys(config)
        present = [key for key in keys if key in done]
        missing = [key for key in keys if key not in done]
        if not present:
            raise ValueError("no run of the study is materialized: materialize study_runs partitions first")
        run_dirs = [partition_dir(storage, RUNS_KEY, key) for key in present]
        conditions_done = context.instance.get_materialized_partitions(CONDITIONS_KEY)
        with_conditions = [key for key in present if key in conditions_done]
        still_to_score = conditions_to_score(context.instance, present, config.conditions)
        missing_conditions = [key if key not in conditions_done else f"{key} ({', '.join(still_to_score[key])})"
                              for key in present if still_to_score[key]]
        condition_dirs = [partition_dir(storage, CONDITIONS_KEY, key) for key in with_conditions]
        scores = pl.concat([pl.read_parquet(d / "item_scores.parquet") for d in run_dirs]
                           + [pl.read_parquet(d / "condition_scores.parquet") for d in condition_dirs])
        details: dict[str, list[pl.DataFrame]] = {}
        for key, directory in zip(with_conditions, condition_dirs):
            for path in sorted(directory.glob("details_*.parquet")):
                details.setdefault(path.stem.removeprefix("details_"), []).append(
                    pl.read_parquet(path).with_columns(pl.lit(key).alias("run")))
        condition_notes = {}
        for name in config.conditions:
            condition = study_condition(name)
            note = condition.describe(config)
            if condition.summarize is not None and name in details:
                note += f". On the runs: {condition.summarize(pl.concat(details[name]))}"
            condition_notes[name] = note
        records = {}
        for directory in run_dirs:
            record = json.loads((directory / "run.json").read_text())
            records.setdefault(record["layout"], record)
        order = [layout.name for layout in study_layouts(config) if layout.name in records]
        parameters = pl.DataFrame([records[name] for name in order]).select(
            "layout", "groups", "experts_per_group", "router_top_k", "total_trainable", "active_trainable", "note")
        own_items = [name for name in config.conditions if study_condition(name).own_items]
        table = build_study_table(scores, parameters, config.bootstrap_resamples, missing,
                                  counterparts=counterparts(config), condition_notes=condition_notes,
                                  missing_conditions=missing_conditions, own_items=own_items)
        out_dir = experiment.storage_root / "study"
        atomic_write_text(table.markdown, out_dir / "study_table.md")
        atomic_write_bytes(table.figure_png, out_dir / "study_figure.png")
        atomic_write_parquet(table.aggregate, out_dir / "study_aggregate.parquet")
        atomic_write_parquet(table.differences, out_dir / "study_differences.parquet")
        atomic_write_parquet(scores, out_dir / "study_item_scores.parquet")
        runs = pl.DataFrame([json.loads((d / "run.json").read_text()) for d in run_dirs])
        seconds = runs.select([c for c in ("layout", "seed", "train_seconds", "merge_seconds", "evaluation_seconds",
                                         "cpu_seconds")
                               if c in runs.columns])
        # Records differ in their keys (merge_seconds only where a model was rebuilt, one per condition applied).
        condition_records = [json.loads((d / "conditions.json").read_text()) for d in condition_dirs]
        condition_seconds = (pl.from_dicts(condition_records, infer_schema_length=None).drop("conditions")
                             if condition_records else pl.DataFrame())
        return dg.MaterializeResult(metadata={
            **artifact_metadata(out_dir / "study_table.md"),
            "table": dg.MetadataValue.md(table.markdown),
            "figure": dg.MetadataValue.md(png_markdown(table.figure_png, "study")),
            "figure_path": dg.MetadataValue.path(str(out_dir / "study_figure.png")),
            "runs": len(present),
            "missing_runs": dg.MetadataValue.json(missing),
            "runs_with_conditions": len(with_conditions),
            "missing_conditions": dg.MetadataValue.json(missing_conditions),
            "significant_differences": int(table.differences["significant"].sum()),
            "run_seconds": dg.MetadataValue.md(md_table(seconds, max_rows=100)),
            "condition_seconds": dg.MetadataValue.md(md_table(condition_seconds, max_rows=100)),
        })

    return [study_heldout_split, study_runs, study_conditions, study_table]
