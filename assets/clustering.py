"""instruction_embeddings → elbow_curve → selected_k → kmeans_centroids → cluster_assignments."""


import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from assets.common import (
    MAIN,
    RERUN_WHEN_UPSTREAM_CHANGES,
    Branch,
    artifact_metadata,
    md_table,
)
from moce_model.experiment import MIN_ROWS_PER_CLUSTER, Experiment
from resources.refs import CentroidsRef, EmbeddingsRef
from resources.storage import ArtifactStorage

CLUSTERING_CODE_VERSION = "1"
TINY_CLUSTER_SHARE = 0.01


def centroids_output(ids, vectors: np.ndarray, k: int, embedder: dict, out_dir: Path, *, seed: int,
                     iterations: int, restarts: int, previous=None) -> dg.Output[CentroidsRef]:
    """Fit spherical k-means centroids at k (or, given the `previous` ClusterState, add the rows it has not
    counted), save them and their cluster state in `out_dir`; the reference and metadata of a centroids asset."""
    from moce_model.clustering.kmeans import (
        ClusterState,
        fit_kmeans,
        save_centroids,
        update_centroids,
    )

    started = time.perf_counter()
    if previous is not None:
        update = update_centroids(previous, ids, vectors)
        state, drift, new_rows = update.state, update.drift, update.new_rows
    else:
        centroids = fit_kmeans(vectors, k, seed=seed, niter=iterations, nredo=restarts)
        state = ClusterState.from_assignment(ids, vectors, centroids)
        drift, new_rows = np.zeros(k), state.counts
    seconds = time.perf_counter() - started
    centroids = state.centroids
    save_centroids(out_dir, centroids, embedder)
    state.save(out_dir)
    mode = "incremental update" if previous is not None else "fit"
    drift_table = pl.DataFrame({"cluster": list(range(k)), "new_rows": new_rows.tolist(),
                                "members": state.counts.tolist(), "drift": drift.tolist()})
    return dg.Output(
        CentroidsRef(path=str(out_dir), k=k, dimension=int(centroids.shape[1]), embedder=embedder, mode=mode,
                     drift=tuple(float(d) for d in drift)),
        metadata={
            **artifact_metadata(out_dir),
            "k": k,
            "dimension": int(centroids.shape[1]),
            "mode": mode,
            "rows_fitted": len(vectors) if previous is None else int(new_rows.sum()),
            "fit_seconds": round(seconds, 3),
            "max_drift": float(drift.max()),
            "drift_by_cluster": dg.MetadataValue.md(md_table(drift_table)),
            "embedder": dg.MetadataValue.json(embedder),
        },
    )


def check_k(k: int, n_rows: int, what: str) -> None:
    if k < 2 or k > n_rows:
        raise ValueError(f"{what}: k={k} must be in [2, {n_rows}] (the number of embedded instructions)")


