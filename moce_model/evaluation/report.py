"""The comparison report over all evaluated variants: every score with its n and 95% interval, the differences
between models paired on items (with their interval and minimum detectable difference), the average over
benchmarks that the paper reports as its headline, a bar chart with error bars per benchmark, and the paper's
analyses on the evaluated prompts (`moce_model.evaluation.analyses`): expert use per benchmark, group, expert and
layer; the cluster-vs-benchmark contingency of the prompts; how the prompts routed off their benchmark's home
cluster score.

How each interval is computed is explained in `moce_model.evaluation.stats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from moce_model.evaluation.analyses import (
    OFF_HOME_SCORES_SCHEMA,
    TINY_SAMPLE,
    contingency_heatmap,
    expert_use_heatmap,
    expert_use_summary,
    off_home_scores,
    prompt_map,
    routed_expert_use,
    routing_contingency,
)
from moce_model.evaluation.compare import (
    REFERENCES,
    comparisons,
    format_value,
    metric_label,
    verdict,
    with_interval,
)
from moce_model.evaluation.metrics import LOWER_IS_BETTER, ROUTING_METRICS
from moce_model.evaluation.provenance import RunProvenance
from moce_model.evaluation.report_charts import bar_chart_png, differences_chart_png
from moce_model.evaluation.runner import (
    EXPERT_USE_SCHEMA,
    ITEM_SCORES_SCHEMA,
    PROMPT_EMBEDDINGS_SCHEMA,
    RESULTS_SCHEMA,
)
from moce_model.evaluation.stats import (
    ALPHA,
    POWER,
    average_difference,
    average_estimate,
    is_binary,
    paired_difference,
)
from moce_model.variants import BASE

# Every variant is compared with these, in this order; a reference is not compared with an earlier one
# (`pesc − base` is reported, its mirror `base − pesc` is not).
VARIANT_ORDER: tuple[str, ...] = (BASE, "dense_adapter", "pesc", "moce")
DIFFERENCES_SCHEMA: dict[str, pl.DataType] = {
    "benchmark": pl.String(), "metric": pl.String(), "variant": pl.String(), "reference": pl.String(),
    "n_items": pl.Int64(), "difference": pl.Float64(), "stderr": pl.Float64(), "ci_low": pl.Float64(),
    "ci_high": pl.Float64(), "significant": pl.Boolean(), "mdd": pl.Float64(), "method": pl.String(),
    "verdict": pl.String(),
}
AVERAGE_SCHEMA: dict[str, pl.DataType] = {
    "variant": pl.String(), "reference": pl.String(), "n_benchmarks": pl.Int64(), "n_items": pl.Int64(),
    "value": pl.Float64(), "stderr": pl.Float64(), "ci_low": pl.Float64(), "ci_high": pl.Float64(),
    "significant": pl.Boolean(), "mdd": pl.Float64(), "method": pl.String(), "benchmarks": pl.String(),
}
METHODS_NOTE = (
    "Each cell is the mean over the benchmark's n items and its 95% interval [low, high]: the Wilson score "
    "interval for 0/1 scores (exact match, pass@1), a BCa bootstrap over items for the held-out loss (the mean "
    "over items of each reference answer's mean per-token NLL), value ± 1.96 · stderr for an lm-eval metric "
    "without per-item scores. ↓ marks a metric where lower is better."
)


@dataclass(frozen=True)
class Report:
    markdown: str
    comparison: pl.DataFrame
    differences: pl.DataFrame
    paper_average: pl.DataFrame
    bar_chart_pngs: dict[str, bytes]
    cluster_distribution: pl.DataFrame
    differences_chart_png: bytes | None = None
    expert_use_summary: pl.DataFrame = dataclasses.field(default_factory=pl.DataFrame)
    expert_use_pngs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    routing_counts: pl.DataFrame = dataclasses.field(default_factory=pl.DataFrame)
    routing_contingency: pl.DataFrame = dataclasses.field(default_factory=pl.DataFrame)
    routing_contingency_png: bytes | None = None
    off_home_scores: pl.DataFrame = dataclasses.field(default_factory=lambda: pl.DataFrame(schema=OFF_HOME_SCORES_SCHEMA))
    prompt_map_png: bytes | None = None


def build_report(tables: Sequence[pl.DataFrame], item_scores: Sequence[pl.DataFrame] = (),
                 expert_use: Sequence[pl.DataFrame] = (), prompt_embeddings: Sequence[pl.DataFrame] = (),
                 provenance: RunProvenance | None = None) -> Report:
    """Join per-variant results tables (RESULTS_SCHEMA), per-item scores (ITEM_SCORES_SCHEMA), the expert use
    recorded on the evaluated prompts (EXPERT_USE_SCHEMA) and the routers' embeddings of the evaluated prompts
    (PROMPT_EMBEDDINGS_SCHEMA).

    `comparison`: one row per (benchmark, metric), per variant its value, interval and n. `differences`: every
    variant against each reference variant present, paired on the items both answered. `paper_average`: each
    variant's mean over benchmarks and its difference from the references. The analyses: see
    `moce_model.evaluation.analyses`. `provenance`: the commit, seed, precision and machine, stated first.
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
    scores = _concat_scores(item_scores)
    variants = _ordered_variants(results["model_variant"].unique().to_list())
    comparison = comparison_table(results, variants)
    differences = paired_differences(results, scores, variants)
    average = paper_average(results, scores, variants)
    distribution = cluster_distribution(scores)
    charts = {benchmark: bar_chart_png(results, benchmark, variants)
              for benchmark in results["benchmark"].unique(maintain_order=True).to_list()}
    use = _concat_expert_use(expert_use)
    summary = expert_use_summary(use)
    routed_use = routed_expert_use(use)
    use_pngs = {variant: expert_use_heatmap(routed_use, variant)
                for variant in _ordered_variants(routed_use["model_variant"].unique().to_list())}
    routing_counts, contingency = routing_contingency(scores)
    off_home = off_home_scores(scores, contingency, REFERENCES)
    markdown = (provenance.markdown() + "\n" if provenance else "") + _markdown(
        results, comparison, differences, average, variants, distribution)
    markdown += _analyses_markdown(summary, routed_use, contingency, off_home, scores)
    embeddings = [frame.select(list(PROMPT_EMBEDDINGS_SCHEMA)).cast(PROMPT_EMBEDDINGS_SCHEMA) for frame in prompt_embeddings]
    map_png, mapped = prompt_map(pl.concat(embeddings) if embeddings else pl.DataFrame(schema=PROMPT_EMBEDDINGS_SCHEMA))
    if map_png is not None:
        markdown += (
            "\n## 2-D map of the evaluation prompts\n\n"
            f"The router's embeddings of the {mapped} evaluated prompts that were routed by embedding (each once), "
            "projected on their first two principal axes (PCA, as the training data's map in `cluster_assignments`; "
            "the paper shows t-SNE, which keeps local neighbourhoods and pulls clusters apart, where PCA keeps the "
            "global geometry and is deterministic), coloured by cluster and by benchmark (figure "
            "`prompt_map`). Off-home prompts show up as points of one benchmark's colour inside another cluster.\n"
        )
    return Report(markdown, comparison, differences, average, charts, distribution, differences_chart_png(differences),
                  summary, use_pngs, routing_counts, contingency,
                  contingency_heatmap(routing_counts) if routing_counts.height else None, off_home, map_png)


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


