"""base_model → moce_adapters/<variant> → merged_model/<variant>, one asset per variant (factory).

Each variant depends only on what it uses: `pesc` and `dense_adapter` never read the clusters, so a change
of k does not re-train them; `random_group` needs k (its number of groups) but not the centroids.
"""

import json
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from assets.common import MAIN, HEAVY_STEP_TAG, Branch, artifact_dir, artifact_metadata, artifact_ref, md_table
from moce_model.variants import variant_semantics
from moce_model.experiment import Experiment
from resources.model_source import BaseModelSource
from resources.storage import ArtifactStorage
from resources.trainer import TrainerResource
from moce_model.model.config import MoCEConfig

TRAINING_CODE_VERSION = "1"
SAMPLE_PROMPTS = [
    "A baker has 17 trays with 6 rolls each. How many rolls are there in total?",
    "Write a Python function `count_vowels(text)` that returns the number of vowels in text.",
]


@dg.asset(
    group_name="training",
    kinds={"pytorch", "safetensors"},
    code_version=TRAINING_CODE_VERSION,
    io_manager_key="json_io_manager",
    op_tags=HEAVY_STEP_TAG,
    description="The dense base model as a local safetensors checkpoint + tokenizer.",
)
def base_model(
    context: dg.AssetExecutionContext, model_source: BaseModelSource, storage: ArtifactStorage
) -> dg.Output[dict]:
    out_dir = storage.path_for(context.asset_key)
    started = time.perf_counter()
    path = model_source.materialize(out_dir)
    return dg.Output(
        artifact_ref(path, name=model_source.describe()),
        metadata={
            **artifact_metadata(path),
            "model": model_source.describe(),
            "seconds": round(time.perf_counter() - started, 1),
            "size_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1),
        },
    )


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
    centroids_ref: dict | None,
    training_config,
    run_dir: Path,
    moce_config=None,
) -> tuple[dict, dict]:
    """Train one variant; returns (artifact reference, materialization metadata). `num_clusters` is the
    clustering's k (None for the variants that do not depend on it), recorded as `k` in metadata and refs.
    `moce_config`: the model's layout when it is not the profile's (the study's experts-per-group sweep)."""
    from moce_model.training.expert_use import expert_use_heatmap_png
    from moce_model.common.plots import loss_curve_plot, png_markdown
    from moce_model.training import training_progress

    if moce_config is None:
        moce_config = _moce_config(experiment, variant, num_clusters,
                                   centroids_ref["embedder"] if centroids_ref else None)
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
        "loss_curve": dg.MetadataValue.md(png_markdown(loss_curve_plot(losses), f"{variant} loss")),
        "lineage": dg.MetadataValue.json(
            {
                "base_model": base_model_dir,
                "embedder": centroids_ref["embedder"] if centroids_ref else None,
                "k": num_clusters,
                "centroids": centroids_ref["path"] if centroids_ref else None,
            }
        ),
    }
    if result.get("expert_use") is not None:
        use = np.asarray(result["expert_use"], dtype=np.float64)
        metadata["expert_use"] = dg.MetadataValue.md(
            png_markdown(expert_use_heatmap_png(use, title=f"{variant}: expert use per group"), "expert use")
        )
        metadata["dead_groups"] = int(np.sum(use.sum(axis=1) == 0))
    ref = artifact_ref(
        result["artifact_dir"],
        variant=variant,
        k=num_clusters,
        moce_config=moce_config.to_dict(),
        centroids=centroids_ref["path"] if centroids_ref else None,
        embedder=centroids_ref["embedder"] if centroids_ref else None,
    )
    return ref, metadata


