"""The Dagster Definitions: one asset graph, its resources and config defaults chosen by the experiment file
(MOCE_EXPERIMENT, moce_model.experiment)."""

from __future__ import annotations

import logging
import os

import dagster as dg
from transformers.utils import logging as hf_logging

from assets.clustering import build_clustering_assets
from assets.common import HEAVY_STEP_TAG
from assets.data import build_instruction_assets, build_raw_source_assets
from assets.embedding import (
    embeddings_are_unit_norm_and_complete,
    instruction_embeddings,
)
from assets.evaluation import build_evaluation_assets
from assets.k_sweep import K_SWEEP_GROUP, build_k_sweep_assets
from assets.study import STUDY_GROUP, build_study_assets
from assets.training import base_model, build_training_assets
from moce_model.common.logs import quiet_library_logs
from moce_model.experiment import Experiment, load_experiment
from moce_model.study.config import StudyConfig
from pipelines.instance import fail_runs_of_killed_processes
from resources.embedder import EmbedderResource
from resources.model_source import BaseModelSource
from resources.storage import (
    ArtifactStorage,
    AtomicPolarsParquetIOManager,
    JsonIOManager,
)
from resources.trainer import TrainerResource

DATA_HALF = dg.AssetSelection.groups("data", "embedding", "clustering")


def heavy_step_limit() -> int:
    """How many heavy steps (assets tagged HEAVY_STEP_TAG) one run executes at once: MOCE_HEAVY_STEPS, default 1
    (a 2-core machine; a machine with one GPU per training can raise it)."""
    value = os.environ.get("MOCE_HEAVY_STEPS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MOCE_HEAVY_STEPS={value!r}: expected how many heavy steps may run at once (a positive integer)")
    return int(value)


def executor() -> dg.ExecutorDefinition:
    """Dagster's multiprocess executor with the heavy steps limited; light steps (tables, plots) run beside them."""
    key, value = next(iter(HEAVY_STEP_TAG.items()))
    return dg.multiprocess_executor.configured(
        {"tag_concurrency_limits": [{"key": key, "value": value, "limit": heavy_step_limit()}]}
    )
# The k sweep and the study train many models: run on demand (their own jobs), not as part of the pipeline.
K_SWEEP = dg.AssetSelection.groups(K_SWEEP_GROUP)
STUDY = dg.AssetSelection.groups(STUDY_GROUP)
PIPELINE = dg.AssetSelection.all() - K_SWEEP - STUDY


def build_resources(experiment: Experiment) -> dict:
    root = experiment.storage_root
    embedder, launcher = experiment.embedder, experiment.launcher
    return {
        "parquet_io_manager": AtomicPolarsParquetIOManager(base_dir=str(root / "tables")),
        "json_io_manager": JsonIOManager(base_dir=str(root / "refs")),
        "storage": ArtifactStorage(root=str(root / "artifacts")),
        "embedder": EmbedderResource(
            model=embedder.model,
            kind=embedder.kind,
            instruction=embedder.instruction,
            instruction_source=embedder.instruction_source,
            batch_size=embedder.batch_size,
            shard_rows=embedder.shard_rows,
        ),
        "model_source": BaseModelSource(kind=experiment.base_model.kind, model_id=experiment.base_model.model_id),
        "trainer": TrainerResource(
            launcher=launcher.resolved_kind,
            nproc_per_node=launcher.nproc_per_node,
            nnodes=launcher.nnodes,
            node_rank=launcher.node_rank,
            rdzv_endpoint=launcher.rdzv_endpoint,
        ),
    }


def build_definitions(experiment: Experiment, study: StudyConfig | None = None) -> dg.Definitions:
    """`study`: what the study job runs (default: the experiment's `study:` section over `StudyConfig`'s defaults)."""
    assets_and_checks = [
        *build_raw_source_assets(experiment),
        build_instruction_assets(experiment),
        instruction_embeddings,
        embeddings_are_unit_norm_and_complete,
        *build_clustering_assets(experiment),
        base_model,
        *build_training_assets(experiment),
        *build_evaluation_assets(experiment),
        *build_k_sweep_assets(experiment),
        *build_study_assets(experiment, study or experiment.study_config()),
    ]
    checks = [a for a in assets_and_checks if isinstance(a, dg.AssetChecksDefinition)]
    assets = [a for a in assets_and_checks if not isinstance(a, dg.AssetChecksDefinition)]
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        resources=build_resources(experiment),
        executor=executor(),
        jobs=[
            dg.define_asset_job("demo_pipeline", selection=PIPELINE,
                                description="Every asset of the experiment, end to end."),
            dg.define_asset_job("k_sweep", selection=K_SWEEP,
                                description="`moce` clustered, trained, merged (and checked) and evaluated at "
                                            "each k, one partition per k; the comparison table over the "
                                            "materialized k."),
            dg.define_asset_job("study", selection=STUDY,
                                description="Every variant over seeds and the experts-per-group sweep; one table "
                                            "of mean and two-level interval over seeds and items, one figure."),
            dg.define_asset_job("cluster_instructions", selection=DATA_HALF,
                                description="Sources → embeddings → elbow → k-means → cluster labels."),
        ],
        sensors=[*automation_sensors(), fail_runs_of_killed_processes],
    )


def automation_sensors() -> list[dg.SensorDefinition]:
    """Re-run what is downstream of a change, in the UI; left out of the code location that a `moce` command's run
    queue loads (MOCE_AUTOMATION_SENSOR=0, pipelines/queue.py): the command runs what it was asked to, and a
    sweep's new inputs must not start the main graph beside it."""
    if os.environ.get("MOCE_AUTOMATION_SENSOR", "1") == "0":
        return []
    return [dg.AutomationConditionSensorDefinition(
        "rerun_downstream_of_changes",
        target=PIPELINE,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )]


# `warnings.warn` (transformers and torch deprecations, peft notices) as records of the `py.warnings` logger, which
# the instance's python_logs sends to the event log.
logging.captureWarnings(True)
# transformers' records reach the event log (python_logs), which the terminal shows too: without this its own
# stderr handler would print each of them a second time.
hf_logging.disable_default_handler()
# Our progress at INFO, the libraries' warnings only (MOCE_VERBOSE=1: their INFO lines and progress bars too); each
# process that runs steps imports this module before the run starts, and the levels set here are the ones in force
# (the instance sets no python_log_level: pipelines/instance.py).
quiet_library_logs()
defs = build_definitions(load_experiment())
