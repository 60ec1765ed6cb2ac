"""The Dagster Definitions: one asset graph, resources chosen by the profile (MOCE_PROFILE)."""

from __future__ import annotations

import dagster as dg

from assets.clustering import build_clustering_assets
from assets.data import build_instruction_assets, build_raw_source_assets
from assets.embedding import embeddings_are_unit_norm_and_complete, instruction_embeddings
from assets.evaluation import build_evaluation_assets
from assets.k_sweep import build_k_sweep_asset
from assets.study import STUDY_GROUP, build_study_assets
from assets.training import base_model, build_training_assets
from moce_model.study import StudyConfig
from pipelines.instance import fail_runs_of_killed_processes
from pipelines.profiles import Profile, load_profile
from resources.embedder import EmbedderResource
from resources.model_source import BaseModelSource
from resources.storage import ArtifactStorage, AtomicPolarsParquetIOManager, JsonIOManager
from resources.trainer import TrainerResource

DATA_HALF = dg.AssetSelection.groups("data", "embedding", "clustering")
# The k sweep and the study train many models: run on demand (their own jobs), not as part of the pipeline.
STUDY = dg.AssetSelection.groups(STUDY_GROUP)
PIPELINE = dg.AssetSelection.all() - dg.AssetSelection.assets("k_sweep_results") - STUDY


def build_resources(profile: Profile) -> dict:
    root = profile.storage_root
    return {
        "parquet_io_manager": AtomicPolarsParquetIOManager(base_dir=str(root / "tables")),
        "json_io_manager": JsonIOManager(base_dir=str(root / "refs")),
        "storage": ArtifactStorage(root=str(root / "artifacts")),
        "embedder": EmbedderResource(
            model=profile.embedder["model"],
            kind=profile.embedder.get("kind", "sentence-transformers"),
            instruction=profile.embedder.get("instruction", ""),
            batch_size=profile.embed_batch_size,
            shard_rows=profile.embed_shard_rows,
        ),
        "model_source": BaseModelSource(
            kind=profile.base_model["kind"], model_id=profile.base_model.get("model_id", "")
        ),
        "trainer": TrainerResource(
            launcher=profile.launcher,
            nproc_per_node=profile.nproc_per_node,
            nnodes=profile.nnodes,
            node_rank=profile.node_rank,
            rdzv_endpoint=profile.rdzv_endpoint,
        ),
    }


def build_definitions(profile: Profile, study: StudyConfig | None = None) -> dg.Definitions:
    """`study`: what the study job runs (default: `StudyConfig()`, the seeds, sweep and sizes it documents)."""
    assets_and_checks = [
        *build_raw_source_assets(profile),
        build_instruction_assets(profile),
        instruction_embeddings,
        embeddings_are_unit_norm_and_complete,
        *build_clustering_assets(profile),
        base_model,
        *build_training_assets(profile),
        *build_evaluation_assets(profile),
        build_k_sweep_asset(profile),
        *build_study_assets(profile, study or StudyConfig()),
    ]
    checks = [a for a in assets_and_checks if isinstance(a, dg.AssetChecksDefinition)]
    assets = [a for a in assets_and_checks if not isinstance(a, dg.AssetChecksDefinition)]
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        resources=build_resources(profile),
        jobs=[
            dg.define_asset_job("demo_pipeline", selection=PIPELINE,
                                description="Every asset of the profile, end to end."),
            dg.define_asset_job("k_sweep", selection=dg.AssetSelection.assets("k_sweep_results"),
                                description="Train and evaluate `moce` at several k; one comparison table."),
            dg.define_asset_job("study", selection=STUDY,
                                description="Every variant over seeds and the experts-per-group sweep; one table "
                                            "of mean and two-level interval over seeds and items, one figure."),
            dg.define_asset_job("cluster_instructions", selection=DATA_HALF,
                                description="Sources → embeddings → elbow → k-means → cluster labels."),
        ],
        sensors=[
            dg.AutomationConditionSensorDefinition(
                "rerun_downstream_of_changes",
                target=PIPELINE,
                default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=30,
            ),
            fail_runs_of_killed_processes,
        ],
    )


defs = build_definitions(load_profile())