def build_assignment_assets(branch: Branch = MAIN) -> list:
    """cluster_assignments (from `branch`'s kmeans_centroids) and its check, in `branch`.

    Long: it holds the nested definitions of the asset and its checks."""

    @dg.asset(
        key=branch.key("cluster_assignments"),
        ins={"kmeans_centroids": dg.AssetIn(key=branch.key("kmeans_centroids")),
             "instruction_embeddings": dg.AssetIn(), "instructions": dg.AssetIn()},
        group_name=branch.group("clustering"),
        partitions_def=branch.partitions_def,
        kinds={"faiss", "parquet"},
        code_version=CLUSTERING_CODE_VERSION,
        io_manager_key="parquet_io_manager",
        automation_condition=branch.automation_condition,
        description="Nearest centroid (cosine) of every instruction: `id, cluster, distance`.",
    )
    def cluster_assignments(
        context: dg.AssetExecutionContext,
        kmeans_centroids: CentroidsRef,
        instruction_embeddings: EmbeddingsRef,
        instructions: pl.LazyFrame,
    ) -> dg.Output[pl.DataFrame]:
        from moce_model.clustering.kmeans import (
            assign,
            cluster_purity,
            load_centroids,
            read_embeddings,
        )
        from moce_model.common.plots import cluster_projection_plot, png_markdown

        ids, vectors = read_embeddings(instruction_embeddings.path)
        centroids, _ = load_centroids(kmeans_centroids.path)
        labels, distances = assign(vectors, centroids)
        assignments = pl.DataFrame(
            {"id": list(ids), "cluster": labels.astype(np.int64), "distance": distances.astype(np.float32)}
        )
        described = assignments.join(
            instructions.select("id", "source", "domain", "instruction").collect(),
            on="id",
            how="left",
            maintain_order="left",
        )
        sizes = described.group_by("cluster").len().sort("cluster")
        metadata: dict = {
            "k": kmeans_centroids.k,
            "cluster_sizes": dg.MetadataValue.md(md_table(sizes)),
            "purity_vs_source": float(cluster_purity(labels, described["source"].to_numpy())),
        }
        known_domain = described.filter(pl.col("domain").is_not_null())
        if known_domain.height:
            metadata["purity_vs_domain"] = float(
                cluster_purity(known_domain["cluster"].to_numpy(), known_domain["domain"].to_numpy())
            )
        composition = (
            described.group_by("cluster", "source").len().sort(["cluster", "len"], descending=[False, True])
        )
        metadata["composition_by_source"] = dg.MetadataValue.md(md_table(composition, max_rows=200))
        examples = described.sort("distance").group_by("cluster", maintain_order=True).head(5).select(
            "cluster", "source", "instruction"
        ).sort("cluster", maintain_order=True)
        metadata["examples"] = dg.MetadataValue.md(md_table(examples, max_rows=5 * kmeans_centroids.k))
        # Colour the second panel by domain where the source declares one (the demo mix has a single source).
        truth = described.select(pl.coalesce("domain", "source"))["domain"].to_list()
        png = cluster_projection_plot(vectors, labels, truth, seed=0)
        metadata["projection"] = dg.MetadataValue.md(png_markdown(png, "clusters in 2-D"))
        return dg.Output(assignments, metadata=metadata)

    @dg.asset_check(
        asset=cluster_assignments,
        additional_ins={"instructions": dg.AssetIn(),
                        "kmeans_centroids": dg.AssetIn(key=branch.key("kmeans_centroids"))},
        partitions_def=branch.partitions_def,  # one result per partition, from that partition's inputs
        description="Every instruction has a cluster; warns about a collapsed or tiny cluster with its size.",
    )
    def every_instruction_clustered_and_no_tiny_cluster(
        cluster_assignments: pl.DataFrame, instructions: pl.LazyFrame, kmeans_centroids: CentroidsRef
    ) -> dg.AssetCheckResult:
        expected = instructions.select("id").collect()["id"]
        missing = int((~expected.is_in(cluster_assignments["id"].implode())).sum())
        sizes = dict(cluster_assignments.group_by("cluster").len().iter_rows())
        k = int(kmeans_centroids.k)
        # A cluster of one instruction is tiny however few rows there are: its expert group learns one example.
        threshold = max(MIN_ROWS_PER_CLUSTER, int(TINY_CLUSTER_SHARE * cluster_assignments.height))
        small = {int(c): int(sizes.get(c, 0)) for c in range(k) if sizes.get(c, 0) < threshold}
        if missing:
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"instructions_without_cluster": missing},
            )
        return dg.AssetCheckResult(
            passed=not small,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"tiny or empty clusters (size < {threshold}): {small}" if small else "all clusters populated"
            ),
            metadata={
                "instructions_without_cluster": 0,
                "smallest_cluster": min(sizes.values()),
                "tiny_clusters": dg.MetadataValue.json(small),
            },
        )

    return [cluster_assignments, every_instruction_clustered_and_no_tiny_cluster]


