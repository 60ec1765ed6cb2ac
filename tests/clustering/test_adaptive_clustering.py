"""Adaptive clustering: new instructions update the centroids incrementally (exact spherical means of old and
new members), with a drift statistic per cluster."""

from __future__ import annotations

import numpy as np
import pytest

from moce_model.clustering.kmeans import ClusterState, update_centroids


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def three_clusters(rng: np.random.Generator, n: int, shift: np.ndarray | None = None) -> np.ndarray:
    centres = np.eye(3, 8) if shift is None else unit(np.eye(3, 8) + shift)
    return unit(np.repeat(centres, n, axis=0) + 0.05 * rng.standard_normal((3 * n, 8))).astype(np.float32)


def test_update_gives_the_spherical_mean_of_old_and_new_members() -> None:
    rng = np.random.default_rng(0)
    old, new = three_clusters(rng, 30), three_clusters(rng, 10)
    state = ClusterState.from_assignment([f"a{i}" for i in range(90)], old, np.eye(3, 8, dtype=np.float32))
    assert state.counts.tolist() == [30, 30, 30]
    update = update_centroids(state, [f"a{i}" for i in range(90)] + [f"b{i}" for i in range(30)],
                              np.concatenate([old, new]))
    assert update.new_rows.tolist() == [10, 10, 10] and update.state.counts.tolist() == [40, 40, 40]
    everything = np.concatenate([old, new])
    for cluster in range(3):
        members = everything[np.r_[cluster * 30:(cluster + 1) * 30, 90 + cluster * 10:90 + (cluster + 1) * 10]]
        expected = members.sum(axis=0) / np.linalg.norm(members.sum(axis=0))
        assert np.allclose(update.state.centroids[cluster], expected, atol=1e-5)
    # rows already counted are not counted twice
    again = update_centroids(update.state, [f"b{i}" for i in range(30)], new)
    assert again.new_rows.tolist() == [0, 0, 0] and np.allclose(again.drift, 0.0)


def test_drift_is_large_only_where_the_new_data_moved_a_cluster() -> None:
    rng = np.random.default_rng(1)
    old = three_clusters(rng, 40)
    state = ClusterState.from_assignment([f"a{i}" for i in range(120)], old, np.eye(3, 8, dtype=np.float32))
    moved = unit(np.eye(1, 8) + 0.8 * np.eye(1, 8, 5) + 0.05 * rng.standard_normal((40, 8))).astype(np.float32)
    update = update_centroids(state, [f"m{i}" for i in range(40)], moved)
    assert update.new_rows.tolist() == [40, 0, 0]
    assert update.drift[0] > 0.05 and update.drift[1] == pytest.approx(0.0) and update.drift[2] == pytest.approx(0.0)
    assert update.dropped_ids == 120  # the old rows are not in this batch; they stay counted


def test_state_round_trips_and_a_broken_file_is_named(tmp_path) -> None:
    rng = np.random.default_rng(2)
    state = ClusterState.from_assignment(["x", "y", "z"], three_clusters(rng, 1), np.eye(3, 8, dtype=np.float32))
    state.save(tmp_path)
    loaded = ClusterState.load(tmp_path)
    assert np.array_equal(loaded.sums, state.sums) and loaded.ids.tolist() == ["x", "y", "z"]
    (tmp_path / "cluster_state.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cluster_state.npz: unreadable"):
        ClusterState.load(tmp_path)
    with pytest.raises(ValueError, match="dimension 4"):
        update_centroids(state, ["w"], np.ones((1, 4), dtype=np.float32))


def test_incremental_kmeans_asset_adds_only_new_instructions_and_checks_drift(tmp_path) -> None:
    """The data half with 40 instructions per domain, then with 60: in incremental mode the second run adds the
    80 new rows to the last centroids (same k) instead of refitting, and the drift check reports on it."""
    import dagster as dg

    from pipelines.definitions import build_definitions
    from tests.pipeline_fixtures import dagster_instance, small_experiment

    def run(n_per_domain: int, incremental: bool, instance) -> dg.ExecuteInProcessResult:
        source = {"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": n_per_domain, "seed": 0}
        defs = build_definitions(small_experiment(tmp_path, sources=[source]))
        result = defs.resolve_job_def("cluster_instructions").execute_in_process(
            instance=instance,
            run_config={"ops": {"selected_k": {"config": {"k": 4}},
                                "kmeans_centroids": {"config": {"incremental": incremental}}}},
        )
        assert result.success
        return result

    with dagster_instance(tmp_path) as instance:
        run(40, incremental=False, instance=instance)
        first = instance.fetch_materializations(dg.AssetKey("kmeans_centroids"), limit=1).records[0]
        assert first.asset_materialization.metadata["mode"].value == "fit"
        run(60, incremental=True, instance=instance)
        second = instance.fetch_materializations(dg.AssetKey("kmeans_centroids"), limit=1).records[0]
        metadata = second.asset_materialization.metadata
        assert metadata["mode"].value == "incremental update"
        assert metadata["rows_fitted"].value == 80
        assert 0 <= metadata["max_drift"].value < 0.05  # more of the same four domains barely moves a centroid
        check_key = dg.AssetCheckKey(dg.AssetKey("kmeans_centroids"), "centroid_drift_below_threshold")
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key])[check_key]
        assert record.event.dagster_event.event_specific_data.passed
