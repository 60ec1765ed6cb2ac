"""merged_model/<variant> (and base_model) → benchmark_results/<model> + benchmark_item_scores/<model> →
benchmark_report. `build_results_asset` also evaluates a branch's models (the k sweep's)."""

import dataclasses
import time
from pathlib import Path

import dagster as dg
import polars as pl

from assets.common import (
    HEAVY_STEP_TAG,
    MAIN,
    RERUN_WHEN_UPSTREAM_CHANGES,
    Branch,
    artifact_metadata,
    md_table,
)
from moce_model.experiment import Experiment
from moce_model.variants import variant_semantics
from resources.refs import ArtifactRef, ReportRef
from resources.storage import ArtifactStorage

EVALUATION_CODE_VERSION = "3"
# The report alone (it states the run's provenance since "4"): a new report does not re-run the evaluations.
REPORT_CODE_VERSION = "4"


def _evaluation_table(branch: Branch, table: str, model_name: str, description: str,
                      kinds: frozenset = frozenset({"parquet"})):
    """One Parquet table the evaluation of `model_name` writes: asset `<table>/<model_name>` in `branch`."""
    return dg.AssetOut(key=branch.key(table, model_name), group_name=branch.group("evaluation"), kinds=set(kinds),
                       code_version=EVALUATION_CODE_VERSION, io_manager_key="parquet_io_manager",
                       automation_condition=branch.automation_condition, description=description)


def _embeds_prompts(model_name: str) -> bool:
    """Whether evaluating this model embeds each prompt (to route it by cluster): base has no variant."""
    return model_name != "base" and variant_semantics(model_name).needs_centroids


def expert_use_metadata(model_name: str, expert_use: pl.DataFrame) -> dict:
    """Row count, the share per benchmark, group and expert pooled over layers (with its range over layers),
    and the layer-by-expert heatmap, for a model whose groups have several experts."""
    from moce_model.common.plots import png_markdown
    from moce_model.evaluation.analyses import (
        expert_use_heatmap,
        expert_use_summary,
        routed_expert_use,
    )

    metadata: dict = {"rows": expert_use.height}
    if expert_use.height == 0:
        return metadata
    summary = expert_use_summary(expert_use)
    metadata["layers"] = int(summary["layers"].max())
    metadata["share_pooled_over_layers"] = dg.MetadataValue.md(md_table(summary.drop("model_variant"), max_rows=200))
    if routed_expert_use(expert_use).height:
        metadata["heatmap"] = dg.MetadataValue.md(png_markdown(expert_use_heatmap(expert_use, model_name),
                                                               f"expert use of {model_name}"))
    return metadata


def prompt_map_metadata(prompt_embeddings: pl.DataFrame) -> dict:
    """Prompt count and the PCA map of the evaluated prompts, by cluster and by benchmark."""
    from moce_model.common.plots import png_markdown
    from moce_model.evaluation.analyses import prompt_map

    png, mapped = prompt_map(prompt_embeddings)
    metadata: dict = {"prompts": mapped}
    if png is not None:
        metadata["map"] = dg.MetadataValue.md(png_markdown(png, "evaluation prompts in 2-D (PCA)"))
    return metadata


def evaluation_config(experiment: Experiment) -> type[dg.Config]:
    class EvaluationConfig(dg.Config):
        limit_per_benchmark: int | None = experiment.evaluation.limit_per_benchmark
        """Evaluate at most this many items per benchmark (None: the experiment's benchmark sizes)."""
        batch_size: int = 16
        seed: int = experiment.seed

    return EvaluationConfig


