"""The multi-process launcher: an adapters asset trained by `torchrun --nproc_per_node 2` (gloo, CPU)
through Dagster Pipes, with rank 0 reporting back to the asset."""

from __future__ import annotations

import dagster as dg

from pipelines.definitions import build_definitions
from tests.pipeline_fixtures import dagster_instance, small_experiment
from tests.tiny_models import save_tiny_llama


def test_adapters_trained_by_two_torchrun_processes(tmp_path):
    save_tiny_llama(tmp_path / "tiny_base")
    experiment = small_experiment(
        tmp_path,
        sources=[{"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": 8, "seed": 0}],
        variants=["pesc"],
        launcher={"kind": "torchrun", "nproc_per_node": 2},
        training={"overrides": {"max_steps": 2, "per_device_batch_size": 2, "max_length": 96, "save_steps": 1,
                                "lora_r": 2, "lora_alpha": 4, "warmup_steps": 0}},
    )
    defs = build_definitions(experiment)
    with dagster_instance(tmp_path) as instance:
        selection = dg.AssetSelection.assets(["moce_adapters", "pesc"]).upstream().required_multi_asset_neighbors()
        result = defs.resolve_job_def("demo_pipeline").execute_in_process(
            instance=instance, asset_selection=list(selection.resolve(defs.resolve_asset_graph()))
        )
        assert result.success
        metadata = instance.get_latest_materialization_event(
            dg.AssetKey(["moce_adapters", "pesc"])
        ).asset_materialization.metadata
        assert metadata["processes"].value == 2
        assert metadata["optimizer_steps"].value == 2
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
        assert any("'step'" in message or '"step"' in message for message in logs), "no training log via Pipes"
