"""The comparison report over all evaluated variants: markdown table with deltas, a bar chart per
benchmark, and the distribution of each benchmark's prompts over the clusters (expert groups)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from moce_model.evaluation.runner import ITEM_CLUSTERS_SCHEMA, RESULTS_SCHEMA

REFERENCE_VARIANTS: tuple[str, ...] = ("pesc", "base")
VARIANT_ORDER: tuple[str, ...] = ("base", "dense_adapter", "pesc", "moce")
LOWER_IS_BETTER: frozenset[str] = frozenset({"heldout_loss"})


@dataclass(frozen=True)
class Report:
    markdown: str
    comparison: pl.DataFrame
    bar_chart_pngs: dict[str, bytes]
    cluster_distribution: pl.DataFrame


def build_report(tables: Sequence[pl.DataFrame], item_clusters: Sequence[pl.DataFrame]) -> Report:
    """Join per-variant results tables (DESIGN.md schema) and item clusters into the comparison report.

    `comparison` has one row per (benchmark, metric), one column per variant (value), n_items per variant,
    and `delta_<metric-variant>_vs_<ref>` columns against `pesc` and `base` where present.
    """
    if not tables:
        raise ValueError("build_report needs at least one results table")
    for index, table in enumerate(tables):
        missing = [c for c in RESULTS_SCHEMA if c not in table.columns]
        if missing:
            raise ValueError(f"results table {index}: missing column(s) {missing}")
    results = pl.concat([t.select(list(RESULTS_SCHEMA)).cast(RESULTS_SCHEMA) for t in tables])
    repeated = results.group_by("model_variant", "benchmark", "metric").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"more than one row for (variant, benchmark, metric): {repeated.drop('len').rows()[:5]}")
    variants = _ordered_variants(results["model_variant"].unique().to_list())
    comparison = _comparison(results, variants)
    clusters = (
        pl.concat([c.select(list(ITEM_CLUSTERS_SCHEMA)).cast(ITEM_CLUSTERS_SCHEMA) for c in item_clusters])
        if item_clusters else pl.DataFrame(schema=ITEM_CLUSTERS_SCHEMA)
    )
    distribution = cluster_distribution(clusters)
    charts = {benchmark: _bar_chart(results, benchmark, variants)
              for benchmark in results["benchmark"].unique(maintain_order=True).to_list()}
    markdown = _markdown(results, comparison, variants, distribution)
    return Report(markdown, comparison, charts, distribution)


def cluster_distribution(item_clusters: pl.DataFrame) -> pl.DataFrame:
    """benchmark, cluster, n_prompts, share: how a benchmark's prompts spread over the clusters.

    Several routed variants answer the same prompts with the same router, so items are counted once per
    (benchmark, item_id); items without a cluster (models that do not route) are left out.
    """
    routed = item_clusters.filter(pl.col("cluster").is_not_null()).unique(["benchmark", "item_id", "cluster"])
    conflicting = routed.group_by("benchmark", "item_id").len().filter(pl.col("len") > 1)
    if conflicting.height:
        raise ValueError(
            f"prompts routed to different clusters by different models: {conflicting.drop('len').rows()[:5]}; "
            "report them per model instead"
        )
    counts = routed.group_by("benchmark", "cluster").agg(pl.len().alias("n_prompts"))
    return counts.with_columns(
        (pl.col("n_prompts") / pl.col("n_prompts").sum().over("benchmark")).alias("share")
    ).sort("benchmark", "cluster")


def _ordered_variants(variants: list[str]) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in variants]
    return known + sorted(v for v in variants if v not in VARIANT_ORDER)


def _comparison(results: pl.DataFrame, variants: list[str]) -> pl.DataFrame:
    wide = results.pivot(on="model_variant", index=["benchmark", "metric"], values="value")
    items = results.pivot(on="model_variant", index=["benchmark", "metric"], values="n_items")
    items = items.rename({v: f"n_items_{v}" for v in variants})
    comparison = wide.join(items, on=["benchmark", "metric"], how="left")
    for column in variants:
        if column not in comparison.columns:
            comparison = comparison.with_columns(pl.lit(None, pl.Float64).alias(column))
    for reference in REFERENCE_VARIANTS:
        if reference not in variants:
            continue
        for variant in variants:
            if variant != reference:
                comparison = comparison.with_columns(
                    (pl.col(variant) - pl.col(reference)).alias(f"delta_{variant}_vs_{reference}")
                )
    order = results.select("benchmark", "metric").unique(maintain_order=True)
    return order.join(comparison, on=["benchmark", "metric"], how="left").select(
        ["benchmark", "metric", *variants, *[c for c in comparison.columns if c.startswith(("delta_", "n_items_"))]]
    )


def _format(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _markdown(results: pl.DataFrame, comparison: pl.DataFrame, variants: list[str],
              distribution: pl.DataFrame) -> str:
    lines = ["## Benchmark comparison", ""]
    header = ["benchmark", "metric", *variants, "n_items"]
    deltas = [c for c in comparison.columns if c.startswith("delta_")]
    header += [c.removeprefix("delta_").replace("_vs_", " vs ") for c in deltas]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in comparison.iter_rows(named=True):
        counts = sorted({row[f"n_items_{v}"] for v in variants if row.get(f"n_items_{v}") is not None})
        cells = [row["benchmark"], row["metric"] + (" (lower is better)" if row["metric"] in LOWER_IS_BETTER else "")]
        cells += [_format(row[v]) for v in variants]
        cells.append("/".join(str(c) for c in counts))
        cells += [_format(row[d], signed=True) for d in deltas]
        lines.append("| " + " | ".join(cells) + " |")
    seconds = results.group_by("model_variant", "benchmark").agg(pl.col("seconds").first()).group_by(
        "model_variant").agg(pl.col("seconds").sum())
    lines += ["", "Evaluation time: " + ", ".join(
        f"{v} {seconds.filter(pl.col('model_variant') == v)['seconds'][0]:.0f} s" for v in variants) + "."]
    if distribution.height:
        lines += ["", "## Prompts per cluster (expert group that answered)", "",
                  "| benchmark | cluster | prompts | share |", "|---|---|---|---|"]
        for row in distribution.iter_rows(named=True):
            lines.append(f"| {row['benchmark']} | {row['cluster']} | {row['n_prompts']} | {row['share']:.0%} |")
    return "\n".join(lines) + "\n"


def _bar_chart(results: pl.DataFrame, benchmark: str, variants: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.filter(pl.col("benchmark") == benchmark)
    metrics = rows["metric"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values, errors = [], []
        for variant in variants:
            match = rows.filter((pl.col("metric") == metric) & (pl.col("model_variant") == variant))
            values.append(match["value"][0] if match.height else float("nan"))
            stderr = match["stderr"][0] if match.height else None
            errors.append(stderr if stderr is not None else 0.0)
        axis.bar(variants, values, yerr=errors, color=[f"C{i}" for i in range(len(variants))], capsize=3)
        axis.set_title(f"{benchmark}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""),
                       fontsize=9)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()
