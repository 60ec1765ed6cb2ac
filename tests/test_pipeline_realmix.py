"""The clustering half on the real instruction samples in ../shared/data/realmix (skipped without them)."""

from __future__ import annotations

from dataclasses import replace

import dagster as dg
import pytest

from pipelines.definitions import build_definitions
from pipelines.profiles import REALMIX_DIR, load_profile
from tests.pipeline_fixtures import dagster_instance


@pytest.mark.skipif(not REALMIX_DIR.is_dir(), reason="realmix samples not present")
def test_realmix_clusters_follow_the_sources(tmp_path):
    profile = replace(load_profile("realmix"), data_dir=str(tmp_path / "store"), kmeans_restarts=1)
    defs = build_definitions(profile)
    with dagster_instance(tmp_path) as instance:
        result = defs.resolve_job_def("cluster_instructions").execute_in_process(
            instance=instance, run_config=dg.RunConfig(ops={"selected_k": {"config": {"k": 4}}})
        )
        assert result.success
        instructions = instance.get_latest_materialization_event(dg.AssetKey("instructions"))
        assert instructions.asset_materialization.metadata["rows"].value >= 3000
        clusters = instance.get_latest_materialization_event(dg.AssetKey("cluster_assignments"))
        assert clusters.asset_materialization.metadata["k"].value == 4
        assert clusters.asset_materialization.metadata["purity_vs_source"].value >= 0.9
