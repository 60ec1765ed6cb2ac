"""The study's table: per-layout means with two-level bootstrap intervals, paired differences against the
reference layouts, their markdown and figure."""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from moce_model.evaluation.compare import (
    CONDITION_MARK,
    comparisons,
    condition_label,
    format_value,
    metric_label,
    side_name,
    split_condition_label,
    verdict,
)
from moce_model.evaluation.metrics import (
    HELDOUT_LOSS,
    PARTS_LOSS,
)
from moce_model.evaluation.stats import (
    CONFIDENCE,
    bonett_price,
    is_binary,
    wilson_interval,
)
from moce_model.study.config import REFERENCE_LAYOUTS, STUDY_SCORES_SCHEMA

INTERVAL_METHOD = ("two-level percentile bootstrap (seeds, then items, crossed); for 0/1 scores at least as wide as "
                   "the Wilson (mean) or Bonett–Price (paired difference) interval on the items")

# Metrics compared within each row, item by item: metric -> the metric it is compared with on the same items
# (a blended prompt's loss against the mean loss of its parts asked alone).
WITHIN_ROW_COMPARISONS: dict[str, str] = {HELDOUT_LOSS: PARTS_LOSS}


def two_level_bootstrap(scores: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a seeds x items score matrix with its 95% two-level percentile interval: each resample draws the
    seeds with replacement and, independently, the items with replacement, and averages the crossed cells.

    The mean over a resample is (seed counts)ᵀ · S · (item counts) / (n_seeds · n_items), so all resamples are
    two matrix products, without materialising the resampled matrices."""
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"scores must be a non-empty seeds x items matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("scores must be finite")
    n_seeds, n_items = matrix.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples).astype(np.float64)
    item_counts = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=resamples).astype(np.float64)
    means = np.einsum("bs,si,bi->b", seed_counts, matrix, item_counts) / (n_seeds * n_items)
    alpha = 1 - CONFIDENCE
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(matrix.mean()), float(low), float(high)


def _mean_interval(matrix: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """The two-level interval; for 0/1 scores widened to at least the Wilson interval of the pooled proportion
    on n_items trials. A resample of 0/1 items cannot vary when every item scored the same (0 of 10 correct
    would give [0, 0]); the items, not the seeds' repeats of them, are the independent trials."""
    mean, low, high = two_level_bootstrap(matrix, resamples, seed)
    if is_binary(matrix):
        wilson_low, wilson_high = wilson_interval(mean, matrix.shape[1])
        low, high = min(low, wilson_low), max(high, wilson_high)
    return mean, low, high


def _difference_interval(first: np.ndarray, second: np.ndarray, resamples: int, seed: int
                         ) -> tuple[float, float, float]:
    """The two-level interval of first − second; for 0/1 scores widened to at least the Bonett–Price interval
    of the pooled won / lost rates on n_items pairs (same reason as `_mean_interval`)."""
    mean, low, high = two_level_bootstrap(first - second, resamples, seed)
    if is_binary(first) and is_binary(second):
        won, lost = float(((first == 1) & (second == 0)).mean()), float(((first == 0) & (second == 1)).mean())
        n_items = first.shape[1]
        bp_low, bp_high, _ = bonett_price(won * n_items, lost * n_items, n_items)
        low, high = min(low, bp_low), max(high, bp_high)
    return mean, low, high


def score_matrix(scores: pl.DataFrame, layout: str, benchmark: str, metric: str,
                 items: Sequence[str] | None = None) -> tuple[list[int], list[str], np.ndarray]:
    """(seeds, item ids, seeds x items matrix) of one layout on one metric; every seed must have scored the same
    items (the runs of a layout evaluate one held-out set)."""
    subset = scores.filter((pl.col("layout") == layout) & (pl.col("benchmark") == benchmark)
                           & (pl.col("metric") == metric))
    if subset.height == 0:
        raise ValueError(f"no scores of {layout!r} on {benchmark} {metric}")
    wide = subset.pivot(on="item_id", index="seed", values="score").sort("seed")
    item_ids = list(items) if items is not None else sorted(c for c in wide.columns if c != "seed")
    missing = [i for i in item_ids if i not in wide.columns]
    if missing:
        raise ValueError(f"{layout!r} {benchmark} {metric}: no scores for items {missing[:5]}")
    matrix = wide.select(item_ids).to_numpy().astype(np.float64)
    if np.isnan(matrix).any():
        raise ValueError(f"{layout!r} {benchmark} {metric}: the seeds did not score the same items")
    return wide["seed"].to_list(), item_ids, matrix


def _check_scores(scores: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in STUDY_SCORES_SCHEMA if c not in scores.columns]
    if missing:
        raise ValueError(f"study scores lack column(s) {missing}")
    scores = scores.select(list(STUDY_SCORES_SCHEMA)).cast(STUDY_SCORES_SCHEMA)
    repeated = scores.group_by("layout", "seed", "benchmark", "metric", "item_id").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"more than one score per (layout, seed, benchmark, metric, item): {repeated.rows()[:3]}")
    return scores


