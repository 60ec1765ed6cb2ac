"""Step functions the training and study assets share (this module defines no asset): training one variant
through the trainer resource and turning its result into the artifact reference and materialization metadata."""

import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from assets.common import artifact_metadata
from moce_model.experiment import Experiment
from moce_model.model.config import MoCEConfig
from resources.refs import AdaptersRef, CentroidsRef
from resources.trainer import TrainerResource


def _moce_config(experiment: Experiment, variant: str, num_clusters: int | None, embedder: dict | None) -> MoCEConfig:
    return MoCEConfig.for_variant(variant, experiment.experts.layout(), num_clusters=num_clusters, embedder=embedder)


def train_variant(
    context: dg.AssetExecutionContext,
    trainer: TrainerResource,
    experiment: Experiment,
    variant: str,
    *,
    base_model_dir: str,
    rows: pl.DataFrame,
    num_clusters: int | None,
    cluster_ids: dict[str, int] | None,
    centroids_ref: CentroidsRef | None,
    training_config,
    run_dir: Path,
    moce_config=None,
) -> tuple[dict, dict]:
    """Train one variant; returns (artifact reference, materialization metadata). `num_clusters` is the
    clustering's k (None for the variants that do not depend on it), recorded as `k` in metadata and refs.
    `moce_config`: the model's layout when it is not the profile's (the study's experts-per-group sweep).

    Long: the training call and each metadata entry it records."""
    from moce_model.common.plots import loss_curve_plot, png_markdown
    from moce_model.training import training_progress
    from moce_model.training.expert_use import expert_use_heatmap_png

    if moce_config is None:
        moce_config = _moce_config(experiment, variant, num_clusters,
                                   centroids_ref.embedder if centroids_ref else None)
    last_logged = [0.0]
    started = time.perf_counter()

    def on_log(logs: dict) -> None:
        now = time.perf_counter()
        if now - last_logged[0] > 15:
            last_logged[0] = now
            context.log.info(f"{variant}: {training_progress(logs, now - started)}")

    result = trainer.train(
        context,
        base_model_dir=base_model_dir,
        train_rows=rows,
        cluster_ids=cluster_ids,
        num_clusters=num_clusters if centroids_ref else None,
        moce_config=moce_config,
        training_config=training_config,
        output_dir=run_dir,
        on_log=on_log,
    )
    losses = pl.DataFrame(result["loss_history"], schema=["step", "loss"], orient="row")
    metadata = {
        **artifact_metadata(Path(result["artifact_dir"])),
        "variant": variant,
        "k": num_clusters,
        "optimizer_steps": result["global_step"],
        "processes": result.get("world_size", 1),
        "resumed_from_step": result["resumed_from_step"],
        "examples": result["n_examples"],
        "tokens_per_second": round(result["tokens_per_second"], 1),
        "train_seconds": round(result["train_seconds"], 1),
        "peak_memory_mb": round(result["peak_memory_mb"], 1),
        "trainable_parameters": result["trainable_parameters"],
        "final_loss": float(losses["loss"][-1]) if losses.height else None,
        # Where each experiment tracker of `training.report_to` has this run's curves (a folder or an MLflow URI).
        **({"trackers": dg.MetadataValue.json(result["trackers"])} if result.get("trackers") else {}),
        "loss_curve": dg.MetadataValue.md(png_markdown(loss_curve_plot(losses), f"{variant} loss")),
        "lineage": dg.MetadataValue.json(
            {
                "base_model": base_model_dir,
                "embedder": centroids_ref.embedder if centroids_ref else None,
                "k": num_clusters,
                "centroids": centroids_ref.path if centroids_ref else None,
            }
        ),
    }
    if result.get("expert_use") is not None:
        use = np.asarray(result["expert_use"], dtype=np.float64)
        metadata["expert_use"] = dg.MetadataValue.md(
            png_markdown(expert_use_heatmap_png(use, title=f"{variant}: expert use per group"), "expert use")
        )
        metadata["dead_groups"] = int(np.sum(use.sum(axis=1) == 0))
    ref = AdaptersRef(
        path=str(result["artifact_dir"]),
        variant=variant,
        k=num_clusters,
        moce_config=moce_config.to_dict(),
        centroids=centroids_ref.path if centroids_ref else None,
        embedder=centroids_ref.embedder if centroids_ref else None,
    )
    return ref, metadata