def build_results_asset(experiment: Experiment, model_name: str, branch: Branch = MAIN,
                        config_class: type[dg.Config] | None = None) -> dg.AssetsDefinition:
    """Evaluate `model_name` (`base`, or the merged model of a variant in `branch`) on the experiment's
    benchmarks: benchmark_results, benchmark_item_scores, and for a model with experts benchmark_expert_use and
    (routed by embedding) benchmark_prompt_embeddings, one partition each where the branch is partitioned.

    Long: it holds the asset's definition and its body, which calls the library and records metadata."""
    EvaluationConfig = config_class or evaluation_config(experiment)
    upstream = (dg.AssetIn(key="base_model") if model_name == "base"
                else dg.AssetIn(key=branch.key("merged_model", model_name)))
    # The base model has no experts: no expert-use table.
    expert_use_out = {} if model_name == "base" else {
        "expert_use": _evaluation_table(branch, "benchmark_expert_use", model_name, (
            f"Expert use of `{model_name}` on the evaluated (held-out) prompts, counted while the evaluation "
            "ran: per benchmark, layer, expert group and expert, the tokens routed to the expert and its share "
            "of the group's assignments.")),
    }

    # Only a model that routes by embedding the prompt has embeddings of the evaluated prompts.
    prompt_embeddings_out = {} if not _embeds_prompts(model_name) else {
        "prompt_embeddings": _evaluation_table(branch, "benchmark_prompt_embeddings", model_name, (
            f"The router's embedding and cluster of every evaluated prompt of `{model_name}` (its input "
            "side, embedded as the centroids were fit): the 2-D map of the evaluation prompts.")),
    }

    @dg.multi_asset(
        name=branch.op_name(f"evaluate_{model_name}"),
        ins={"model": upstream},
        partitions_def=branch.partitions_def,
        outs={
            **expert_use_out,
            **prompt_embeddings_out,
            "results": _evaluation_table(branch, "benchmark_results", model_name, (
                f"Benchmark scores of `{model_name}`, each with n, stderr and 95% interval; every prompt "
                "is routed to its cluster's expert group (embed the input side, nearest centroid) by the "
                "same lm-eval model class for every model."), kinds=frozenset({"lm_eval", "parquet"})),
            "item_scores": _evaluation_table(branch, "benchmark_item_scores", model_name, (
                f"Every item's score of `{model_name}` per benchmark and metric, with the cluster that "
                "answered it: what the intervals and the paired differences between models are computed from.")),
        },
        op_tags=HEAVY_STEP_TAG,
    )
    def evaluate(context: dg.AssetExecutionContext, config: EvaluationConfig, storage: ArtifactStorage,
                 model: ArtifactRef):
        from moce_model.common.io import atomic_write_parquet
        from moce_model.evaluation.runner import evaluate_model
        from moce_model.model.card import write_model_card

        experiment.check_devices()
        started = time.perf_counter()
        result = evaluate_model(
            Path(model.path),
            model_variant=model_name,
            benchmarks=experiment.benchmark_specs(),
            limit_per_benchmark=config.limit_per_benchmark,
            batch_size=config.batch_size,
            seed=config.seed,
            **experiment.evaluation_settings(),
        )
        # Prompts and completions, for reading what the model answered (not an input of any asset).
        items_path = storage.path_for(branch.key("benchmark_items", model_name))
        items_path = (items_path / f"{context.partition_key}.parquet" if context.has_partition_key
                      else items_path.with_suffix(".parquet"))
        atomic_write_parquet(result.items, items_path)
        if model_name != "base":  # the merged model's card gets its scores; the base model's directory is not ours
            write_model_card(model.path, result.table.to_dicts())
        yield dg.Output(
            result.table,
            output_name="results",
            metadata={
                "model_variant": model_name,
                "model_dir": dg.MetadataValue.path(model.path),
                "evaluated_with": dg.MetadataValue.json(experiment.evaluation_settings()),
                "k": getattr(model, "k", None),  # a merged model's k; the base model has none
                "scores": dg.MetadataValue.md(md_table(result.table.drop("ci_method"))),
                "items": dg.MetadataValue.path(str(items_path)),
                "subsets": dg.MetadataValue.json(result.notes),
                "lineage": dg.MetadataValue.json(
                    dataclasses.asdict(model)
                ),
                "seconds": round(time.perf_counter() - started, 1),
            },
        )
        per_metric = result.item_scores.group_by("benchmark", "metric", maintain_order=True).agg(
            pl.len().alias("items"), pl.col("score").mean().alias("mean"))
        yield dg.Output(
            result.item_scores,
            output_name="item_scores",
            metadata={"rows": result.item_scores.height, "per_metric": dg.MetadataValue.md(md_table(per_metric))},
        )
        if expert_use_out:
            yield dg.Output(result.expert_use, output_name="expert_use",
                            metadata=expert_use_metadata(model_name, result.expert_use))
        if prompt_embeddings_out:
            yield dg.Output(result.prompt_embeddings, output_name="prompt_embeddings",
                            metadata=prompt_map_metadata(result.prompt_embeddings))

    return evaluate


