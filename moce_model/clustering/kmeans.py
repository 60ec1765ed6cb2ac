"""Spherical k-means over L2-normalised embeddings (faiss), the elbow sweep, and nearest-centroid labels.

Distances are cosine distances ``1 - x·c`` with unit-norm centroids. ``inertia`` is their sum over the rows
(for unit vectors the squared Euclidean distance is exactly twice that, so the elbow is the same).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from moce_model.clustering.embedding import (
    MANIFEST_NAME,
    bad_embedding_rows,
    embedding_value_problem,
)
from moce_model.clustering.router import validate_centroids
from moce_model.common.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
)

CENTROIDS_NPY = "centroids.npy"
CENTROIDS_JSON = "centroids.json"


# Two embeddings closer than this cosine distance are one point: identical texts embedded in different batches
# differ by float rounding only (~1e-7), different texts by far more (~1e-3 for a one-character change).
DISTINCT_TOLERANCE = 1e-5
# Distinct points are first looked for in a sample of this many rows; all rows are searched only if it falls short.
DISTINCT_SAMPLE = 32_768


def _as_unit_float32(X: np.ndarray) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"expected a non-empty (n, d) array of embeddings, got shape {X.shape}")
    not_finite = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(not_finite):
        raise ValueError(
            f"{len(not_finite)} of {X.shape[0]} embedding rows are not finite (NaN or inf), rows "
            f"{not_finite[:10].tolist()}{' ...' if len(not_finite) > 10 else ''}: re-embed them before clustering"
        )
    return X


def count_distinct_points(X: np.ndarray, limit: int, tolerance: float = DISTINCT_TOLERANCE) -> int:
    """How many rows of unit vectors ``X`` lie more than ``tolerance`` (cosine distance) apart, counted up to
    ``limit``.

    Farthest-point traversal: start from row 0, repeatedly take the row farthest from every point taken so far,
    stop when that row is within ``tolerance`` of one of them. ``limit`` passes over ``X`` at most.
    """
    nearest = 1.0 - X @ X[0]
    count = 1
    while count < limit:
        farthest = int(np.argmax(nearest))
        if nearest[farthest] <= tolerance:
            break
        count += 1
        np.minimum(nearest, 1.0 - X @ X[farthest], out=nearest)
    return count


def require_distinct_points(X: np.ndarray, num_clusters: int, what: str, seed: int = 0) -> None:
    """Fail clearly when ``X`` has fewer than ``num_clusters`` distinct points: k-means would split identical
    points on float noise and report clusters (and an elbow) that mean nothing."""
    n = X.shape[0]
    found = 0
    if n > DISTINCT_SAMPLE:
        # A sample's distinct points are distinct in the whole set too: usually the sample alone settles it.
        rows = np.random.default_rng(seed).choice(n, size=DISTINCT_SAMPLE, replace=False)
        found = count_distinct_points(X[rows], num_clusters)
    if found < num_clusters:
        found = count_distinct_points(X, num_clusters)
    if found >= num_clusters:
        return
    if found == 1:
        raise ValueError(
            f"{what}: all {n} embeddings are the same point (the input sides are identical, or differ only in "
            f"what is not embedded): there is nothing to cluster into k={num_clusters} groups"
        )
    raise ValueError(
        f"{what}: only {found} distinct embeddings among {n} rows, fewer than k={num_clusters}: k-means cannot "
        f"make more clusters than there are distinct points (it would split identical points on float noise); "
        f"use k <= "
        f"{found} or more varied instructions"
    )


def _check_num_clusters(num_clusters: int, n_rows: int) -> None:
    if num_clusters < 2:
        raise ValueError(f"k must be >= 2, got k={num_clusters}")
    if num_clusters > n_rows:
        raise ValueError(
            f"k={num_clusters} is larger than the number of rows ({n_rows}); k-means needs at least k rows"
        )


DEFAULT_RESTART_SAMPLE = 32_768


def _faiss_kmeans(
    d: int, num_clusters: int, n: int, seed: int, niter: int, nredo: int, max_points_per_centroid: int | None
):
    import faiss

    return faiss.Kmeans(
        d,
        num_clusters,
        niter=niter,
        nredo=nredo,
        spherical=True,
        seed=seed,
        verbose=False,
        max_points_per_centroid=max_points_per_centroid or (n // num_clusters + 1),
        min_points_per_centroid=1,
        # k-means++ seeding: random seeding often merges two true clusters and splits another.
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    )


def fit_kmeans(
    X: np.ndarray,
    num_clusters: int,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 3,
    max_points_per_centroid: int | None = None,
    restart_sample: int | None = DEFAULT_RESTART_SAMPLE,
) -> np.ndarray:
    """Spherical k-means centroids ``(k, d)`` float32, unit norm, best of ``nredo`` restarts.

    With more than ``restart_sample`` rows, the restarts run on a random sample of that size (enough to
    tell a good initialisation from a bad one: at k = 16 that is 2,048 rows per centroid), and the best
    of them seeds ``niter`` further iterations on every row. That keeps the restarts and the full-data
    fit while costing about one full fit instead of ``nredo``. ``restart_sample=None`` runs every restart
    on every row. ``max_points_per_centroid=None`` trains on every row; faiss' own default (256) would
    silently subsample to 256·k rows, a different fit from the one asked for on the full data.
    """
    X = _as_unit_float32(X)
    n, d = X.shape
    _check_num_clusters(num_clusters, n)
    require_distinct_points(X, num_clusters, f"k-means with k={num_clusters}", seed=seed)
    init = None
    if nredo > 1 and restart_sample is not None and n > restart_sample >= num_clusters:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=restart_sample, replace=False))
        restarts = _faiss_kmeans(d, num_clusters, restart_sample, seed, niter, nredo, None)
        restarts.train(X[rows])
        init = np.ascontiguousarray(restarts.centroids, dtype=np.float32)
        nredo = 1
    kmeans = _faiss_kmeans(d, num_clusters, n, seed, niter, nredo, max_points_per_centroid)
    kmeans.train(X, init_centroids=init)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids / np.maximum(norms, 1e-12)


def assign(X: np.ndarray, centroids: np.ndarray, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine: ``labels`` int64 and ``distance = 1 - x·c`` float32, in batches."""
    import faiss

    X = _as_unit_float32(X)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != X.shape[1]:
        raise ValueError(f"centroids of shape {centroids.shape} do not match embeddings of dimension {X.shape[1]}")
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    labels = np.empty(X.shape[0], dtype=np.int64)
    distances = np.empty(X.shape[0], dtype=np.float32)
    for start in range(0, X.shape[0], batch):
        similarity, nearest = index.search(X[start:start + batch], 1)
        labels[start:start + batch] = nearest[:, 0]
        # 1 - x.c of unit vectors is >= 0; float rounding can make it -1e-7.
        distances[start:start + batch] = np.maximum(1.0 - similarity[:, 0], 0.0)
    return labels, distances


