"""The benchmark report's charts: each benchmark's scores per model with their intervals, and the paired
differences with theirs."""

from __future__ import annotations

import io

import polars as pl

from moce_model.evaluation.compare import (
    metric_label,
)


def bar_chart_png(results: pl.DataFrame, benchmark: str, variants: list[str]) -> bytes:
    """One panel per metric: each variant's value with its 95% interval as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.filter(pl.col("benchmark") == benchmark)
    metrics = rows["metric"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values, below, above, counts = [], [], [], set()
        for variant in variants:
            match = rows.filter((pl.col("metric") == metric) & (pl.col("model_variant") == variant))
            row = match.row(0, named=True) if match.height else None
            value = row["value"] if row else float("nan")
            values.append(value)
            has_interval = row is not None and row["ci_low"] is not None and row["ci_high"] is not None
            below.append(value - row["ci_low"] if has_interval else 0.0)
            above.append(row["ci_high"] - value if has_interval else 0.0)
            if row:
                counts.add(row["n_items"])
        axis.bar(variants, values, yerr=[below, above], color=[f"C{i}" for i in range(len(variants))], capsize=3)
        n = "/".join(str(c) for c in sorted(counts))
        axis.set_title(f"{benchmark}: {metric_label(metric)}\nn = {n}, 95% interval", fontsize=8)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def differences_chart_png(differences: pl.DataFrame) -> bytes | None:
    """One panel per metric: every paired difference with its 95% interval, a line at 0; the differences
    whose interval excludes 0 in colour, the others grey."""
    compared = differences.filter(pl.col("ci_low").is_not_null())
    if compared.height == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = compared["metric"].unique(maintain_order=True).to_list()
    heights = [compared.filter(pl.col("metric") == m).height for m in metrics]
    figure, axes = plt.subplots(len(metrics), 1, figsize=(9, 0.28 * sum(heights) + 1.2 * len(metrics)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, metric in zip(axes[:, 0], metrics):
        rows = compared.filter(pl.col("metric") == metric).sort("variant", "reference", "benchmark", descending=True)
        positions = list(range(rows.height))
        for position, row in zip(positions, rows.iter_rows(named=True)):
            colour = "C3" if row["significant"] else "0.6"
            axis.errorbar(row["difference"], position, xerr=[[row["difference"] - row["ci_low"]],
                                                             [row["ci_high"] - row["difference"]]],
                          fmt="o", color=colour, capsize=2, markersize=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(positions, [f"{r['variant']} − {r['reference']}  {r['benchmark']} (n={r['n_items']})"
                                    for r in rows.iter_rows(named=True)], fontsize=7)
        axis.set_title(f"{metric_label(metric)}: paired difference, 95% interval (red: excludes 0)", fontsize=8)
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # long row labels
    plt.close(figure)
    return buffer.getvalue()
