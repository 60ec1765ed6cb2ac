"""The k sweep, a branch beside the main graph (group `k_sweep`, on demand: `moce sweep`), one partition per k:

    instruction_embeddings ─▶ k_sweep/kmeans_centroids[k] ─▶ k_sweep/cluster_assignments[k]
    base_model, instructions ─▶ k_sweep/moce_adapters/moce[k] ─▶ k_sweep/merged_model/moce[k] (+ merge check)
        ─▶ k_sweep/benchmark_results/moce[k] (+ item scores, expert use, prompt embeddings) ─▶ k_sweep/comparison

The per-k assets are built by the main graph's own factories (same bodies, same merge check, same metadata and
lineage), under the `k_sweep/` prefix: a sweep reads the main graph's instructions, embeddings and base model
and never writes the main graph's assets or artifacts. Each k is one run (a partition), so several k can run at
once; `k_sweep/comparison` puts whichever k are materialized side by side.
"""

import dagster as dg
import polars as pl

from assets.clustering import (
    CLUSTERING_CODE_VERSION,
    build_assignment_assets,
    centroids_output,
    check_k,
)
from assets.common import Branch, artifact_dir
from assets.evaluation import EVALUATION_CODE_VERSION, build_results_asset
from assets.training import build_training_assets
from moce_model.experiment import Experiment
from resources.refs import CentroidsRef, EmbeddingsRef
from resources.storage import ArtifactStorage

K_SWEEP_GROUP = "k_sweep"
# Dynamic: `moce sweep --ks 2,3` (or "Add partition" in the UI) adds the k it is asked for.
K_PARTITIONS = dg.DynamicPartitionsDefinition(name="k")
SWEEP = Branch(prefix=("k_sweep",), group_name=K_SWEEP_GROUP, partitions_def=K_PARTITIONS,
               automation_condition=None)
SWEEP_VARIANT = "moce"
RESULTS_KEY = dg.AssetKey(SWEEP.key("benchmark_results", SWEEP_VARIANT))
COMPARISON_KEY = dg.AssetKey(SWEEP.key("comparison"))


def partition_k(partition_key: str) -> int:
    """The k of a partition of the sweep ("2" → 2)."""
    if not partition_key.isdigit() or int(partition_key) < 2:
        raise ValueError(f"k sweep partition {partition_key!r}: expected a number of clusters k >= 2, e.g. '4'")
    return int(partition_key)


def build_k_sweep_assets(experiment: Experiment) -> list:
    settings = experiment.clustering

    @dg.asset(
        key=SWEEP.key("kmeans_centroids"),
        partitions_def=K_PARTITIONS,
        group_name=K_SWEEP_GROUP,
        kinds={"faiss", "numpy"},
        code_version=CLUSTERING_CODE_VERSION,
        io_manager_key="json_io_manager",
        description="Spherical k-means centroids at the partition's k on all embeddings (as kmeans_centroids).",
    )
    def sweep_centroids(
        context: dg.AssetExecutionContext, instruction_embeddings: EmbeddingsRef, storage: ArtifactStorage
    ) -> dg.Output[CentroidsRef]:
        from moce_model.clustering.kmeans import read_embeddings

        k = partition_k(context.partition_key)
        ids, vectors = read_embeddings(instruction_embeddings.path)
        check_k(k, len(vectors), f"k sweep partition {context.partition_key!r}")
        return centroids_output(ids, vectors, k, instruction_embeddings.embedder, artifact_dir(storage, context),
                                seed=experiment.seed, iterations=settings.iterations, restarts=settings.restarts)

    @dg.asset(
        key=COMPARISON_KEY,
        ins={"results": dg.AssetIn(
            key=RESULTS_KEY,
            partition_mapping=dg.AllPartitionMapping(),
            # A k added but not (yet, or successfully) materialized is left out of the table, and named.
            metadata={"allow_missing_partitions": True},
        )},
        group_name=K_SWEEP_GROUP,
        kinds={"markdown", "parquet"},
        code_version=EVALUATION_CODE_VERSION,
        io_manager_key="parquet_io_manager",
        description=(
            f"`{SWEEP_VARIANT}` at every materialized k side by side: per benchmark and metric, each k's value with "
            "its 95% interval and n (one column per k)."
        ),
    )
    def comparison(context: dg.AssetExecutionContext, results) -> dg.Output[pl.DataFrame]:
        from moce_model.evaluation.k_comparison import k_comparison

        keys = context.asset_partition_keys_for_input("results")
        # The IO manager hands over a single partition as the table itself and several as {partition key: table}.
        if isinstance(results, pl.DataFrame):
            if len(keys) != 1:
                raise ValueError(f"one table for {len(keys)} partitions of {RESULTS_KEY.to_user_string()}: {keys}")
            results = {keys[0]: results}
        by_k = {partition_k(key): table for key, table in (results or {}).items()}
        if not by_k:
            raise ValueError(f"no k of the sweep is materialized ({len(keys)} added: {sorted(keys)}): run "
                             f"`moce sweep --ks ...` or materialize partitions of {RESULTS_KEY.to_user_string()}")
        table = k_comparison(by_k)
        missing = sorted((key for key in keys if key not in results), key=partition_k)
        return dg.Output(table.table, metadata={
            "ks": dg.MetadataValue.json(sorted(by_k)),
            "missing_ks": dg.MetadataValue.json([partition_k(key) for key in missing]),
            "comparison": dg.MetadataValue.md(table.markdown),
            "rows": table.table.height,
        })

    return [
        sweep_centroids,
        *build_assignment_assets(SWEEP),
        *build_training_assets(experiment, SWEEP, variants=[SWEEP_VARIANT]),
        build_results_asset(experiment, SWEEP_VARIANT, SWEEP),
        comparison,
    ]
