"""Clustering speed: elbow sweep + final spherical k-means fit (faiss) against scikit-learn's KMeans.

    python -m bench.clustering                 # 1M x 768, k = 2..16 on a 100k sample
    python -m bench.clustering --rows 200000 --dim 384

The data are unit vectors around ``--true-k`` random centres plus noise (float32). The comparison fit is
like for like: same rows (all of them), same k, 25 iterations (scikit-learn with ``tol=0`` so that it does
not stop earlier than faiss, which has no early stop), one k-means++ initialisation on each side
(faiss ``nredo=1`` vs ``KMeans(n_init=1)``). The pipeline's own fit (``nredo=3``) is timed as well.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from moce_model.clustering.kmeans import (
    assign,
    cluster_purity,
    elbow_sweep,
    find_knee,
    fit_kmeans,
)


def peak_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def clustered_unit_vectors(rows: int, dim: int, true_k: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((true_k, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, true_k, size=rows)
    X = np.empty((rows, dim), dtype=np.float32)
    chunk = 65_536
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        # Uniform noise with unit variance per coordinate: about twice as cheap as Gaussian noise to draw,
        # and k-means cost does not depend on the noise distribution.
        block = rng.random((stop - start, dim), dtype=np.float32)
        block -= 0.5
        block *= noise * np.sqrt(12.0 / dim)
        block += centres[truth[start:stop]]
        block /= np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
        X[start:stop] = block
    return X, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--true-k", type=int, default=12)
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit centre")
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=16)
    parser.add_argument("--sample", type=int, default=100_000, help="rows of the elbow sweep sample")
    parser.add_argument("--silhouette-sample", type=int, default=5_000)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both faiss and scikit-learn (default: all cores)")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()

    import faiss
    import sklearn
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(args.threads)
    print(f"load average before start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    print(f"faiss {faiss.__version__}, scikit-learn {sklearn.__version__}, threads {faiss.omp_get_max_threads()}")
    started = time.perf_counter()
    X, truth = clustered_unit_vectors(args.rows, args.dim, args.true_k, args.noise, args.seed)
    print(f"data: {args.rows} x {args.dim} float32 unit vectors, {args.true_k} true centres, "
          f"generated in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    curve = elbow_sweep(X, range(args.k_min, args.k_max + 1), sample_size=args.sample, seed=args.seed,
                        silhouette_sample=args.silhouette_sample, niter=args.iterations, nredo=1)
    sweep_seconds = time.perf_counter() - started
    knee, reason = find_knee(curve["k"].to_list(), curve["inertia"].to_list(), curve["silhouette"].to_list())
    print(f"\nelbow sweep k={args.k_min}..{args.k_max} on {min(args.sample, args.rows)} rows: {sweep_seconds:.1f} s")
    for row in curve.iter_rows(named=True):
        print(f"  k={row['k']:>2}  inertia={row['inertia']:>12.1f}  silhouette={row['silhouette']:.3f}  fit={row['seconds']:.2f} s")
    print(f"knee: k={knee} ({reason})")

    started = time.perf_counter()
    centroids = fit_kmeans(X, knee, seed=args.seed, niter=args.iterations, nredo=1)
    labels, _ = assign(X, centroids)
    faiss_seconds = time.perf_counter() - started
    faiss_purity = cluster_purity(labels, truth.astype(str))
    print(f"\nfinal fit on all {args.rows} rows at k={knee}, {args.iterations} iterations, 1 init:")
    print(f"  faiss spherical k-means + assignment: {faiss_seconds:.1f} s   purity vs true centres {faiss_purity:.3f}")

    started = time.perf_counter()
    centroids = fit_kmeans(X, knee, seed=args.seed, niter=args.iterations, nredo=3)
    assign(X, centroids)
    pipeline_fit_seconds = time.perf_counter() - started
    print(f"  faiss as the pipeline runs it (nredo=3) + assignment: {pipeline_fit_seconds:.1f} s")
    total = sweep_seconds + pipeline_fit_seconds
    print(f"\nsweep + pipeline fit: {total:.1f} s  (target <= 180 s)")

    if args.skip_sklearn:
        print(f"peak memory (maxrss): {peak_memory_gib():.2f} GiB")
        return
    started = time.perf_counter()
    # tol=0: scikit-learn runs all iterations, as faiss does (faiss has no early stop), so both do the same work.
    sk = KMeans(n_clusters=knee, n_init=1, max_iter=args.iterations, tol=0.0, random_state=args.seed, algorithm="lloyd")
    sk_labels = sk.fit_predict(X)
    sklearn_seconds = time.perf_counter() - started
    sk_purity = cluster_purity(sk_labels, truth.astype(str))
    print(f"  scikit-learn KMeans(n_init=1, max_iter={args.iterations}, tol=0) fit_predict: {sklearn_seconds:.1f} s   "
          f"purity {sk_purity:.3f}, iterations run {sk.n_iter_}")
    print(f"peak memory (maxrss): {peak_memory_gib():.2f} GiB")
    print(f"speedup_vs_sklearn: {sklearn_seconds / faiss_seconds:.2f}")


if __name__ == "__main__":
    main()