def silhouette_from_distances(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette for a precomputed distance matrix (same definition as scikit-learn's).

    Computing the distance matrix once lets the elbow sweep score every k on the same sample cheaply.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    clusters, inverse = np.unique(labels, return_inverse=True)
    if not 2 <= len(clusters) <= n - 1:
        return float("nan")
    onehot = np.zeros((n, len(clusters)), dtype=np.float64)
    onehot[np.arange(n), inverse] = 1.0
    sizes = onehot.sum(axis=0)
    sums = distances.astype(np.float64) @ onehot  # (n, clusters): total distance to each cluster
    own_size = sizes[inverse]
    own_sum = sums[np.arange(n), inverse]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = own_sum / (own_size - 1)
        means = sums / sizes
    means[np.arange(n), inverse] = np.inf
    b = means.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (b - a) / np.maximum(a, b)
    s = np.where(own_size > 1, s, 0.0)  # singletons score 0, as in scikit-learn
    return float(np.nan_to_num(s).mean())


def elbow_sweep(
    X: np.ndarray,
    ks: Sequence[int],
    sample_size: int = 100_000,
    seed: int = 0,
    silhouette_sample: int = 5_000,
    niter: int = 25,
    nredo: int = 3,
) -> pl.DataFrame:
    """``k, inertia, silhouette, seconds`` for each k, fitted on a random sample of ``sample_size`` rows.

    Inertia is the sum of cosine distances of the sample to its nearest centroid; silhouette (cosine) is
    computed on a sub-sample of ``silhouette_sample`` rows of that sample; ``seconds`` is the fit time.
    """
    X = _as_unit_float32(X)
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("elbow_sweep: empty k range")
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    sample = X if n <= sample_size else X[np.sort(rng.choice(n, size=sample_size, replace=False))]
    _check_num_clusters(ks[-1], sample.shape[0])
    _check_num_clusters(ks[0], sample.shape[0])
    require_distinct_points(sample, ks[-1], f"elbow sweep over k={ks[0]}..{ks[-1]}", seed=seed)
    n_sil = min(silhouette_sample, sample.shape[0])
    sil_rows = np.sort(rng.choice(sample.shape[0], size=n_sil, replace=False)) if n_sil >= 3 else None
    sil_distances = None
    if sil_rows is not None:
        sil_vectors = sample[sil_rows]
        sil_distances = np.clip(1.0 - sil_vectors @ sil_vectors.T, 0.0, 2.0)
        np.fill_diagonal(sil_distances, 0.0)
    rows = []
    for k in ks:
        started = time.perf_counter()
        centroids = fit_kmeans(sample, k, seed=seed, niter=niter, nredo=nredo)
        seconds = time.perf_counter() - started
        labels, distances = assign(sample, centroids)
        silhouette = (
            silhouette_from_distances(sil_distances, labels[sil_rows]) if sil_distances is not None else float("nan")
        )
        rows.append({"k": k, "inertia": float(distances.astype(np.float64).sum()),
                     "silhouette": silhouette, "seconds": seconds})
    return pl.DataFrame(rows, schema={"k": pl.Int64, "inertia": pl.Float64, "silhouette": pl.Float64, "seconds": pl.Float64})


def find_knee(
    ks: Sequence[int],
    inertias: Sequence[float],
    silhouettes: Sequence[float] | None = None,
) -> tuple[int, str]:
    """The elbow of a decreasing, convex inertia curve (kneed), and how it was chosen.

    When kneed finds no knee, falls back to the k with the best silhouette (if given), else to the k where
    the inertia curve bends most (largest second difference); the returned reason says which.
    """
    ks = [int(k) for k in ks]
    inertias = [float(v) for v in inertias]
    if len(ks) != len(inertias) or not ks:
        raise ValueError(f"find_knee: {len(ks)} ks but {len(inertias)} inertias")
    if len(ks) == 1:
        return ks[0], "only one k in the range"
    if len(ks) >= 3:
        from kneed import KneeLocator

        knee = KneeLocator(ks, inertias, curve="convex", direction="decreasing", S=1.0).knee
        if knee is not None:
            return int(knee), "knee of the inertia curve (kneed, convex, decreasing)"
    if silhouettes is not None and len(silhouettes) == len(ks) and np.isfinite(np.asarray(silhouettes, float)).any():
        best = int(np.nanargmax(np.asarray(silhouettes, dtype=float)))
        return ks[best], "kneed found no knee; chose the k with the highest silhouette"
    if len(ks) >= 3:
        second = np.diff(np.asarray(inertias), n=2)
        return ks[int(np.argmax(second)) + 1], "kneed found no knee; chose the k where the inertia curve bends most"
    return ks[0], "kneed needs at least 3 points; chose the smallest k"


def cluster_purity(labels: Sequence[Any] | np.ndarray, truth: Sequence[Any] | np.ndarray) -> float:
    """Share of rows whose cluster's majority label equals their own label."""
    truth_series = truth if isinstance(truth, pl.Series) else pl.Series(np.asarray(truth), strict=False)
    frame = pl.DataFrame({"cluster": pl.Series(np.asarray(labels)), "truth": truth_series.cast(pl.String)})
    if frame.height == 0:
        raise ValueError("cluster_purity: no rows")
    majority = frame.group_by("cluster", "truth").len().group_by("cluster").agg(pl.col("len").max())
    return float(majority["len"].sum() / frame.height)


# ----------------------------------------------------------------------------------------------- artifacts


def save_centroids(
    path_dir: str | os.PathLike[str],
    centroids: np.ndarray,
    embedder_spec: Mapping[str, Any] | None,
) -> Path:
    """Write ``centroids.npy`` (float32) and ``centroids.json`` (embedder, dimension, k) as one directory."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2:
        raise ValueError(f"centroids must be (k, d), got shape {centroids.shape}")

    meta = {
        "k": int(centroids.shape[0]),
        "dimension": int(centroids.shape[1]),
        "embedder": dict(embedder_spec) if embedder_spec is not None else None,
        "embedder_name": (embedder_spec or {}).get("model"),
        "metric": "cosine",
    }
    target = Path(path_dir)
    with atomic_dir(target) as tmp:
        np.save(tmp / CENTROIDS_NPY, centroids, allow_pickle=False)
        atomic_write_json(meta, tmp / CENTROIDS_JSON)
    return target


def load_centroids(path_dir: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    directory = Path(path_dir)
    npy, meta_path = directory / CENTROIDS_NPY, directory / CENTROIDS_JSON
    for required in (npy, meta_path):
        if not required.is_file():
            raise FileNotFoundError(f"centroids directory {directory} lacks {required.name}")

    try:
        raw = np.load(npy, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"{npy}: unreadable ({type(error).__name__}: {error}); re-materialize kmeans_centroids"
        ) from error
    try:
        meta = read_json(meta_path)
        k, dimension = int(meta["k"]), int(meta["dimension"])
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise ValueError(
            f"{meta_path}: unreadable or incomplete ({type(error).__name__}: {error}); re-materialize kmeans_centroids"
        ) from error
    centroids = validate_centroids(raw, source=str(npy))
    if centroids.shape != (k, dimension):
        raise ValueError(f"{npy}: shape {centroids.shape} disagrees with {meta_path.name} (k={k}, d={dimension})")
    return centroids, meta


def read_embeddings(path_dir: str | os.PathLike[str], check_values: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, X)`` from the shards of ``embed_to_parquet_shards``: ids as a str array, X as (n, d) float32.

    X is a read-only view of the Arrow buffer where the data is in one chunk (no copy); copy it before
    modifying it in place. With ``check_values`` every row must be finite and unit norm; the error names the
    rows' ids and shard files (re-running the embedding asset embeds damaged shards again).
    """
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    directory = Path(path_dir)
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if not manifest.get("complete", False):
            raise ValueError(f"{directory}: embedding run is not complete (manifest says so); re-run the embedding")
    files = sorted(str(p) for p in directory.glob("shard-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory}: no shard-*.parquet files")
    try:
        table = ds.dataset(files, format="parquet").to_table(columns=["id", "embedding"])
    except (pa.ArrowException, OSError) as error:
        raise ValueError(
            f"{directory}: a shard is unreadable ({type(error).__name__}: {error}); re-run the embedding, which "
            f"embeds damaged shards again"
        ) from error
    embedding = table.column("embedding")
    if not pa.types.is_fixed_size_list(embedding.type):
        raise ValueError(f"{directory}: 'embedding' has type {embedding.type}, expected a fixed-size list of float32")
    dimension = embedding.type.list_size
    chunk = embedding.combine_chunks() if embedding.num_chunks != 1 else embedding.chunk(0)
    values = chunk.values
    if chunk.offset or len(values) != len(chunk) * dimension:
        values = values.slice(chunk.offset * dimension, len(chunk) * dimension)
    X = values.to_numpy(zero_copy_only=True).reshape(len(chunk), dimension)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    if check_values:
        problem = embedding_value_problem(X, ids)
        if problem is not None:
            not_finite, off_norm = bad_embedding_rows(X)
            bad = not_finite | off_norm
            ends = np.cumsum([pq.ParquetFile(f).metadata.num_rows for f in files])
            shards = sorted({Path(files[int(np.searchsorted(ends, row, side="right"))]).name
                             for row in np.flatnonzero(bad)})
            raise ValueError(
                f"{directory}: {problem} (in {', '.join(shards)}); re-run the embedding, which embeds damaged "
                f"shards again"
            )
    return ids, X


# ------------------------------------------------------------------------------------------ adaptive clustering

CLUSTER_STATE_NPZ = "cluster_state.npz"


@dataclass(frozen=True)
class ClusterState:
    """What an incremental update needs besides the centroids: every cluster's sum of member vectors and count,
    and the ids already counted. The centroid of a cluster is its normalised sum, so updating with new rows gives
    exactly the spherical mean over old and new members, as a refit's last assignment step would."""

    sums: np.ndarray  # (k, d) float64
    counts: np.ndarray  # (k,) int64
    ids: np.ndarray  # (n,) str: rows already in the sums

    @property
    def centroids(self) -> np.ndarray:
        norms = np.linalg.norm(self.sums, axis=1, keepdims=True)
        return (self.sums / np.maximum(norms, 1e-12)).astype(np.float32)

    @classmethod
    def from_assignment(cls, ids: Sequence[str], X: np.ndarray, centroids: np.ndarray) -> ClusterState:
        labels, _ = assign(X, centroids)
        X = _as_unit_float32(X).astype(np.float64)
        k = centroids.shape[0]
        sums = np.zeros((k, X.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, X)
        return cls(sums, np.bincount(labels, minlength=k).astype(np.int64), np.asarray(list(ids), dtype=str))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, sums=self.sums, counts=self.counts, ids=self.ids)
        path = Path(directory) / CLUSTER_STATE_NPZ
        atomic_write_bytes(buffer.getvalue(), path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ClusterState:
        path = Path(directory) / CLUSTER_STATE_NPZ
        try:
            with np.load(path, allow_pickle=False) as data:
                state = cls(data["sums"], data["counts"], data["ids"])
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: unreadable cluster state ({type(error).__name__}: {error})") from error
        if state.sums.ndim != 2 or state.counts.shape != (state.sums.shape[0],) or int(state.counts.sum()) != len(state.ids):
            raise ValueError(f"{path}: sums {state.sums.shape}, counts {state.counts.shape} and {len(state.ids)} ids "
                             "do not fit together")
        return state


@dataclass(frozen=True)
class CentroidUpdate:
    state: ClusterState
    drift: np.ndarray  # (k,) cosine distance between each centroid before and after
    new_rows: np.ndarray  # (k,) new rows assigned to each cluster
    dropped_ids: int  # ids of the state that are no longer in the data (they stay counted)


def update_centroids(state: ClusterState, ids: Sequence[str], X: np.ndarray) -> CentroidUpdate:
    """Mini-batch spherical k-means step for the rows of (`ids`, `X`) the state has not counted: each is assigned
    to its nearest current centroid and added to that cluster's sum (Sculley 2010's per-centre learning rate
    1/count, applied to the batch at once). Rows counted before are not moved between clusters; a refit does
    that. Written here rather than with scikit-learn's MiniBatchKMeans because its running counts live in a
    private attribute that cannot be saved without pickle."""
    ids = np.asarray(list(ids), dtype=str)
    if len(ids) != X.shape[0]:
        raise ValueError(f"{len(ids)} ids for {X.shape[0]} embeddings")
    if X.shape[1] != state.sums.shape[1]:
        raise ValueError(f"embeddings of dimension {X.shape[1]} do not match the clustering's {state.sums.shape[1]}")
    seen = np.isin(ids, state.ids)
    before = state.centroids
    k = before.shape[0]
    new_rows = np.zeros(k, dtype=np.int64)
    sums, counts = state.sums.copy(), state.counts.copy()
    if (~seen).any():
        fresh = _as_unit_float32(X[~seen])
        labels, _ = assign(fresh, before)
        np.add.at(sums, labels, fresh.astype(np.float64))
        new_rows = np.bincount(labels, minlength=k).astype(np.int64)
        counts += new_rows
    updated = ClusterState(sums, counts, np.concatenate([state.ids, ids[~seen]]))
    drift = np.maximum(1.0 - np.einsum("kd,kd->k", before, updated.centroids), 0.0)
    return CentroidUpdate(updated, drift, new_rows, int((~np.isin(state.ids, ids)).sum()))