def paired_differences(results: pl.DataFrame, scores: pl.DataFrame, variants: Sequence[str]) -> pl.DataFrame:
    """variant − reference per (benchmark, metric), on the items both answered (DIFFERENCES_SCHEMA)."""
    rows = []
    metrics = results.select("benchmark", "metric").unique(maintain_order=True).rows()
    for variant, reference in comparisons(variants):
        for benchmark, metric in metrics:
            have = results.filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric))["model_variant"]
            if variant not in have or reference not in have:
                continue
            a, b = _paired_scores(scores, benchmark, metric, variant, reference)
            row = {"benchmark": benchmark, "metric": metric, "variant": variant, "reference": reference,
                   "n_items": len(a)}
            if len(a) == 0:
                rows.append({**row, "verdict": "no per-item scores: not compared"})
                continue
            if len(a) < 2 and not (is_binary(a) and is_binary(b)):
                rows.append({**row, "difference": float(a[0] - b[0]), "verdict": "one item: not compared"})
                continue
            result = paired_difference(a, b)
            rows.append({**row, "difference": result.difference, "stderr": result.stderr, "ci_low": result.ci_low,
                         "ci_high": result.ci_high, "significant": result.significant, "mdd": result.mdd,
                         "method": result.method,
                         "verdict": verdict(result.significant, result.difference, metric, (variant, reference))})
    return pl.DataFrame(rows, schema=DIFFERENCES_SCHEMA)


