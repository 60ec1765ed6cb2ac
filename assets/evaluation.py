"""merged_model/<variant> (and base_model) → benchmark_results/<model> + benchmark_item_scores/<model> →
benchmark_report."""

import time
from pathlib import Path

import dagster as dg
import polars as pl

from assets.common import HEAVY_STEP_TAG, RERUN_WHEN_UPSTREAM_CHANGES, artifact_metadata, artifact_ref, md_table
from moce_model.experiment import Experiment
from resources.storage import ArtifactStorage

EVALUATION_CODE_VERSION = "2"


def build_evaluation_assets(experiment: Experiment) -> list:
    class EvaluationConfig(dg.Config):
        limit_per_benchmark: int | None = experiment.evaluation.limit_per_benchmark
        """Evaluate at most this many items per benchmark (None: the experiment's benchmark sizes)."""
        batch_size: int = 16
        seed: int = experiment.seed

    def results_asset(model_name: str) -> dg.AssetsDefinition:
        upstream = dg.AssetIn(key="base_model") if model_name == "base" else dg.AssetIn(key=["merged_model", model_name])

        @dg.multi_asset(
            name=f"evaluate_{model_name}",
            ins={"model": upstream},
            outs={
                "results": dg.AssetOut(
                    key=["benchmark_results", model_name],
                    group_name="evaluation",
                    kinds={"lm_eval", "parquet"},
                    code_version=EVALUATION_CODE_VERSION,
                    io_manager_key="parquet_io_manager",
                    automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
                    description=(
                        f"Benchmark scores of `{model_name}`, each with n, stderr and 95% interval; every prompt "
                        "is routed to its cluster's expert group (embed the input side, nearest centroid) by the "
                        "same lm-eval model class for every model."
                    ),
                ),
                "item_scores": dg.AssetOut(
                    key=["benchmark_item_scores", model_name],
                    group_name="evaluation",
                    kinds={"parquet"},
                    code_version=EVALUATION_CODE_VERSION,
                    io_manager_key="parquet_io_manager",
                    automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
                    description=(
                        f"Every item's score of `{model_name}` per benchmark and metric, with the cluster that "
                        "answered it: what the intervals and the paired differences between models are computed from."
                    ),
                ),
            },
            op_tags=HEAVY_STEP_TAG,
        )
        def evaluate(context: dg.AssetExecutionContext, config: EvaluationConfig, storage: ArtifactStorage,
                     model: dict):
            from moce_model.evaluation.runner import evaluate_model
            from moce_model.io import atomic_write_parquet

            started = time.perf_counter()
            result = evaluate_model(
                Path(model["path"]),
                model_variant=model_name,
                benchmarks=experiment.benchmark_specs(),
                limit_per_benchmark=config.limit_per_benchmark,
                batch_size=config.batch_size,
                seed=config.seed,
                **experiment.evaluation_settings(),
            )
            # Prompts and completions, for reading what the model answered (not an input of any asset).
            items_path = storage.path_for(["benchmark_items", model_name]).with_suffix(".parquet")
            atomic_write_parquet(result.items, items_path)
            yield dg.Output(
                result.table,
                output_name="results",
                metadata={
                    "model_variant": model_name,
                    "model_dir": dg.MetadataValue.path(model["path"]),
                    "evaluated_with": dg.MetadataValue.json(experiment.evaluation_settings()),
                    "k": model.get("k"),
                    "scores": dg.MetadataValue.md(md_table(result.table.drop("ci_method"))),
                    "items": dg.MetadataValue.path(str(items_path)),
                    "subsets": dg.MetadataValue.json(result.notes),
                    "lineage": dg.MetadataValue.json(
                        {key: model.get(key) for key in ("path", "variant", "k", "adapters", "centroids", "embedder")}
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

        return evaluate

    model_names = ["base", *experiment.variants]
    result_assets = [results_asset(name) for name in model_names]

    @dg.asset(
        ins={
            **{name: dg.AssetIn(key=["benchmark_results", name]) for name in model_names},
            **{f"{name}_item_scores": dg.AssetIn(key=["benchmark_item_scores", name]) for name in model_names},
        },
        group_name="evaluation",
        kinds={"markdown", "matplotlib"},
        code_version=EVALUATION_CODE_VERSION,
        io_manager_key="json_io_manager",
        automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
        description=(
            "Every model side by side with 95% intervals; differences against pesc and base paired on items, with "
            "their interval and minimum detectable difference; the average over benchmarks; bars with error bars; "
            "prompts per cluster."
        ),
    )
    def benchmark_report(context: dg.AssetExecutionContext, **inputs: pl.DataFrame):
        from moce_model.evaluation.report import build_report
        from moce_model.io import atomic_write_bytes, atomic_write_parquet, atomic_write_text
        from moce_model.plots import png_markdown

        report = build_report([inputs[name] for name in model_names],
                              [inputs[f"{name}_item_scores"] for name in model_names])
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
        }
        for benchmark, png in list(report.bar_chart_pngs.items())[:12]:
            metadata[f"bars_{benchmark}"] = dg.MetadataValue.md(png_markdown(png, benchmark))
        if report.differences_chart_png is not None:
            atomic_write_bytes(report.differences_chart_png, out_dir / "paired_differences.png")
            metadata["paired_differences"] = dg.MetadataValue.md(
                png_markdown(report.differences_chart_png, "paired differences"))
        return dg.Output(artifact_ref(out_dir, report=str(out_dir / "benchmark_report.md")), metadata=metadata)

    return [*result_assets, benchmark_report]
