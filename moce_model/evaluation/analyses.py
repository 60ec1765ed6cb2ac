"""The paper's analyses on the evaluated (held-out) prompts: expert use per benchmark, group, expert and layer;
which cluster each benchmark's prompts were routed to; how the prompts routed off their benchmark's usual
cluster score; a 2-D map of the evaluated prompts' embeddings.

Definitions used throughout:

- A benchmark's **home cluster** is the cluster most of its evaluated prompts were routed to (ties: the lowest
  cluster id). It is measured on the evaluation prompts themselves, not on the training data's clusters.
- A prompt is **off-home** when its cluster is not its benchmark's home cluster: the router sent it to the
  experts that usually answer other benchmarks. Off-home is not necessarily wrong (a GSM8K question that
  reads like a unit conversion may be better served by that cluster), which is what the scores tell.
- Samples of fewer than `TINY_SAMPLE` items are labelled as tiny: their intervals are wide and their means
  are anecdotes, not estimates to compare.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import polars as pl

from moce_model.common.plots import cluster_projection_plot
from moce_model.evaluation.compare import REFERENCES
from moce_model.evaluation.stats import (
    independent_difference,
    mean_estimate,
    paired_difference,
)

TINY_SAMPLE = 10

CONTINGENCY_SCHEMA: dict[str, pl.DataType] = {
    "benchmark": pl.String(), "n_prompts": pl.Int64(), "home_cluster": pl.Int64(), "n_home": pl.Int64(),
    "n_off_home": pl.Int64(), "off_home_share": pl.Float64(), "ci_low": pl.Float64(), "ci_high": pl.Float64(),
    "clusters": pl.String(),
}
OFF_HOME_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "model_variant": pl.String(), "benchmark": pl.String(), "metric": pl.String(), "home_cluster": pl.Int64(),
    "n_home": pl.Int64(), "home_mean": pl.Float64(), "home_ci_low": pl.Float64(), "home_ci_high": pl.Float64(),
    "n_off_home": pl.Int64(), "off_home_mean": pl.Float64(), "off_home_ci_low": pl.Float64(),
    "off_home_ci_high": pl.Float64(), "difference": pl.Float64(), "difference_ci_low": pl.Float64(),
    "difference_ci_high": pl.Float64(), "difference_method": pl.String(), "reference": pl.String(),
    "n_off_home_vs_reference": pl.Int64(), "off_home_vs_reference": pl.Float64(),
    "off_home_vs_reference_ci_low": pl.Float64(), "off_home_vs_reference_ci_high": pl.Float64(),
    "n_home_vs_reference": pl.Int64(), "home_vs_reference": pl.Float64(),
    "home_vs_reference_ci_low": pl.Float64(), "home_vs_reference_ci_high": pl.Float64(),
    "tiny_sample": pl.Boolean(),
}
EXPERT_USE_SUMMARY_SCHEMA: dict[str, pl.DataType] = {
    "model_variant": pl.String(), "benchmark": pl.String(), "group": pl.Int64(), "expert": pl.Int64(),
    "share": pl.Float64(), "ci_low": pl.Float64(), "ci_high": pl.Float64(), "share_min_over_layers": pl.Float64(),
    "share_max_over_layers": pl.Float64(), "tokens_per_layer": pl.Int64(), "layers": pl.Int64(),
    "n_prompts": pl.Int64(), "n_items": pl.Int64(),
}


# ------------------------------------------------------------------------------------------------ expert use


def expert_use_summary(expert_use: pl.DataFrame) -> pl.DataFrame:
    """Per (variant, benchmark, group, expert): the share of the group's assignments that went to the expert,
    pooled over layers (every layer sees the same tokens, so this is also the mean of the layers' shares), its
    95% interval over the group's prompts (null where the table has none), and its smallest and largest value
    over the layers."""
    if expert_use.height == 0:
        return pl.DataFrame(schema=EXPERT_USE_SUMMARY_SCHEMA)
    keys = ["model_variant", "benchmark", "group"]
    pooled = expert_use.group_by(*keys, "expert").agg(
        pl.col("assignments").sum(), pl.col("share").min().alias("share_min_over_layers"),
        pl.col("share").max().alias("share_max_over_layers"), pl.col("group_tokens").max().alias("tokens_per_layer"),
        pl.col("layer").n_unique().alias("layers"), pl.col("n_items").first(), pl.col("n_prompts").first(),
        pl.col("pooled_ci_low").first().alias("ci_low"), pl.col("pooled_ci_high").first().alias("ci_high"),
    )
    pooled = pooled.with_columns((pl.col("assignments") / pl.col("assignments").sum().over(keys)).alias("share"))
    return pooled.select(list(EXPERT_USE_SUMMARY_SCHEMA)).cast(EXPERT_USE_SUMMARY_SCHEMA).sort(*keys, "expert")


def routed_expert_use(expert_use: pl.DataFrame) -> pl.DataFrame:
    """The rows of variants whose groups have more than one expert (with one expert the share is always 1)."""
    if expert_use.height == 0:
        return expert_use
    several = expert_use.group_by("model_variant").agg(pl.col("expert").max()).filter(pl.col("expert") > 0)
    return expert_use.filter(pl.col("model_variant").is_in(several["model_variant"].to_list()))


def expert_use_heatmap(expert_use: pl.DataFrame, variant: str) -> bytes:
    """One panel per benchmark: layers (rows) × (group, expert) columns of the groups that received the
    benchmark's tokens, coloured by the expert's share of its group's assignments at that layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = expert_use.filter(pl.col("model_variant") == variant)
    if rows.height == 0:
        raise ValueError(f"no expert use recorded for {variant!r}")
    benchmarks = rows["benchmark"].unique(maintain_order=True).to_list()
    layers = int(rows["layer"].max()) + 1
    columns = 3 if len(benchmarks) > 4 else len(benchmarks)
    panel_rows = -(-len(benchmarks) // columns)
    figure, axes = plt.subplots(panel_rows, columns, figsize=(4.2 * columns, 0.16 * layers * panel_rows + 1.8 * panel_rows),
                                squeeze=False)
    image = None
    for axis, benchmark in zip(axes.flat, benchmarks):
        subset = rows.filter(pl.col("benchmark") == benchmark)
        pairs = subset.select("group", "expert").unique().sort("group", "expert").rows()
        index = {pair: column for column, pair in enumerate(pairs)}
        matrix = np.full((layers, len(pairs)), np.nan)
        for layer, group, expert, share in subset.select("layer", "group", "expert", "share").iter_rows():
            matrix[layer, index[(group, expert)]] = share
        image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        for column in range(1, len(pairs)):
            if pairs[column][0] != pairs[column - 1][0]:
                axis.axvline(column - 0.5, color="white", linewidth=1.5)  # a group boundary
        axis.set_xticks(range(len(pairs)), [f"g{g}e{e}" for g, e in pairs], rotation=90, fontsize=6)
        axis.set_yticks(range(0, layers, max(1, layers // 8)))
        axis.tick_params(axis="y", labelsize=6)
        axis.set_ylabel("layer", fontsize=7)
        tokens = subset.group_by("layer", "group").agg(pl.col("group_tokens").first()).group_by("layer").agg(
            pl.col("group_tokens").sum())["group_tokens"].max()
        axis.set_title(f"{benchmark}\n{subset['n_items'][0]} prompts, {tokens} tokens per layer", fontsize=8)
    for axis in list(axes.flat)[len(benchmarks):]:
        axis.axis("off")
    figure.suptitle(f"{variant}: share of each group's tokens per expert (g = group, e = expert), held-out prompts",
                    fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the group's assignments")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- contingency


def prompt_clusters(item_scores: pl.DataFrame) -> pl.DataFrame:
    """benchmark, item_id, cluster: the cluster of each evaluated prompt, once per prompt (every routed variant
    routes a prompt with the same router; different clusters for one prompt are an error)."""
    routed = item_scores.filter(pl.col("cluster").is_not_null()).select("benchmark", "item_id", "cluster").unique()
    conflicting = routed.group_by("benchmark", "item_id").len().filter(pl.col("len") > 1)
    if conflicting.height:
        raise ValueError(f"prompts routed to different clusters by different models: {conflicting.drop('len').rows()[:5]}")
    return routed.sort("benchmark", "item_id")


def routing_contingency(item_scores: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(counts, summary). counts: benchmark × cluster → prompts (one column per cluster, `cluster_<c>`).
    summary: per benchmark its home cluster and the off-home prompts' count and share with a Wilson interval
    (CONTINGENCY_SCHEMA)."""
    clusters = prompt_clusters(item_scores)
    if clusters.height == 0:
        return pl.DataFrame(), pl.DataFrame(schema=CONTINGENCY_SCHEMA)
    counts = clusters.group_by("benchmark", "cluster").len().sort("cluster")
    wide = counts.pivot(on="cluster", index="benchmark", values="len", sort_columns=True).fill_null(0)
    wide = wide.rename({c: f"cluster_{c}" for c in wide.columns if c != "benchmark"})
    rows = []
    for benchmark in clusters["benchmark"].unique(maintain_order=True).to_list():
        per_cluster = dict(counts.filter(pl.col("benchmark") == benchmark).select("cluster", "len").rows())
        home = min(per_cluster, key=lambda c: (-per_cluster[c], c))
        total = sum(per_cluster.values())
        off = total - per_cluster[home]
        share = mean_estimate([1.0] * off + [0.0] * (total - off))
        rows.append({"benchmark": benchmark, "n_prompts": total, "home_cluster": home, "n_home": per_cluster[home],
                     "n_off_home": off, "off_home_share": share.value, "ci_low": share.ci_low, "ci_high": share.ci_high,
                     "clusters": ", ".join(f"{c}: {n}" for c, n in sorted(per_cluster.items()))})
    order = {b: i for i, b in enumerate(item_scores["benchmark"].unique(maintain_order=True).to_list())}
    summary = pl.DataFrame(rows, schema=CONTINGENCY_SCHEMA).sort(pl.col("benchmark").replace_strict(order))
    wide = wide.sort(pl.col("benchmark").replace_strict(order))
    return wide, summary


def contingency_heatmap(counts: pl.DataFrame) -> bytes:
    """Benchmarks × clusters: each cell the share of the benchmark's prompts routed to the cluster (its count
    written in the cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in counts.columns if c != "benchmark"]
    matrix = counts.select(columns).to_numpy().astype(float)
    share = matrix / matrix.sum(axis=1, keepdims=True)
    figure, axis = plt.subplots(figsize=(1.4 + 0.8 * len(columns), 1.0 + 0.45 * counts.height))
    image = axis.imshow(share, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(columns)), [c.replace("cluster_", "cluster ") for c in columns], fontsize=7)
    axis.set_yticks(range(counts.height), [f"{b} (n={int(n)})" for b, n in zip(counts["benchmark"], matrix.sum(axis=1))],
                    fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                  color="white" if share[i, j] > 0.6 else "black")
    axis.set_title("Evaluation prompts per cluster (count; colour: share of the benchmark)", fontsize=8)
    figure.colorbar(image, ax=axis, label="share")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def off_home_scores(item_scores: pl.DataFrame, contingency: pl.DataFrame,
                    references: Sequence[str] = REFERENCES) -> pl.DataFrame:
    """For every variant that routes by cluster and every (benchmark, metric) with off-home prompts: the mean
    score of the home and of the off-home prompts with their intervals, their difference (Newcombe / bootstrap,
    two disjoint sets of items), and — against the first reference present — the variant's paired difference
    on the off-home prompts and on the home prompts (whether routing off home costs more than the items'
    difficulty explains: both models face the same items)."""
    rows = []
    if contingency.height == 0:
        return pl.DataFrame(rows, schema=OFF_HOME_SCORES_SCHEMA)
    clusters = prompt_clusters(item_scores)
    home_of = dict(contingency.select("benchmark", "home_cluster").rows())
    variants = item_scores.filter(pl.col("cluster").is_not_null())["model_variant"].unique(maintain_order=True).to_list()
    present = set(item_scores["model_variant"].unique().to_list())
    reference = next((r for r in references if r in present), None)
    for variant in variants:
        scored = item_scores.filter(pl.col("model_variant") == variant)
        for benchmark, metric in scored.select("benchmark", "metric").unique(maintain_order=True).rows():
            home = home_of.get(benchmark)
            if home is None:
                continue
            subset = scored.filter((pl.col("benchmark") == benchmark) & (pl.col("metric") == metric))
            subset = subset.drop("cluster").join(clusters.filter(pl.col("benchmark") == benchmark).drop("benchmark"),
                                                 on="item_id")
            at_home = subset.filter(pl.col("cluster") == home)
            off = subset.filter(pl.col("cluster") != home)
            if off.height == 0 or at_home.height == 0:
                continue
            home_estimate, off_estimate = mean_estimate(at_home["score"]), mean_estimate(off["score"])
            difference = independent_difference(off["score"], at_home["score"])
            row = {
                "model_variant": variant, "benchmark": benchmark, "metric": metric, "home_cluster": home,
                "n_home": at_home.height, "home_mean": home_estimate.value, "home_ci_low": home_estimate.ci_low,
                "home_ci_high": home_estimate.ci_high, "n_off_home": off.height, "off_home_mean": off_estimate.value,
                "off_home_ci_low": off_estimate.ci_low, "off_home_ci_high": off_estimate.ci_high,
                "difference": difference.difference, "difference_ci_low": difference.ci_low,
                "difference_ci_high": difference.ci_high, "difference_method": difference.method,
                "tiny_sample": off.height < TINY_SAMPLE or at_home.height < TINY_SAMPLE,
            }
            if reference is not None and reference != variant:
                reference_scores = dict(item_scores.filter(
                    (pl.col("model_variant") == reference) & (pl.col("benchmark") == benchmark)
                    & (pl.col("metric") == metric)).select("item_id", "score").rows())
                row["reference"] = reference
                for name, part in (("off_home", off), ("home", at_home)):
                    pairs = [(s, reference_scores[i]) for i, s in part.select("item_id", "score").rows()
                             if i in reference_scores]
                    row[f"n_{name}_vs_reference"] = len(pairs)
                    if not pairs:
                        continue
                    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
                    if len(pairs) < 2 and not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
                        row[f"{name}_vs_reference"] = float(a[0] - b[0])
                        continue
                    paired = paired_difference(a, b)
                    row[f"{name}_vs_reference"] = paired.difference
                    row[f"{name}_vs_reference_ci_low"] = paired.ci_low
                    row[f"{name}_vs_reference_ci_high"] = paired.ci_high
            rows.append(row)
    return pl.DataFrame(rows, schema=OFF_HOME_SCORES_SCHEMA)


# ------------------------------------------------------------------------------------------------ 2-D map


def prompt_map(prompt_embeddings: pl.DataFrame) -> tuple[bytes | None, int]:
    """(PNG, number of prompts): the evaluated prompts' router embeddings on their first two principal axes
    (PCA, as the training data's map in `cluster_assignments`), coloured by cluster and by benchmark. Each
    prompt once (the routed variants share one router); None without embeddings."""
    if prompt_embeddings.height == 0:
        return None, 0
    prompts = prompt_embeddings.unique(["benchmark", "item_id"], keep="first", maintain_order=True)
    if prompts.height < 3:
        return None, prompts.height  # two points have one principal axis

    vectors = np.asarray(prompts["embedding"].to_list(), dtype=np.float32)
    png = cluster_projection_plot(vectors, prompts["cluster"].to_numpy(), prompts["benchmark"].to_list(),
                                  title="Evaluation prompts (router embeddings)")
    return png, prompts.height