def headline_metrics(results: pl.DataFrame) -> dict[str, str]:
    """benchmark -> the score the paper would average: the benchmark's first metric that is not a loss."""
    chosen: dict[str, str] = {}
    for benchmark, metric in results.select("benchmark", "metric").unique(maintain_order=True).rows():
        if metric not in LOWER_IS_BETTER and metric not in ROUTING_METRICS:
            chosen.setdefault(benchmark, metric)
    return chosen


def paper_average(results: pl.DataFrame, scores: pl.DataFrame, variants: Sequence[str]) -> pl.DataFrame:
    """Each variant's unweighted mean over benchmarks of their headline score, with its interval, and each
    variant's difference from the references, paired on items within each benchmark (intervals: see
    `stats.average_estimate` and `stats.average_difference`). Only benchmarks scored for every variant with
    per-item scores on the same items take part, so that all averages are over the same benchmarks and items."""
    headline = headline_metrics(results)
    included = []
    for benchmark, metric in headline.items():
        per_variant = [_scores_of(scores, benchmark, metric, v) for v in variants]
        ids = [set(s) for s in per_variant]
        if all(ids) and all(i == ids[0] for i in ids):
            included.append((benchmark, metric, sorted(ids[0])))
    rows = []
    if not included:
        return pl.DataFrame(rows, schema=AVERAGE_SCHEMA)

    def per_benchmark(variant: str) -> list[np.ndarray]:
        arrays = []
        for benchmark, metric, ids in included:
            by_id = _scores_of(scores, benchmark, metric, variant)
            arrays.append(np.array([by_id[i] for i in ids]))
        return arrays

    common = {"n_benchmarks": len(included), "n_items": sum(len(ids) for _, _, ids in included),
              "benchmarks": ", ".join(f"{benchmark} {metric}" for benchmark, metric, _ in included)}
    for variant in variants:
        estimate = average_estimate(per_benchmark(variant))
        rows.append({"variant": variant, **common, "value": estimate.value, "stderr": estimate.stderr,
                     "ci_low": estimate.ci_low, "ci_high": estimate.ci_high, "method": estimate.method})
    for variant, reference in comparisons(variants):
        difference = average_difference(per_benchmark(variant), per_benchmark(reference))
        rows.append({"variant": variant, "reference": reference, **common, "value": difference.difference,
                     "stderr": difference.stderr, "ci_low": difference.ci_low, "ci_high": difference.ci_high,
                     "significant": difference.significant, "mdd": difference.mdd, "method": difference.method})
    return pl.DataFrame(rows, schema=AVERAGE_SCHEMA)


def _concat_checked(frames: Sequence[pl.DataFrame], schema: dict, key: Sequence[str], what: str,
                    repeated_what: str) -> pl.DataFrame:
    """The tables of several models as one, in `schema`; a missing column or a repeated `key` is an error."""
    checked = []
    for index, frame in enumerate(frames):
        missing = [c for c in schema if c not in frame.columns]
        if missing:
            raise ValueError(f"{what} {index}: missing column(s) {missing}")
        checked.append(frame.select(list(schema)).cast(schema))
    table = pl.concat(checked) if checked else pl.DataFrame(schema=schema)
    repeated = table.group_by(*key).len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"more than one {repeated_what} {repeated.drop('len').rows()[:5]}")
    return table


def _concat_scores(item_scores: Sequence[pl.DataFrame]) -> pl.DataFrame:
    return _concat_checked(item_scores, ITEM_SCORES_SCHEMA, ("model_variant", "benchmark", "metric", "item_id"),
                           "item scores", "score for (variant, benchmark, metric, item):")


