"""The k sweep's table: each k's scores side by side, with their intervals and n."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from moce_model.evaluation.report import (
    METHODS_NOTE,
    comparison_lines,
    comparison_table,
)
from moce_model.evaluation.runner import (
    RESULTS_SCHEMA,
)


@dataclass(frozen=True)
class KComparison:
    table: pl.DataFrame
    markdown: str


def k_label(k: int) -> str:
    """The column of k in the k comparison."""
    return f"k={k}"


def k_comparison(results_by_k: Mapping[int, pl.DataFrame]) -> KComparison:
    """One model trained and evaluated at several k (the k sweep), side by side.

    `results_by_k`: per k, that model's results table (RESULTS_SCHEMA). `table`: one row per (benchmark, metric)
    of any k; per k its value, interval and n (columns `k=<k>`, `k=<k>_ci_low`, `k=<k>_ci_high`,
    `n_items_k=<k>`; null where that k has no such row). `markdown`: the same with each value's 95% interval.
    """
    if not results_by_k:
        raise ValueError("k_comparison needs the results of at least one k")
    ks = sorted(results_by_k)
    tables = []
    for k in ks:
        table = results_by_k[k]
        missing = [c for c in RESULTS_SCHEMA if c not in table.columns]
        if missing:
            raise ValueError(f"results table of k={k}: missing column(s) {missing}")
        models = table["model_variant"].unique().to_list()
        if len(models) > 1:
            raise ValueError(f"results table of k={k}: one model expected, found {sorted(models)}")
        tables.append(table.select(list(RESULTS_SCHEMA)).cast(RESULTS_SCHEMA)
                      .with_columns(pl.lit(k_label(k)).alias("model_variant")))
    results = pl.concat(tables)
    repeated = results.group_by("model_variant", "benchmark", "metric").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"more than one row for (k, benchmark, metric): {repeated.drop('len').rows()[:5]}")
    labels = [k_label(k) for k in ks]
    table = comparison_table(results, labels)
    models = sorted({m for t in results_by_k.values() for m in t["model_variant"].unique().to_list()})
    lines = [f"## `{'`, `'.join(models)}` at k = {', '.join(str(k) for k in ks)}", "", METHODS_NOTE, "",
             *comparison_lines(table, labels)]
    return KComparison(table, "\n".join(lines) + "\n")