AGGREGATE_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "benchmark": pl.String(), "metric": pl.String(), "n_seeds": pl.Int64(),
    "n_items": pl.Int64(), "mean": pl.Float64(), "ci_low": pl.Float64(), "ci_high": pl.Float64(),
    "seed_sd": pl.Float64(),
}

# `reference_metric`: the reference row's metric, `metric` but for a comparison within a row
# (WITHIN_ROW_COMPARISONS, where `reference` is the row itself).
DIFFERENCE_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "reference": pl.String(), "benchmark": pl.String(), "metric": pl.String(),
    "reference_metric": pl.String(), "n_seeds": pl.Int64(), "n_items": pl.Int64(), "difference": pl.Float64(), "ci_low": pl.Float64(),
    "ci_high": pl.Float64(), "significant": pl.Boolean(), "verdict": pl.String(),
}


def aggregate(scores: pl.DataFrame, resamples: int, seed: int = 0) -> pl.DataFrame:
    """Per (layout, benchmark, metric): the mean over seeds and items, its two-level 95% interval, and the
    standard deviation of the per-seed means (how much training seeds alone move the number)."""
    scores = _check_scores(scores)
    rows = []
    for layout, benchmark, metric in scores.select("layout", "benchmark", "metric").unique(maintain_order=True).rows():
        seeds, items, matrix = score_matrix(scores, layout, benchmark, metric)
        mean, low, high = _mean_interval(matrix, resamples, seed)
        seed_means = matrix.mean(axis=1)
        rows.append({"layout": layout, "benchmark": benchmark, "metric": metric, "n_seeds": len(seeds),
                     "n_items": len(items), "mean": mean, "ci_low": low, "ci_high": high,
                     "seed_sd": float(seed_means.std(ddof=1)) if len(seeds) > 1 else None})
    return pl.DataFrame(rows, schema=AGGREGATE_SCHEMA)