def build_evaluation_assets(experiment: Experiment) -> list:
    """The evaluation group: benchmark_results per model and benchmark_report. Long: it holds their nested definitions."""
    config_class = evaluation_config(experiment)
    model_names = ["base", *experiment.variants]
    result_assets = [build_results_asset(experiment, name, config_class=config_class) for name in model_names]

    @dg.asset(
        ins={
            **{name: dg.AssetIn(key=["benchmark_results", name]) for name in model_names},
            **{f"{name}_item_scores": dg.AssetIn(key=["benchmark_item_scores", name]) for name in model_names},
            **{f"{name}_expert_use": dg.AssetIn(key=["benchmark_expert_use", name]) for name in experiment.variants},
            **{f"{name}_prompt_embeddings": dg.AssetIn(key=["benchmark_prompt_embeddings", name])
               for name in experiment.variants if _embeds_prompts(name)},
            # Read for their training records: the precision each variant was trained in, stated in the report.
            **{f"{name}_model": dg.AssetIn(key=MAIN.key("merged_model", name)) for name in experiment.variants},
        },
        group_name="evaluation",
        kinds={"markdown", "matplotlib"},
        code_version=REPORT_CODE_VERSION,
        io_manager_key="json_io_manager",
        automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
        description=(
            "Every model side by side with 95% intervals; differences against pesc and base paired on items, with "
            "their interval and minimum detectable difference; the average over benchmarks; bars with error bars; "
            "the cluster × benchmark contingency of the evaluation prompts and how off-home prompts score; expert "
            "use on the evaluation prompts per benchmark, group, expert and layer; a 2-D (PCA) map of the "
            "evaluation prompts' embeddings by cluster and by benchmark."
        ),
    )
    def benchmark_report(context: dg.AssetExecutionContext, **inputs):
        from moce_model.common.io import (
            atomic_write_bytes,
            atomic_write_parquet,
            atomic_write_text,
        )
        from moce_model.common.plots import png_markdown
        from moce_model.evaluation.provenance import run_provenance
        from moce_model.evaluation.report import build_report

        provenance = run_provenance(experiment.seed, experiment.evaluation_settings(), {
            name: None if name == "base" else inputs[f"{name}_model"].path for name in model_names})
        report = build_report([inputs[name] for name in model_names],
                              [inputs[f"{name}_item_scores"] for name in model_names],
                              [inputs[f"{name}_expert_use"] for name in experiment.variants],
                              [inputs[f"{name}_prompt_embeddings"] for name in experiment.variants
                               if _embeds_prompts(name)],
                              provenance=provenance)
        out_dir = experiment.storage_root / "report"
        for benchmark, png in report.bar_chart_pngs.items():
            atomic_write_bytes(png, out_dir / f"{benchmark}.png")
        atomic_write_text(report.markdown, out_dir / "benchmark_report.md")
        # The paired differences and the averages as tables, for analysis beyond the markdown.
        atomic_write_parquet(report.differences, out_dir / "paired_differences.parquet")
        atomic_write_parquet(report.paper_average, out_dir / "paper_average.parquet")
        metadata = {
            **artifact_metadata(out_dir / "benchmark_report.md"),
            "comparison": dg.MetadataValue.md(report.markdown),
            "significant_differences": int(report.differences["significant"].sum()),
            "compared": report.differences.height,
            "commit": provenance.commit,
            "training_precision": dg.MetadataValue.json(dict(provenance.training_precision)),
            "evaluation_precision": f"{provenance.evaluation_dtype} on {provenance.evaluation_device}",
        }
        for benchmark, png in list(report.bar_chart_pngs.items())[:12]:
            metadata[f"bars_{benchmark}"] = dg.MetadataValue.md(png_markdown(png, benchmark))
        if report.differences_chart_png is not None:
            atomic_write_bytes(report.differences_chart_png, out_dir / "paired_differences.png")
            metadata["paired_differences"] = dg.MetadataValue.md(
                png_markdown(report.differences_chart_png, "paired differences"))
        # The analyses on the evaluation prompts, as tables and figures.
        atomic_write_parquet(report.routing_contingency, out_dir / "routing_contingency.parquet")
        atomic_write_parquet(report.off_home_scores, out_dir / "off_home_scores.parquet")
        atomic_write_parquet(report.expert_use_summary, out_dir / "expert_use_summary.parquet")
        if report.routing_contingency.height:
            metadata["routing_contingency"] = dg.MetadataValue.md(md_table(report.routing_contingency))
            metadata["off_home_prompts"] = int(report.routing_contingency["n_off_home"].sum())
            metadata["evaluated_prompts_routed"] = int(report.routing_contingency["n_prompts"].sum())
        if report.routing_contingency_png is not None:
            atomic_write_bytes(report.routing_contingency_png, out_dir / "routing_contingency.png")
            metadata["routing_contingency_plot"] = dg.MetadataValue.md(
                png_markdown(report.routing_contingency_png, "prompts per cluster and benchmark"))
        if report.off_home_scores.height:
            metadata["off_home_scores"] = dg.MetadataValue.md(md_table(report.off_home_scores.select(
                "model_variant", "benchmark", "metric", "n_home", "home_mean", "n_off_home", "off_home_mean",
                "difference", "difference_ci_low", "difference_ci_high", "tiny_sample")))
        if report.prompt_map_png is not None:
            atomic_write_bytes(report.prompt_map_png, out_dir / "prompt_map.png")
            metadata["prompt_map"] = dg.MetadataValue.md(png_markdown(report.prompt_map_png, "evaluation prompts in 2-D"))
        for variant, png in report.expert_use_pngs.items():
            atomic_write_bytes(png, out_dir / f"expert_use_{variant}.png")
            metadata[f"expert_use_{variant}"] = dg.MetadataValue.md(png_markdown(png, f"expert use of {variant}"))
        return dg.Output(ReportRef(path=str(out_dir), report=str(out_dir / "benchmark_report.md")), metadata=metadata)

    return [*result_assets, benchmark_report]
