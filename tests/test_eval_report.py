"""The comparison report: variants as columns, deltas against pesc and base, one chart per benchmark,
prompts per cluster."""

from __future__ import annotations

import polars as pl
import pytest

from moce_model.evaluation.report import build_report, cluster_distribution
from moce_model.evaluation.runner import ITEM_CLUSTERS_SCHEMA, RESULTS_SCHEMA


def _table(variant: str, values: dict[tuple[str, str], float]) -> pl.DataFrame:
    return pl.DataFrame(
        [{"model_variant": variant, "benchmark": b, "metric": m, "value": v, "n_items": 10,
          "stderr": 0.05 if m != "heldout_loss" else None, "seconds": 3.0} for (b, m), v in values.items()],
        schema=RESULTS_SCHEMA,
    )


def _clusters(benchmark: str, clusters: list[int | None]) -> pl.DataFrame:
    return pl.DataFrame([{"benchmark": benchmark, "item_id": f"{benchmark}/{i}", "cluster": c}
                         for i, c in enumerate(clusters)], schema=ITEM_CLUSTERS_SCHEMA)


TABLES = [
    _table("moce", {("synthetic_arithmetic", "exact_match"): 0.6, ("synthetic_arithmetic", "heldout_loss"): 0.8,
                    ("humaneval", "pass@1"): 0.1}),
    _table("base", {("synthetic_arithmetic", "exact_match"): 0.1, ("synthetic_arithmetic", "heldout_loss"): 1.5,
                    ("humaneval", "pass@1"): 0.1}),
    _table("pesc", {("synthetic_arithmetic", "exact_match"): 0.5, ("synthetic_arithmetic", "heldout_loss"): 0.9,
                    ("humaneval", "pass@1"): 0.0}),
]


def test_comparison_has_variants_as_columns_and_deltas():
    report = build_report(TABLES, [_clusters("humaneval", [None, None])])
    comparison = report.comparison
    assert comparison.columns[:5] == ["benchmark", "metric", "base", "pesc", "moce"]
    row = comparison.filter(pl.col("metric") == "exact_match").row(0, named=True)
    assert row["delta_moce_vs_pesc"] == pytest.approx(0.1)
    assert row["delta_moce_vs_base"] == pytest.approx(0.5)
    assert row["delta_pesc_vs_base"] == pytest.approx(0.4)
    assert "delta_base_vs_pesc" in comparison.columns
    loss = comparison.filter(pl.col("metric") == "heldout_loss").row(0, named=True)
    assert loss["delta_moce_vs_base"] == pytest.approx(-0.7)
    assert comparison.height == 3


def test_markdown_charts_and_missing_reference_variants():
    report = build_report(TABLES, [])
    assert "| benchmark | metric | base | pesc | moce |" in report.markdown
    assert "| synthetic_arithmetic | exact_match | 0.100 | 0.500 | 0.600 | 10 |" in report.markdown
    assert "+0.100" in report.markdown and "lower is better" in report.markdown
    assert set(report.bar_chart_pngs) == {"synthetic_arithmetic", "humaneval"}
    assert all(png.startswith(b"\x89PNG") for png in report.bar_chart_pngs.values())
    only_moce = build_report(TABLES[:1], [])
    assert not [c for c in only_moce.comparison.columns if c.startswith("delta_")]


def test_cluster_distribution_counts_each_prompt_once_and_skips_unrouted_models():
    routed_moce = _clusters("synthetic_python", [0, 0, 0, 1])
    routed_ablation = _clusters("synthetic_python", [0, 0, 0, 1])  # same router, same prompts
    base = _clusters("synthetic_python", [None] * 4)
    distribution = cluster_distribution(pl.concat([routed_moce, routed_ablation, base]))
    assert distribution.rows() == [("synthetic_python", 0, 3, 0.75), ("synthetic_python", 1, 1, 0.25)]
    report = build_report(TABLES, [routed_moce, base])
    assert "| synthetic_python | 0 | 3 | 75% |" in report.markdown
    conflicting = _clusters("synthetic_python", [1, 0, 0, 1])
    with pytest.raises(ValueError, match="different clusters"):
        cluster_distribution(pl.concat([routed_moce, conflicting]))


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        build_report([], [])
    with pytest.raises(ValueError, match="missing column"):
        build_report([TABLES[0].drop("stderr")], [])
    with pytest.raises(ValueError, match="more than one row"):
        build_report([TABLES[0], TABLES[0]], [])