def _concat_expert_use(expert_use: Sequence[pl.DataFrame]) -> pl.DataFrame:
    return _concat_checked(expert_use, EXPERT_USE_SCHEMA, ("model_variant", "benchmark", "layer", "group", "expert"),
                           "expert use", "expert-use row for")


def _scores_of(scores: pl.DataFrame, benchmark: str, metric: str, variant: str) -> dict[str, float]:
    rows = scores.filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric)
                         & (pl.col("model_variant") == variant))
    return dict(zip(rows["item_id"].to_list(), rows["score"].to_list()))


def _paired_scores(scores: pl.DataFrame, benchmark: str, metric: str, variant: str, reference: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    first = _scores_of(scores, benchmark, metric, variant)
    second = _scores_of(scores, benchmark, metric, reference)
    common = sorted(set(first) & set(second))
    return np.array([first[i] for i in common]), np.array([second[i] for i in common])


def _ordered_variants(variants: list[str]) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in variants]
    return known + sorted(v for v in variants if v not in VARIANT_ORDER)


def comparison_table(results: pl.DataFrame, variants: list[str]) -> pl.DataFrame:
    keys = ["benchmark", "metric"]
    comparison = results.select(keys).unique(maintain_order=True)
    for variant in variants:
        rows = results.filter(pl.col("model_variant") == variant).select(
            *keys, pl.col("value").alias(variant), pl.col("ci_low").alias(f"{variant}_ci_low"),
            pl.col("ci_high").alias(f"{variant}_ci_high"), pl.col("n_items").alias(f"n_items_{variant}"),
        )
        comparison = comparison.join(rows, on=keys, how="left", maintain_order="left")
    return comparison


