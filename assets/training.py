"""base_model → moce_adapters/<variant> → merged_model/<variant>, one asset per variant (factory).

Each variant depends only on what it uses: `pesc` and `dense_adapter` never read the clusters, so a change
of k does not re-train them; `random_group` needs k (its number of groups) but not the centroids.
"""

import time

import dagster as dg
import polars as pl

from assets.common import (
    HEAVY_STEP_TAG,
    MAIN,
    Branch,
    artifact_dir,
    artifact_metadata,
    md_table,
)
from assets.steps import train_variant
from moce_model.experiment import Experiment
from moce_model.merging import merge_trained
from moce_model.model.base_model import base_model_hub_id
from moce_model.variants import variant_semantics
from resources.model_source import BaseModelSource
from resources.refs import AdaptersRef, BaseModelRef, MergedModelRef
from resources.storage import ArtifactStorage
from resources.trainer import TrainerResource

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
) -> dg.Output[BaseModelRef]:
    out_dir = storage.path_for(context.asset_key)
    started = time.perf_counter()
    path = model_source.materialize(out_dir)
    return dg.Output(
        BaseModelRef(path=str(path), name=model_source.describe()),
        metadata={
            **artifact_metadata(path),
            "model": model_source.describe(),
            "seconds": round(time.perf_counter() - started, 1),
            "size_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1),
        },
    )


def build_training_assets(experiment: Experiment, branch: Branch = MAIN, variants: list[str] | None = None) -> list:
    """moce_adapters/<variant>, merged_model/<variant> and its merge check for each of `variants` (default: the
    experiment's), in `branch`: a branch's variants read its own kmeans_centroids and cluster_assignments.

    Long: it holds the nested definitions of the training, merge and merge-check assets per variant."""
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
        ) -> dg.Output[AdaptersRef]:
            rows = inputs["instructions"].select("id", "system", "instruction", "input", "response")
            if config.train_rows is not None and config.train_rows < rows.height:
                rows = rows.sample(n=config.train_rows, seed=config.seed, shuffle=True)
            centroids_ref = inputs.get("kmeans_centroids")
            num_clusters = centroids_ref.k if centroids_ref else inputs.get("selected_k")
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
                base_model_dir=inputs["base_model"].path,
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
        """Long: the asset, its sample generations and its merge check defined together."""
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
        def merged_model(context: dg.AssetExecutionContext, storage: ArtifactStorage, **inputs) -> dg.Output[MergedModelRef]:
            centroids_ref = inputs.get("kmeans_centroids")
            path = merge_trained(
                inputs["adapters"].path,
                inputs["base_model"].path,
                artifact_dir(storage, context),
                centroids_path=centroids_ref.path if centroids_ref else None,
                embedder=centroids_ref.embedder if centroids_ref else None,
                base_model_id=base_model_hub_id(experiment.base_model.kind, experiment.base_model.model_id),
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
                MergedModelRef(
                    path=str(path),
                    variant=variant,
                    k=inputs["adapters"].k,
                    adapters=inputs["adapters"].path,
                    centroids=inputs["adapters"].centroids,
                    embedder=inputs["adapters"].embedder,
                ),
                metadata={
                    **artifact_metadata(path),
                    "variant": variant,
                    "k": inputs["adapters"].k,
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
        def merged_equals_unmerged(merged_model: MergedModelRef, adapters: AdaptersRef, base_model: BaseModelRef) -> dg.AssetCheckResult:
            from moce_model.merging import compare_merged_to_unmerged

            check = compare_merged_to_unmerged(merged_model.path, adapters.path, base_model.path)
            return dg.AssetCheckResult(
                passed=check.passed,
                description=check.describe(),
                # Which model the result is about: its directory and k (the main graph changes k over time).
                metadata={"max_abs_logit_diff": check.max_abs_diff, "tolerance": check.tolerance,
                          "sequences_set_aside_at_near_ties": len(check.near_ties),
                          "k": merged_model.k, "merged_model": dg.MetadataValue.path(merged_model.path)},
            )

        return [merged_model, merged_equals_unmerged]

    built: list = []
    for variant in experiment.variants if variants is None else variants:
        built.append(training_asset(variant))
        built.extend(merged_asset(variant))
    return built
