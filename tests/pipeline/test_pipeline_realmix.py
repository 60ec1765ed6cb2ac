"""The clustering half on the real instruction samples in ../shared/data/realmix (skipped without them)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from moce_model.experiment import load_experiment
from pipelines.definitions import build_definitions
from tests.pipeline_fixtures import dagster_instance

REALMIX = load_experiment("realmix")


@pytest.mark.skipif(not Path(REALMIX.sources[0].path).is_file(), reason="realmix samples not present")
def test_realmix_clusters_follow_the_sources(tmp_path):
    experiment = REALMIX.model_copy(update={
        "storage_root": tmp_path / "store",
        "clustering": REALMIX.clustering.model_copy(update={"restarts": 1}),
    })
    defs = build_definitions(experiment)
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