def comparison_lines(comparison: pl.DataFrame, variants: list[str]) -> list[str]:
    """The side-by-side table as markdown lines: per (benchmark, metric) the n and each column's value [95% CI]."""
    header = ["benchmark", "metric", "n", *variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison.iter_rows(named=True):
        counts = sorted({row[f"n_items_{v}"] for v in variants if row.get(f"n_items_{v}") is not None})
        cells = [row["benchmark"], metric_label(row["metric"]), "/".join(str(c) for c in counts)]
        cells += [with_interval(row[v], row[f"{v}_ci_low"], row[f"{v}_ci_high"]) for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _markdown(results: pl.DataFrame, comparison: pl.DataFrame, differences: pl.DataFrame, average: pl.DataFrame,
              variants: list[str], distribution: pl.DataFrame) -> str:
    lines = ["## Benchmark comparison", "", METHODS_NOTE, "", *comparison_lines(comparison, variants)]

    if differences.height:
        lines += [
            "", "## Paired differences", "",
            "variant − reference on the same items, with its 95% interval; **bold** only where the interval "
            "excludes 0 (for the held-out loss a negative difference means the variant is better). Intervals: "
            "Bonett–Price for paired 0/1 scores, BCa bootstrap of the per-item differences otherwise. MDD is the "
            f"minimum detectable difference of the comparison at its n: (z₀.₉₇₅ + z₀.₈) · s_d / √n, the true "
            f"difference a two-sided test at α = {ALPHA:.2f} finds with {POWER:.0%} power, with s_d the standard "
            "deviation of the per-item differences (for 0/1 scores the Bonett–Price adjusted one).", "",
            "| benchmark | metric | comparison | n | difference [95% CI] | MDD | verdict |", "|---|---|---|---|---|---|---|",
        ]
        for row in differences.iter_rows(named=True):
            cell = with_interval(row["difference"], row["ci_low"], row["ci_high"], signed=True)
            if row["significant"]:
                cell = f"**{cell}**"
            lines.append(f"| {row['benchmark']} | {metric_label(row['metric'])} | {row['variant']} − "
                         f"{row['reference']} | {row['n_items']} | {cell} | {format_value(row['mdd'])} | {row['verdict']} |")

    lines += ["", "## Paper average", ""]
    if average.height:
        first = average.row(0, named=True)
        lines += [
            f"The paper's headline number is the mean over its benchmarks. Here: the unweighted mean over the "
            f"{first['n_benchmarks']} benchmarks scored for every model ({first['benchmarks']}; {first['n_items']} "
            "items), each benchmark counted once. 95% interval: the benchmarks' variances add up (they share no "
            "items), with the Price–Bonett adjustment for proportions and Bonett–Price for paired 0/1 "
            "differences; differences are paired on items within each benchmark.", "",
            "| model | average [95% CI] |", "|---|---|",
        ]
        for row in average.filter(pl.col("reference").is_null()).iter_rows(named=True):
            lines.append(f"| {row['variant']} | {with_interval(row['value'], row['ci_low'], row['ci_high'])} |")
        lines += ["", "| comparison | difference [95% CI] | MDD | verdict |", "|---|---|---|---|"]
        for row in average.filter(pl.col("reference").is_not_null()).iter_rows(named=True):
            cell = with_interval(row["value"], row["ci_low"], row["ci_high"], signed=True)
            reading = verdict(row["significant"], row["value"], "average", (row["variant"], row["reference"]))
            lines.append(f"| {row['variant']} − {row['reference']} | {f'**{cell}**' if row['significant'] else cell} "
                         f"| {format_value(row['mdd'])} | {reading} |")
    else:
        lines.append("No benchmark has per-item scores for every model: no average.")

    seconds = results.group_by("model_variant", "benchmark").agg(pl.col("seconds").first()).group_by(
        "model_variant").agg(pl.col("seconds").sum())
    lines += ["", "Evaluation time: " + ", ".join(
        f"{v} {seconds.filter(pl.col('model_variant') == v)['seconds'][0]:.0f} s" for v in variants) + "."]
    return "\n".join(lines) + "\n"


def _tiny(n: int | None) -> str:
    return f" (tiny sample: n = {n})" if n is not None and n < TINY_SAMPLE else ""


def _analyses_markdown(summary: pl.DataFrame, routed_use: pl.DataFrame, contingency: pl.DataFrame,
                       off_home: pl.DataFrame, scores: pl.DataFrame) -> str:
    """The report's routing and expert-use analyses as markdown. Long: one block per analysis, in reading order."""
    lines: list[str] = []
    if contingency.height:
        lines += [
            "", "## Routing of the evaluation prompts (cluster × benchmark)", "",
            "Each evaluated prompt's cluster (the expert group that answered it), once per prompt. A benchmark's "
            "**home cluster** is the cluster most of its evaluated prompts went to (ties: the lowest id), measured "
            "on these prompts, not on the training data; a prompt routed elsewhere is **off-home**. Off-home share "
            f"with its Wilson 95% interval; fewer than {TINY_SAMPLE} prompts are labelled tiny.", "",
            "| benchmark | prompts | prompts per cluster | home cluster | off-home | off-home share [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for row in contingency.iter_rows(named=True):
            lines.append(
                f"| {row['benchmark']} | {row['n_prompts']}{_tiny(row['n_prompts'])} | {row['clusters']} | "
                f"{row['home_cluster']} | {row['n_off_home']} | "
                f"{with_interval(row['off_home_share'], row['ci_low'], row['ci_high'])} |")
        lines += ["", "## How off-home prompts score", ""]
        if off_home.height:
            lines += [
                "Per routed variant, the mean score of the prompts routed to their benchmark's home cluster and of "
                "the off-home ones (95% intervals as above), their difference off-home − home (Newcombe's hybrid "
                "score interval for 0/1 scores, a BCa bootstrap of two independent sets otherwise: different items, "
                "so item difficulty is not controlled), and the variant − reference difference paired on the same "
                "items, separately for off-home and home prompts (Bonett–Price / paired BCa bootstrap): if routing "
                "off home costs the routed model something, its paired difference is lower off home than at home. "
                "Rows marked *tiny* have fewer than "
                f"{TINY_SAMPLE} items on one side: read them as anecdotes.", "",
                "| variant | benchmark | metric | home: n, mean [95% CI] | off-home: n, mean [95% CI] | "
                "off-home − home [95% CI] | vs reference off-home (n) | vs reference home (n) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in off_home.iter_rows(named=True):
                reference = row["reference"]
                label = (" *tiny*" if row["tiny_sample"] else "")
                off_vs = (f"{reference}: {with_interval(row['off_home_vs_reference'], row['off_home_vs_reference_ci_low'], row['off_home_vs_reference_ci_high'], signed=True)} ({row['n_off_home_vs_reference']})"
                          if reference else "–")
                home_vs = (f"{reference}: {with_interval(row['home_vs_reference'], row['home_vs_reference_ci_low'], row['home_vs_reference_ci_high'], signed=True)} ({row['n_home_vs_reference']})"
                           if reference else "–")
                lines.append(
                    f"| {row['model_variant']}{label} | {row['benchmark']} | {metric_label(row['metric'])} | "
                    f"{row['n_home']}, {with_interval(row['home_mean'], row['home_ci_low'], row['home_ci_high'])} | "
                    f"{row['n_off_home']}, {with_interval(row['off_home_mean'], row['off_home_ci_low'], row['off_home_ci_high'])} | "
                    f"{with_interval(row['difference'], row['difference_ci_low'], row['difference_ci_high'], signed=True)} | "
                    f"{off_vs} | {home_vs} |")
        else:
            lines.append("Every evaluated prompt went to its benchmark's home cluster: nothing to compare.")
    if summary.height:
        lines += [
            "", "## Expert use on the evaluation prompts", "",
            "Counted while the evaluation ran, in every layer: each token the model read (prompt, scored reference "
            "answer, generated tokens; not padding) counts once for each of its top-k experts. A cell is the "
            "expert's share of its group's assignments pooled over the layers, its 95% interval from a percentile "
            "bootstrap over the group's prompts (the tokens of one prompt are not independent draws, so the prompt "
            "is the unit resampled; none with fewer than two prompts or for lm-eval tasks), and in parentheses the "
            "smallest and largest share over the layers (a spread, not an interval). Uniform use is 1/E; variants "
            "with one expert per group are left out (their share is 1). Heatmaps per layer: `expert_use_<variant>`.",
        ]
        clusters_of = (scores.filter(pl.col("cluster").is_not_null()).select("benchmark", "item_id", "cluster")
                       .unique().group_by("benchmark", "cluster").len())
        prompts_in_group = {(b, c): n for b, c, n in clusters_of.rows()}
        routed = summary.filter(pl.col("model_variant").is_in(routed_use["model_variant"].unique().to_list()))
        for variant in routed["model_variant"].unique(maintain_order=True).to_list():
            rows = routed.filter(pl.col("model_variant") == variant)
            experts = int(rows["expert"].max()) + 1
            routes_by_cluster = scores.filter((pl.col("model_variant") == variant) & pl.col("cluster").is_not_null()).height > 0
            lines += ["", f"**{variant}** ({experts} experts per group, {rows['layers'][0]} layers)", "",
                      "| benchmark | group | prompts | tokens per layer | "
                      + " | ".join(f"e{e}" for e in range(experts)) + " |",
                      "|---|---|---|---|" + "---|" * experts]
            for (benchmark, group), part in rows.group_by(["benchmark", "group"], maintain_order=True):
                part = part.sort("expert")
                first = part.row(0, named=True)
                if first["n_prompts"] is not None:
                    prompts = first["n_prompts"]
                elif routes_by_cluster:
                    prompts = prompts_in_group.get((benchmark, group), 0)
                elif int(routed.filter((pl.col("model_variant") == variant) & (pl.col("benchmark") == benchmark))["group"].n_unique()) == 1:
                    prompts = first["n_items"]
                else:
                    prompts = None  # random_group without per-prompt counts: the item's group is not recorded
                cells = [f"{with_interval(r['share'], r['ci_low'], r['ci_high'])} "
                         f"({r['share_min_over_layers']:.2f}–{r['share_max_over_layers']:.2f})"
                         for r in part.iter_rows(named=True)]
                lines.append(f"| {benchmark} | {group} | {'–' if prompts is None else str(prompts) + _tiny(prompts)} | "
                             f"{first['tokens_per_layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n" if lines else "")
