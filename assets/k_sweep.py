"""k side by side: for each k, cluster, train the `moce` variant, merge, evaluate; one comparison table.

The sweep reuses the pipeline's own steps (the same library calls as kmeans_centroids, moce_adapters,
merged_model and benchmark_results) and writes each k's artifacts under its own directory, so it never
touches the assets of the main graph.
"""

import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import HEAVY_STEP_TAG, md_table
from assets.training import merge_variant, train_variant
from moce_model.experiment import Experiment
from resources.storage import ArtifactStorage
from resources.trainer import TrainerResource


def build_k_sweep_asset(experiment: Experiment) -> dg.AssetsDefinition:
    preset = experiment.training_config()

    class KSweepConfig(dg.Config):
        ks: list[int] = [2, 3, 4, 6]
        max_steps: int | None = preset.max_steps
        limit_per_benchmark: int | None = experiment.evaluation.limit_per_benchmark
        seed: int = experiment.seed

    @dg.asset(
        group_name="evaluation",
        kinds={"faiss", "pytorch", "lm_eval"},
        io_manager_key="parquet_io_manager",
        op_tags=HEAVY_STEP_TAG,
        description="Benchmark results of the `moce` variant trained at each k of `ks`, side by side.",
    )
    def k_sweep_results(
        context: dg.AssetExecutionContext,
        config: KSweepConfig,
        trainer: TrainerResource,
        storage: ArtifactStorage,
        instruction_embeddings: dict,
        instructions: pl.DataFrame,
        base_model: dict,
    ) -> dg.Output[pl.DataFrame]:
        from moce_model.clustering import assign, fit_kmeans, read_embeddings, save_centroids
        from moce_model.evaluation.runner import evaluate_model
        ids, vectors = read_embeddings(instruction_embeddings["path"])
        rows = instructions.select("id", "system", "instruction", "input", "response")
        training_config = preset.with_overrides({"max_steps": config.max_steps, "seed": config.seed})
        tables = []
        for k in sorted(set(config.ks)):
            started = time.perf_counter()
            sweep_dir = storage.path_for(context.asset_key) / f"k{k}"
            centroids = fit_kmeans(vectors, k, seed=config.seed, niter=experiment.clustering.iterations,
                                   nredo=experiment.clustering.restarts)
            labels, _ = assign(vectors, centroids)
            centroids_dir = save_centroids(sweep_dir / "centroids", centroids, instruction_embeddings["embedder"])
            centroids_ref = {"path": str(centroids_dir), "k": k, "embedder": instruction_embeddings["embedder"]}
            adapters_ref, _ = train_variant(
                context,
                trainer,
                experiment,
                "moce",
                base_model_dir=base_model["path"],
                rows=rows,
                num_clusters=k,
                cluster_ids=dict(zip(ids.tolist(), labels.astype(np.int64).tolist())),
                centroids_ref=centroids_ref,
                training_config=training_config,
                run_dir=sweep_dir / "training",
            )
            merged_dir = merge_variant(adapters_ref, base_model["path"], centroids_ref, sweep_dir / "merged")
            result = evaluate_model(
                merged_dir,
                model_variant=f"moce_k{k}",
                benchmarks=experiment.benchmark_specs(),
                limit_per_benchmark=config.limit_per_benchmark,
                seed=config.seed,
                **experiment.evaluation_settings(),
            )
            tables.append(result.table.with_columns(pl.lit(k).alias("k")))
            context.log.info(f"k={k}: done in {time.perf_counter() - started:.0f} s")
        table = pl.concat(tables)
        side_by_side = table.pivot(on="k", index=["benchmark", "metric"], values="value").sort("benchmark", "metric")
        side_by_side = side_by_side.rename({str(k): f"k={k}" for k in config.ks if str(k) in side_by_side.columns})
        return dg.Output(
            table,
            metadata={"ks": dg.MetadataValue.json(sorted(set(config.ks))),
                      "comparison": dg.MetadataValue.md(md_table(side_by_side, max_rows=200))},
        )

    return k_sweep_results