def build_clustering_assets(experiment: Experiment) -> list:
    """The clustering group: elbow_curve, selected_k, kmeans_centroids and its drift check. Long: it holds their nested definitions."""
    settings = experiment.clustering

    class ElbowConfig(dg.Config):
        k_min: int = settings.k_min
        k_max: int = settings.k_max
        sample_rows: int = settings.elbow_sample_rows
        silhouette_sample_rows: int = settings.silhouette_sample_rows
        seed: int = experiment.seed

    class DriftCheckConfig(dg.Config):
        drift_warning: float = 0.05
        """Warn when a centroid moved by more than this cosine distance in one incremental update."""

    class SelectedKConfig(dg.Config):
        k: int | None = settings.k
        """Override the knee of the elbow curve with this k (None: use the knee)."""

    class KMeansConfig(dg.Config):
        iterations: int = settings.iterations
        restarts: int = settings.restarts
        seed: int = experiment.seed
        incremental: bool = False
        """Adaptive clustering: keep the last centroids at this k and add only the new instructions to them
        (mini-batch spherical k-means step) instead of refitting on all rows."""

    @dg.asset(
        group_name="clustering",
        kinds={"faiss", "parquet"},
        code_version=CLUSTERING_CODE_VERSION,
        io_manager_key="parquet_io_manager",
        description="Spherical k-means inertia and silhouette for each k of the range, on a sample.",
    )
    def elbow_curve(
        context: dg.AssetExecutionContext, config: ElbowConfig, instruction_embeddings: EmbeddingsRef
    ) -> dg.Output[pl.DataFrame]:
        from moce_model.clustering.kmeans import elbow_sweep, find_knee, read_embeddings
        from moce_model.common.plots import elbow_plot, png_markdown

        _, vectors = read_embeddings(instruction_embeddings.path)
        # The rows are known only now: a k range they cannot bear fails, or warns, naming the key.
        ks, warnings = experiment.elbow_ks(len(vectors), config.k_min, config.k_max)
        for warning in warnings:
            context.log.warning(warning)
        curve = elbow_sweep(
            vectors,
            ks,
            sample_size=config.sample_rows,
            seed=config.seed,
            silhouette_sample=config.silhouette_sample_rows,
            niter=settings.iterations,
            nredo=settings.restarts,
        )
        knee, reason = find_knee(curve["k"].to_list(), curve["inertia"].to_list(), curve["silhouette"].to_list())
        return dg.Output(
            curve,
            metadata={
                "knee": knee,
                "knee_reason": reason,
                "elbow_table": dg.MetadataValue.md(md_table(curve)),
                "elbow_plot": dg.MetadataValue.md(png_markdown(elbow_plot(curve, knee), "elbow curve")),
                "sample_rows": min(config.sample_rows, len(vectors)),
                "warnings": dg.MetadataValue.json(warnings),
            },
        )

    @dg.asset(
        group_name="clustering",
        kinds={"python"},
        # A k fixed in the experiment file is part of the definition: editing it makes selected_k stale.
        code_version=CLUSTERING_CODE_VERSION + ("" if settings.k is None else f"+k{settings.k}"),
        io_manager_key="json_io_manager",
        description=(
            "The number of clusters k (= expert groups): the knee of the elbow curve, or the `k` config "
            "override. Its data version is k itself, so only a real change of k makes downstream assets stale."
        ),
    )
    def selected_k(
        context: dg.AssetExecutionContext, config: SelectedKConfig, elbow_curve: pl.DataFrame, instruction_embeddings: EmbeddingsRef
    ) -> dg.Output[int]:
        from moce_model.clustering.kmeans import find_knee

        knee, reason = find_knee(
            elbow_curve["k"].to_list(), elbow_curve["inertia"].to_list(), elbow_curve["silhouette"].to_list()
        )
        k = config.k if config.k is not None else knee
        from_file = config.k is not None and config.k == settings.k
        where = f"{experiment.source_file}: clustering.k" if from_file else "selected_k"
        check_k(k, int(instruction_embeddings.rows), where)
        context.log.info(f"selected k={k} ({'override' if config.k is not None else reason})")
        return dg.Output(
            int(k),
            data_version=dg.DataVersion(f"k={k}"),
            metadata={"k": int(k), "knee": int(knee), "source": "override" if config.k is not None else "knee"},
        )

    @dg.asset(
        group_name="clustering",
        kinds={"faiss", "numpy"},
        code_version=CLUSTERING_CODE_VERSION,
        io_manager_key="json_io_manager",
        automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
        description="Spherical k-means centroids at the selected k on all embeddings (centroids.npy + json).",
    )
    def kmeans_centroids(
        context: dg.AssetExecutionContext,
        config: KMeansConfig,
        selected_k: int,
        instruction_embeddings: EmbeddingsRef,
        storage: ArtifactStorage,
    ) -> dg.Output[CentroidsRef]:
        from moce_model.clustering.kmeans import (
            ClusterState,
            load_centroids,
            read_embeddings,
        )

        ids, vectors = read_embeddings(instruction_embeddings.path)
        embedder = instruction_embeddings.embedder
        out_dir = storage.path_for(context.asset_key) / f"k{selected_k}"
        previous = None
        if config.incremental and (out_dir / "cluster_state.npz").is_file():
            _, meta = load_centroids(out_dir)
            if meta["embedder"] == embedder:
                previous = ClusterState.load(out_dir)
            else:
                context.log.warning(f"incremental: the last centroids at k={selected_k} were fit on embeddings of "
                                    f"{meta.get('embedder')}, these are of {embedder}; refitting")
        return centroids_output(ids, vectors, selected_k, embedder, out_dir, seed=config.seed,
                                iterations=config.iterations, restarts=config.restarts, previous=previous)

    @dg.asset_check(
        asset=kmeans_centroids,
        description="Warns when an incremental update moved a centroid by more than `drift_warning` (cosine "
                    "distance): the clusters the experts were trained on have shifted; consider a refit and retraining.",
    )
    def centroid_drift_below_threshold(config: DriftCheckConfig, kmeans_centroids: CentroidsRef) -> dg.AssetCheckResult:
        drift = list(kmeans_centroids.drift)
        drifted = {cluster: round(d, 4) for cluster, d in enumerate(drift) if d > config.drift_warning}
        return dg.AssetCheckResult(
            passed=not drifted,
            severity=dg.AssetCheckSeverity.WARN,
            description=(f"centroids moved more than {config.drift_warning}: {drifted}" if drifted
                         else f"no centroid moved more than {config.drift_warning}"),
            metadata={"max_drift": max(drift, default=0.0), "drifted_clusters": dg.MetadataValue.json(drifted)},
        )

    return [elbow_curve, selected_k, kmeans_centroids, centroid_drift_below_threshold, *build_assignment_assets()]
