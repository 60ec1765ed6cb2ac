"""merged_model/<variant> (and base_model) → benchmark_results/<model> → benchmark_report."""

import time
from pathlib import Path

import dagster as dg
import polars as pl

from assets.common import RERUN_WHEN_UPSTREAM_CHANGES, artifact_metadata, artifact_ref, md_table
from pipelines.profiles import Profile
from resources.storage import ArtifactStorage

EVALUATION_CODE_VERSION = "2"


def profile_benchmarks(profile: Profile) -> list:
    from moce_model.evaluation.runner import demo_benchmarks, paper_benchmarks

    if profile.benchmarks == "paper":
        return paper_benchmarks()
    # Decoding dominates on 2 CPU cores: small subsets keep four models within minutes (n_items says so).
    return demo_benchmarks(n_per_domain=8, humaneval_items=4, gsm8k_items=4, seed=profile.seed)


def evaluation_settings(profile: Profile) -> dict:
    """The experiment's evaluation device, dtype and prompt format (the one its models were trained with)."""
    return {"device": profile.eval_device, "dtype": profile.eval_dtype, "prompt_format": profile.prompt_format}


def build_evaluation_assets(profile: Profile) -> list:
    class EvaluationConfig(dg.Config):
        limit_per_benchmark: int | None = profile.eval_limit
        """Evaluate at most this many items per benchmark (None: the profile's default subset)."""
        batch_size: int = 16
        seed: int = profile.seed

    def results_asset(model_name: str) -> dg.AssetsDefinition:
        upstream = dg.AssetIn(key="base_model") if model_name == "base" else dg.AssetIn(key=["merged_model", model_name])

        @dg.asset(
            key=["benchmark_results", model_name],
            ins={"model": upstream},
            group_name="evaluation",
            kinds={"lm_eval", "parquet"},
            code_version=EVALUATION_CODE_VERSION,
            io_manager_key="parquet_io_manager",
            automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
            pool="evaluation",
            description=(
                f"Benchmark scores of `{model_name}`; every prompt is routed to its cluster's expert group "
                "(embed the input side, nearest centroid) by the same lm-eval model class for every model."
            ),
        )
        def benchmark_results(
            context: dg.AssetExecutionContext, config: EvaluationConfig, storage: ArtifactStorage, model: dict
        ) -> dg.Output[pl.DataFrame]:
            from moce_model.evaluation.runner import evaluate_model
            from moce_model.io import atomic_write_parquet

            started = time.perf_counter()
            result = evaluate_model(
                Path(model["path"]),
                model_variant=model_name,
                benchmarks=profile_benchmarks(profile),
                limit_per_benchmark=config.limit_per_benchmark,
                batch_size=config.batch_size,
                seed=config.seed,
                **evaluation_settings(profile),
            )
            items_path = storage.path_for(["benchmark_items", model_name]).with_suffix(".parquet")
            atomic_write_parquet(result.items, items_path)
            return dg.Output(
                result.table,
                metadata={
                    "model_variant": model_name,
                    "model_dir": dg.MetadataValue.path(model["path"]),
                    "evaluated_with": dg.MetadataValue.json(evaluation_settings(profile)),
                    "k": model.get("k"),
                    "scores": dg.MetadataValue.md(md_table(result.table)),
                    "items": dg.MetadataValue.path(str(items_path)),
                    "subsets": dg.MetadataValue.json(result.notes),
                    "lineage": dg.MetadataValue.json(
                        {key: model.get(key) for key in ("path", "variant", "k", "adapters", "centroids", "embedder")}
                    ),
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )

        return benchmark_results

    model_names = ["base", *profile.variants]
    result_assets = [results_asset(name) for name in model_names]

    @dg.asset(
        ins={name: dg.AssetIn(key=["benchmark_results", name]) for name in model_names},
        group_name="evaluation",
        kinds={"markdown", "matplotlib"},
        code_version=EVALUATION_CODE_VERSION,
        io_manager_key="json_io_manager",
        automation_condition=RERUN_WHEN_UPSTREAM_CHANGES,
        description="Every model side by side: table, deltas against pesc and base, bars, prompts per cluster.",
    )
    def benchmark_report(context: dg.AssetExecutionContext, storage: ArtifactStorage, **tables: pl.DataFrame):
        from moce_model.evaluation.report import build_report
        from moce_model.io import atomic_write_bytes, atomic_write_text
        from moce_model.plots import png_markdown

        items = []
        for name in model_names:
            path = storage.path_for(["benchmark_items", name]).with_suffix(".parquet")
            if path.exists():
                try:
                    items.append(pl.read_parquet(path).select("benchmark", "item_id", "cluster"))
                except (pl.exceptions.PolarsError, OSError) as error:
                    raise ValueError(
                        f"{path}: benchmark items unreadable ({type(error).__name__}: {error}); "
                        f"re-materialize benchmark_results/{name}"
                    ) from error
        report = build_report([tables[name] for name in model_names], items)
        out_dir = profile.storage_root / "report"
        for benchmark, png in report.bar_chart_pngs.items():
            atomic_write_bytes(png, out_dir / f"{benchmark}.png")
        atomic_write_text(report.markdown, out_dir / "benchmark_report.md")
        metadata = {
            **artifact_metadata(out_dir / "benchmark_report.md"),
            "comparison": dg.MetadataValue.md(report.markdown),
        }
        for benchmark, png in list(report.bar_chart_pngs.items())[:12]:
            metadata[f"bars_{benchmark}"] = dg.MetadataValue.md(png_markdown(png, benchmark))
        return dg.Output(artifact_ref(out_dir, report=str(out_dir / "benchmark_report.md")), metadata=metadata)

    return [*result_assets, benchmark_report]