def paired_matrices(scores: pl.DataFrame, layout: str, reference: str, benchmark: str, metric: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(layout, reference) seeds x items matrices to subtract, on the items both scored. Runs of the same seed are paired (they
    trained on the same sample of rows in the same order); a reference with a single run (the base model) is
    compared with every seed's run."""
    _, items, _ = score_matrix(scores, layout, benchmark, metric)
    ref_seeds, ref_items, _ = score_matrix(scores, reference, benchmark, metric)
    common = [i for i in items if i in set(ref_items)]
    if not common:
        raise ValueError(f"{layout!r} and {reference!r} share no items on {benchmark} {metric}")
    seeds, _, matrix = score_matrix(scores, layout, benchmark, metric, common)
    ref_seeds, _, ref_matrix = score_matrix(scores, reference, benchmark, metric, common)
    if len(ref_seeds) == 1:
        return matrix, np.broadcast_to(ref_matrix, matrix.shape)
    shared = [s for s in seeds if s in ref_seeds]
    if not shared:
        raise ValueError(f"{layout!r} and {reference!r} share no seed on {benchmark} {metric}")
    return matrix[[seeds.index(s) for s in shared]], ref_matrix[[ref_seeds.index(s) for s in shared]]


def within_row_matrices(scores: pl.DataFrame, label: str, benchmark: str, metric: str, reference_metric: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(metric, reference metric) seeds x items matrices of one row to subtract: the same runs, the same items."""
    seeds, items, matrix = score_matrix(scores, label, benchmark, metric)
    ref_seeds, ref_items, _ = score_matrix(scores, label, benchmark, reference_metric)
    if ref_seeds != seeds or ref_items != items:
        raise ValueError(f"{label!r} {benchmark}: {metric} and {reference_metric} were not scored on the same "
                         f"seeds and items ({len(seeds)} x {len(items)} against {len(ref_seeds)} x {len(ref_items)})")
    return matrix, score_matrix(scores, label, benchmark, reference_metric, items)[2]


def paired_differences(scores: pl.DataFrame, resamples: int, seed: int = 0,
                       references: Sequence[str] = REFERENCE_LAYOUTS,
                       counterparts: Mapping[str, str] | None = None,
                       own_items: Collection[str] = ()) -> pl.DataFrame:
    """Every pair of `comparisons` (each row against `pesc` and `base`, a layout against its counterpart, a
    condition against the clean runs unless it is one of `own_items`), paired on items (and seeds), with the
    two-level interval of the mean difference on every (benchmark, metric) both rows have, then within every row
    each metric of WITHIN_ROW_COMPARISONS against its reference metric on the same items; "no significant
    difference" where the interval covers 0."""
    scores = _check_scores(scores)
    labels = scores["layout"].unique(maintain_order=True).to_list()
    metrics_of = {label: scores.filter(pl.col("layout") == label).select("benchmark", "metric").unique(
        maintain_order=True).rows() for label in labels}
    rows = []

    def add(layout: str, reference: str, benchmark: str, metric: str, reference_metric: str,
            first: np.ndarray, second: np.ndarray) -> None:
        difference, low, high = _difference_interval(first, second, resamples, seed)
        significant = low > 0 or high < 0
        rows.append({"layout": layout, "reference": reference, "benchmark": benchmark, "metric": metric,
                     "reference_metric": reference_metric, "n_seeds": first.shape[0], "n_items": first.shape[1],
                     "difference": difference, "ci_low": low, "ci_high": high, "significant": significant,
                     "verdict": verdict(significant, difference, metric, _sides(layout, reference, metric, reference_metric))})

    for layout, reference in comparisons(labels, references, counterparts, own_items):
        shared = set(metrics_of[reference])
        for benchmark, metric in [m for m in metrics_of[layout] if m in shared]:
            add(layout, reference, benchmark, metric, metric,
                *paired_matrices(scores, layout, reference, benchmark, metric))
    for label in labels:
        for benchmark, metric in metrics_of[label]:
            reference_metric = WITHIN_ROW_COMPARISONS.get(metric)
            if reference_metric is not None and (benchmark, reference_metric) in metrics_of[label]:
                add(label, label, benchmark, metric, reference_metric,
                    *within_row_matrices(scores, label, benchmark, metric, reference_metric))
    return pl.DataFrame(rows, schema=DIFFERENCE_SCHEMA)


def _sides(layout: str, reference: str, metric: str, reference_metric: str) -> tuple[str, str]:
    """The two sides a verdict names: the metrics within one row, else the rows (or their conditions)."""
    if reference_metric not in (None, metric):
        return metric, reference_metric
    return side_name(layout, reference), side_name(reference, layout)


@dataclass(frozen=True)
class StudyTable:
    aggregate: pl.DataFrame
    differences: pl.DataFrame
    parameters: pl.DataFrame
    markdown: str
    figure_png: bytes
    missing_runs: list[str] = field(default_factory=list)
    missing_conditions: list[str] = field(default_factory=list)


PARAMETERS_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "groups": pl.Int64(), "experts_per_group": pl.Int64(), "router_top_k": pl.Int64(),
    "total_trainable": pl.Int64(), "active_trainable": pl.Int64(), "note": pl.String(),
}


def _compared_metrics(difference: Mapping[str, Any]) -> str:
    label = metric_label(difference["metric"])
    reference_metric = difference["reference_metric"]
    return label if reference_metric == difference["metric"] else f"{label} − {reference_metric}"


def study_markdown(aggregated: pl.DataFrame, differences: pl.DataFrame, parameters: pl.DataFrame,
                   missing_runs: Sequence[str] = (), condition_notes: Mapping[str, str] | None = None,
                   missing_conditions: Sequence[str] = ()) -> str:
    """The table (one row per entry of `parameters`: layouts, then layouts under each condition), the notes on
    the conditions shown (`condition_notes`: condition -> markdown), and the paired differences."""
    metrics = aggregated.select("benchmark", "metric").unique(maintain_order=True).sort("benchmark", "metric").rows()
    cells = {(r["layout"], r["benchmark"], r["metric"]): r for r in aggregated.iter_rows(named=True)}
    header = ["layout", "trainable (total)", "trainable (active/token)", "seeds"] + [
        f"{b} {metric_label(m)}" for b, m in metrics]
    lines = ["## Study: mean over seeds and items [95% interval]", "",
             f"Interval: {INTERVAL_METHOD}. n = seeds x items per cell (items in the column header's row below).",
             "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    items_row = ["items", "", "", ""]
    for b, m in metrics:
        counts = {cells[k]["n_items"] for k in cells if k[1:] == (b, m)}
        items_row.append("/".join(str(c) for c in sorted(counts)))
    lines.append("| " + " | ".join(items_row) + " |")
    for row in parameters.iter_rows(named=True):
        layout = row["layout"]
        seeds = {cells[k]["n_seeds"] for k in cells if k[0] == layout}
        values = []
        for b, m in metrics:
            cell = cells.get((layout, b, m))
            values.append("–" if cell is None else
                          f"{format_value(cell['mean'])} [{format_value(cell['ci_low'])}, {format_value(cell['ci_high'])}]")
        name = layout + (f" ({row['note']})" if row["note"] else "")
        lines.append("| " + " | ".join([name, f"{row['total_trainable']:,}", f"{row['active_trainable']:,}",
                                         "/".join(str(s) for s in sorted(seeds)) or "–", *values]) + " |")
    shown_conditions = {split_condition_label(label)[1] for label in parameters["layout"]} - {None}
    notes = {c: text for c, text in (condition_notes or {}).items() if c in shown_conditions}
    if notes:
        lines += ["", f"Rows `layout{CONDITION_MARK}condition` score the same trained runs again under an "
                      "evaluation-only condition (never retrained), on the clean rows' items unless the condition "
                      "says otherwise:", ""]
        lines += [f"- `{CONDITION_MARK.strip()}{condition}`: {text}" for condition, text in notes.items()]
    order = {condition: rank for rank, condition in enumerate([None, *(condition_notes or {})])}
    ranked = differences.with_columns(pl.Series("rank", [order.get(split_condition_label(label)[1], len(order))
                                                         for label in differences["layout"]], dtype=pl.Int64))
    lines += ["", "## Paired differences (same items; same seed, or every seed against the one base run)", "",
              "A row compared with itself compares two of its metrics on the same items and runs.", "",
              "| layout | reference | benchmark | metric | seeds x items | difference [95% interval] | verdict |",
              "|---|---|---|---|---|---|---|"]
    for row in ranked.sort("rank", "reference", "benchmark", "metric", maintain_order=True).iter_rows(named=True):
        lines.append(
            f"| {row['layout']} | {row['reference']} | {row['benchmark']} | {_compared_metrics(row)} | "
            f"{row['n_seeds']} x {row['n_items']} | {format_value(row['difference'], True)} "
            f"[{format_value(row['ci_low'], True)}, {format_value(row['ci_high'], True)}] | {row['verdict']} |")
    if missing_runs:
        lines += ["", f"Runs not materialized (left out of this table): {', '.join(missing_runs)}"]
    if missing_conditions:
        lines += ["", f"Runs with conditions not scored (left out of those rows; in brackets when only some): "
                      f"{', '.join(missing_conditions)}"]
    return "\n".join(lines) + "\n"


def study_figure_png(aggregated: pl.DataFrame, layout_order: Sequence[str]) -> bytes:
    """One panel per (benchmark, metric): each layout's mean with its two-level interval. A layout's rows under the
    evaluation-only conditions sit beside its clean row, one colour per condition (one legend for the figure), so
    that a panel has one tick per layout however many conditions there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(split_condition_label(label)[0] for label in layout_order))
    conditions = list(dict.fromkeys(split_condition_label(label)[1] for label in layout_order))
    colours = {condition: f"C{i}" for i, condition in enumerate(conditions)}
    markers = dict(zip(conditions, "osD^vP*X"))
    metrics = aggregated.select("benchmark", "metric").unique().sort("benchmark", "metric").rows()
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False)
    for axis, (benchmark, metric) in zip(axes.flat, metrics):
        subset = {r["layout"]: r for r in aggregated.filter(
            (pl.col("benchmark") == benchmark) & (pl.col("metric") == metric)).iter_rows(named=True)}
        shown = [split_condition_label(label) for label in layout_order if label in subset]
        names = [layout for layout in layouts if any(layout == shown_layout for shown_layout, _ in shown)]
        here = [condition for condition in conditions if any(condition == c for _, c in shown)]
        width = 0.8 / len(here)
        for j, condition in enumerate(here):
            points = [(names.index(layout), subset[condition_label(layout, condition)])
                      for layout, c in shown if c == condition]
            offset = (j - (len(here) - 1) / 2) * width
            axis.errorbar([x + offset for x, _ in points], [r["mean"] for _, r in points],
                          yerr=[[r["mean"] - r["ci_low"] for _, r in points], [r["ci_high"] - r["mean"] for _, r in points]],
                          fmt=markers[condition], color=colours[condition], capsize=2, markersize=4, elinewidth=1)
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_xlim(-0.6, len(names) - 0.4)
        axis.set_title(f"{benchmark}\n{metric_label(metric)}", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    if len(conditions) > 1:
        handles = [plt.Line2D([], [], marker=markers[c], color=colours[c], linestyle="") for c in conditions]
        labels = ["clean" if c is None else f"{CONDITION_MARK.strip()}{c}" for c in conditions]
        figure.legend(handles, labels, loc="upper right", ncol=len(conditions), fontsize=8, frameon=False)
    figure.suptitle("Study: mean over seeds and items, 95% two-level bootstrap interval", fontsize=10, x=0.3)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _rows_of_labels(parameters: pl.DataFrame, labels: Sequence[str], conditions: Sequence[str]) -> pl.DataFrame:
    """One parameter row per row label present: the layouts in `parameters`' order, then the same layouts under
    each condition (in `conditions`' order, then any other condition present); a condition row carries its
    layout's counts (the same trained model)."""
    present = set(labels)
    others = [c for c in dict.fromkeys(split_condition_label(label)[1] for label in labels)
              if c is not None and c not in conditions]
    rows = []
    for condition in [None, *conditions, *others]:
        for row in parameters.iter_rows(named=True):
            label = condition_label(row["layout"], condition)
            if label in present:
                rows.append({**row, "layout": label, "note": row["note"] if condition is None else ""})
    return pl.DataFrame(rows, schema=PARAMETERS_SCHEMA)


def build_study_table(scores: pl.DataFrame, parameters: pl.DataFrame, resamples: int,
                      missing_runs: Sequence[str] = (), counterparts: Mapping[str, str] | None = None,
                      condition_notes: Mapping[str, str] | None = None,
                      missing_conditions: Sequence[str] = (), own_items: Collection[str] = ()) -> StudyTable:
    """The study's table (aggregate + paired differences + parameter counts) and its figure.

    `scores` may hold rows of evaluation-only conditions (layout `condition_label(layout, condition)`), shown after
    the layouts, in the order of `condition_notes` (condition -> what it is, in markdown); `counterparts`: a
    layout -> the layout it differs from in one thing (the token router, or cluster vs hash), which it is also
    compared with; `own_items`:
    the conditions scored on items of their own, not compared with the clean runs."""
    parameters = parameters.select(list(PARAMETERS_SCHEMA)).cast(PARAMETERS_SCHEMA)
    aggregated = aggregate(scores, resamples)
    differences = paired_differences(scores, resamples, counterparts=counterparts, own_items=own_items)
    shown = _rows_of_labels(parameters, aggregated["layout"].unique(maintain_order=True).to_list(),
                            list(condition_notes or {}))
    markdown = study_markdown(aggregated, differences, shown, missing_runs, condition_notes, missing_conditions)
    figure = study_figure_png(aggregated, shown["layout"].to_list())
    return StudyTable(aggregated, differences, shown, markdown, figure, list(missing_runs), list(missing_conditions))