def merge_variant(adapters_ref: dict, base_model_dir: str, centroids_ref: dict | None, out_dir: Path) -> Path:
    from moce_model.clustering.kmeans import load_centroids
    from moce_model.model.adapters import load_trained
    from moce_model.merging import merge_to_directory

    from moce_model.model.adapters import TRAINING_RECORD_FILE

    centroids = load_centroids(centroids_ref["path"])[0] if centroids_ref else None
    record_path = Path(adapters_ref["path"]) / TRAINING_RECORD_FILE
    return merge_to_directory(
        load_trained(adapters_ref["path"], base_model_dir, dequantize=True),
        out_dir,
        centroids=centroids,
        embedder=centroids_ref["embedder"] if centroids_ref else None,
        tokenizer_dir=base_model_dir,
        training_record=json.loads(record_path.read_text()) if record_path.is_file() else None,
    )


def build_training_assets(experiment: Experiment, branch: Branch = MAIN, variants: list[str] | None = None) -> list:
    """moce_adapters/<variant>, merged_model/<variant> and its merge check for each of `variants` (default: the
    experiment's), in `branch`: a branch's variants read its own kmeans_centroids and cluster_assignments."""
    preset = experiment.training_config()

    class VariantTrainingConfig(dg.Config):
        """The launchpad's knobs: the TrainingConfig fields tuned most often, under the same names, applied
        over the experiment's training config."""

        max_steps: int | None = preset.max_steps
        lr: float = preset.lr
        per_device_batch_size: int = preset.per_device_batch_size
        max_length: int = preset.max_length
        seed: int = preset.seed
        train_rows: int | None = experiment.training.train_rows
        """Train on a seeded sample of this many instructions (None: all)."""

        def training_overrides(self) -> dict:
            fields = ("max_steps", "lr", "per_device_batch_size", "max_length", "seed")
            return {name: getattr(self, name) for name in fields}

    def training_asset(variant: str) -> dg.AssetsDefinition:
        ins = {"base_model": dg.AssetIn(), "instructions": dg.AssetIn()}
        semantics = variant_semantics(variant)
        # The variants that route by cluster read the centroids; random_group needs only k (its number of groups).
        if semantics.needs_centroids:
            ins["cluster_assignments"] = dg.AssetIn(key=branch.key("cluster_assignments"))
            ins["kmeans_centroids"] = dg.AssetIn(key=branch.key("kmeans_centroids"))
        elif experiment.experts.layout().needs_num_clusters(variant):
            ins["selected_k"] = dg.AssetIn()

        @dg.asset(
            key=branch.key("moce_adapters", variant),
            ins=ins,
            group_name=branch.group("training"),
            partitions_def=branch.partitions_def,
            kinds={"pytorch", "peft", "safetensors"},
            code_version=TRAINING_CODE_VERSION,
            io_manager_key="json_io_manager",
            automation_condition=branch.automation_condition,
            op_tags=HEAVY_STEP_TAG,
            description=f"LoRA + routed adapter experts of the `{variant}` variant trained on the instructions.",
        )
        def moce_adapters(
            context: dg.AssetExecutionContext,
            config: VariantTrainingConfig,
            trainer: TrainerResource,
            storage: ArtifactStorage,
            **inputs,
        ) -> dg.Output[dict]:
            rows = inputs["instructions"].select("id", "system", "instruction", "input", "response")
            if config.train_rows is not None and config.train_rows < rows.height:
                rows = rows.sample(n=config.train_rows, seed=config.seed, shuffle=True)
            centroids_ref = inputs.get("kmeans_centroids")
            num_clusters = centroids_ref["k"] if centroids_ref else inputs.get("selected_k")
            cluster_ids = (
                dict(inputs["cluster_assignments"].select("id", "cluster").iter_rows())
                if "cluster_assignments" in inputs
                else None
            )
            training_config = preset.with_overrides(config.training_overrides())
            ref, metadata = train_variant(
                context,
                trainer,
                experiment,
                variant,
                base_model_dir=inputs["base_model"]["path"],
                rows=rows,
                num_clusters=num_clusters,
                cluster_ids=cluster_ids,
                centroids_ref=centroids_ref,
                training_config=training_config,
                run_dir=storage.path_for(context.asset_key) / (f"k{num_clusters}" if num_clusters else "run"),
            )
            return dg.Output(ref, metadata=metadata)

        return moce_adapters

    def merged_asset(variant: str) -> dg.AssetsDefinition:
        adapters_in = dg.AssetIn(key=branch.key("moce_adapters", variant))
        ins = {"adapters": adapters_in, "base_model": dg.AssetIn()}
        if variant_semantics(variant).needs_centroids:
            ins["kmeans_centroids"] = dg.AssetIn(key=branch.key("kmeans_centroids"))

        @dg.asset(
            key=branch.key("merged_model", variant),
            ins=ins,
            group_name=branch.group("training"),
            partitions_def=branch.partitions_def,
            kinds={"pytorch", "safetensors"},
            code_version=TRAINING_CODE_VERSION,
            op_tags=HEAVY_STEP_TAG,
            io_manager_key="json_io_manager",
            automation_condition=branch.automation_condition,
            description=(
                f"The `{variant}` model with LoRA folded into the base weights, its experts, the centroids and "
                "the embedder reference: loads with AutoModelForCausalLM.from_pretrained and routes by itself."
            ),
        )
        def merged_model(context: dg.AssetExecutionContext, storage: ArtifactStorage, **inputs) -> dg.Output[dict]:
            path = merge_variant(
                inputs["adapters"],
                inputs["base_model"]["path"],
                inputs.get("kmeans_centroids"),
                artifact_dir(storage, context),
            )
            from moce_model.generate import generate

            samples = generate(path, SAMPLE_PROMPTS, max_new_tokens=48, prompt_format_name=experiment.base_model.prompt_format)
            sample_table = pl.DataFrame(
                {
                    "prompt": SAMPLE_PROMPTS,
                    "cluster": [cluster for _, cluster in samples],
                    "answer": [answer for answer, _ in samples],
                }
            )
            return dg.Output(
                artifact_ref(
                    path,
                    variant=variant,
                    k=inputs["adapters"].get("k"),
                    adapters=inputs["adapters"]["path"],
                    centroids=inputs["adapters"].get("centroids"),
                    embedder=inputs["adapters"].get("embedder"),
                ),
                metadata={
                    **artifact_metadata(path),
                    "variant": variant,
                    "k": inputs["adapters"].get("k"),
                    "size_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1),
                    "sample_generations": dg.MetadataValue.md(md_table(sample_table)),
                },
            )

        @dg.asset_check(
            asset=merged_model,
            additional_ins={"adapters": adapters_in, "base_model": dg.AssetIn()},
            # Partitioned with its asset: each k's run checks that k's merged model (an unpartitioned check of
            # a partitioned asset would read every partition at once).
            partitions_def=branch.partitions_def,
            description="The merged model gives the unmerged (LoRA + experts) model's logits on a probe batch.",
            blocking=True,
        )
        def merged_equals_unmerged(merged_model: dict, adapters: dict, base_model: dict) -> dg.AssetCheckResult:
            from moce_model.merging import compare_merged_to_unmerged

            check = compare_merged_to_unmerged(merged_model["path"], adapters["path"], base_model["path"])
            return dg.AssetCheckResult(
                passed=check.passed,
                description=check.describe(),
                # Which model the result is about: its directory and k (the main graph changes k over time).
                metadata={"max_abs_logit_diff": check.max_abs_diff, "tolerance": check.tolerance,
                          "sequences_set_aside_at_near_ties": len(check.near_ties),
                          "k": merged_model.get("k"), "merged_model": dg.MetadataValue.path(merged_model["path"])},
            )

        return [merged_model, merged_equals_unmerged]

    built: list = []
    for variant in experiment.variants if variants is None else variants:
        built.append(training_asset(variant))
        built.extend(merged_asset(variant))
    return built
