"""The analyses on the evaluated prompts, on constructed data with a known answer: the cluster × benchmark
contingency and its off-home prompts, how those score (against the home prompts and paired against the
reference), the expert-use summary, and the report sections they make."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from moce_model.evaluation.analyses import (
    expert_use_summary,
    off_home_scores,
    routing_contingency,
)
from moce_model.evaluation.benchmarks import BenchmarkOutcome, item_metric
from moce_model.evaluation.report import build_report
from moce_model.evaluation.runner import (
    expert_use_table,
    item_scores_table,
    results_table,
)

# "arith": 12 prompts, 10 routed to cluster 0 (home), 2 to cluster 1 (off-home). "code": 3 prompts routed to
# clusters 2, 1, 1: home 1. "tie": one prompt in cluster 3, one in cluster 2: home 2 (the lower id).
ARITH_IDS = [f"arith/{i}" for i in range(12)]
CLUSTERS = {**{i: 0 for i in ARITH_IDS[:10]}, **{i: 1 for i in ARITH_IDS[10:]},
            "code/0": 2, "code/1": 1, "code/2": 1, "tie/0": 3, "tie/1": 2}
# moce answers every home arith prompt and neither off-home one; pesc answers all twelve. The loss of the
# off-home prompts is higher by 0.5 (± noise) for moce, equal to pesc's elsewhere.
MOCE_EXACT = [1.0] * 10 + [0.0] * 2
PESC_EXACT = [1.0] * 12
RNG = np.random.default_rng(0)
PESC_LOSS = RNG.uniform(0.5, 1.5, 12)
MOCE_LOSS = PESC_LOSS + np.r_[np.zeros(10), [0.5, 0.5]]


def _scores(variant: str, exact: list[float], loss: np.ndarray, routed: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    outcomes = [
        BenchmarkOutcome("arith", [item_metric("exact_match", ARITH_IDS, exact),
                                   item_metric("heldout_loss", ARITH_IDS, list(loss))], 12),
        BenchmarkOutcome("code", [item_metric("pass@1", ["code/0", "code/1", "code/2"], [1.0, 0.0, 1.0])], 3),
        BenchmarkOutcome("tie", [item_metric("exact_match", ["tie/0", "tie/1"], [0.0, 1.0])], 2),
    ]
    scores = item_scores_table(variant, outcomes)
    if routed:
        scores = scores.with_columns(pl.col("item_id").replace_strict(CLUSTERS, return_dtype=pl.Int64).alias("cluster"))
    return results_table(variant, outcomes), scores


MOCE = _scores("moce", MOCE_EXACT, MOCE_LOSS, routed=True)
CLUSTER_ONLY = _scores("cluster_only", MOCE_EXACT, MOCE_LOSS, routed=True)
PESC = _scores("pesc", PESC_EXACT, PESC_LOSS, routed=False)
ALL_SCORES = pl.concat([MOCE[1], CLUSTER_ONLY[1], PESC[1]])


def test_contingency_counts_each_prompt_once_with_home_cluster_and_off_home_share():
    counts, summary = routing_contingency(ALL_SCORES)
    assert counts.columns == ["benchmark", "cluster_0", "cluster_1", "cluster_2", "cluster_3"]
    assert counts.rows() == [("arith", 10, 2, 0, 0), ("code", 0, 2, 1, 0), ("tie", 0, 0, 1, 1)]
    rows = {r["benchmark"]: r for r in summary.iter_rows(named=True)}
    assert [rows[b]["home_cluster"] for b in ("arith", "code", "tie")] == [0, 1, 2]
    assert [rows[b]["n_off_home"] for b in ("arith", "code", "tie")] == [2, 1, 1]
    arith = rows["arith"]
    # 2 of 12: Wilson 95% interval, closed form.
    z = 1.959963984540054
    centre, half = (2 + z**2 / 2) / (12 + z**2), z * np.sqrt(2 * 10 / 12 + z**2 / 4) / (12 + z**2)
    assert arith["off_home_share"] == pytest.approx(2 / 12)
    assert (arith["ci_low"], arith["ci_high"]) == pytest.approx((centre - half, centre + half))
    assert arith["clusters"] == "0: 10, 1: 2"


def test_contingency_rejects_a_prompt_routed_to_two_clusters():
    moved = CLUSTER_ONLY[1].with_columns(pl.when(pl.col("item_id") == "arith/0").then(1).otherwise(pl.col("cluster"))
                                         .alias("cluster"))
    with pytest.raises(ValueError, match="different clusters"):
        routing_contingency(pl.concat([MOCE[1], moved]))


def test_off_home_prompts_score_against_home_ones_and_paired_against_pesc():
    _, summary = routing_contingency(ALL_SCORES)
    table = off_home_scores(ALL_SCORES, summary)
    assert set(table["model_variant"]) == {"moce", "cluster_only"}  # pesc does not route by cluster
    moce = {(r["benchmark"], r["metric"]): r for r in table.filter(pl.col("model_variant") == "moce").iter_rows(named=True)}
    assert set(moce) == {("arith", "exact_match"), ("arith", "heldout_loss"), ("code", "pass@1"), ("tie", "exact_match")}
    exact = moce[("arith", "exact_match")]
    assert (exact["n_home"], exact["n_off_home"], exact["home_mean"], exact["off_home_mean"]) == (10, 2, 1.0, 0.0)
    assert exact["difference"] == -1.0 and exact["difference_ci_high"] < 0  # all 10 against none of 2
    assert exact["tiny_sample"] and exact["reference"] == "pesc"
    # Paired against pesc: both off-home items lost (-1), no home item differs (0).
    assert (exact["n_off_home_vs_reference"], exact["off_home_vs_reference"]) == (2, -1.0)
    assert (exact["n_home_vs_reference"], exact["home_vs_reference"]) == (10, 0.0)
    assert exact["home_vs_reference_ci_low"] < 0 < exact["home_vs_reference_ci_high"]
    loss = moce[("arith", "heldout_loss")]
    assert loss["difference"] == pytest.approx(np.mean(MOCE_LOSS[10:]) - np.mean(MOCE_LOSS[:10]))
    assert loss["off_home_vs_reference"] == pytest.approx(0.5)
    assert loss["home_vs_reference"] == pytest.approx(0.0)
    # One off-home prompt in "code": its mean is its score, with the Wilson interval of 1 item.
    code = moce[("code", "pass@1")]
    assert (code["n_home"], code["n_off_home"], code["off_home_mean"], code["home_mean"]) == (2, 1, 1.0, 0.5)
    assert code["off_home_ci_low"] > 0 and code["off_home_ci_high"] == 1.0


def test_expert_use_summary_pools_the_layers_and_keeps_their_range():
    counts = np.zeros((2, 2, 2), dtype=np.int64)
    counts[0, 1] = [3, 1]
    counts[1, 1] = [1, 3]
    use = expert_use_table("moce", [BenchmarkOutcome("arith", [], 12, expert_use=counts)], top_k=1)
    summary = expert_use_summary(use)
    assert summary.select("group", "expert", "share", "share_min_over_layers", "share_max_over_layers",
                          "tokens_per_layer", "layers").rows() == [(1, 0, 0.5, 0.25, 0.75, 4, 2),
                                                                    (1, 1, 0.5, 0.25, 0.75, 4, 2)]


def test_report_has_the_analyses_sections_and_figures():
    layers = 3
    moce_counts = np.zeros((layers, 4, 4), dtype=np.int64)
    moce_counts[:, 0] = [20, 10, 6, 4]  # top-2: 20 tokens of group 0 per layer
    moce_counts[:, 1] = [1, 1, 1, 1]
    dense_counts = np.zeros((layers, 1, 1), dtype=np.int64)
    dense_counts[:, 0, 0] = 22
    # Per prompt (top-2, two tokens each): six home prompts [2, 1, 1, 0], four [2, 1, 0, 1]; the two off-home
    # prompts [1, 1, 0, 0] and [0, 0, 1, 1]. They add up to the counts above.
    per_prompt = {}
    for i in range(12):
        counts = np.zeros((layers, 4, 4), dtype=np.int64)
        group = 0 if i < 10 else 1
        counts[:, group] = ([2, 1, 1, 0] if i < 6 else [2, 1, 0, 1] if i < 10 else
                            [1, 1, 0, 0] if i == 10 else [0, 0, 1, 1])
        per_prompt[f"arith/{i}"] = counts
    moce_use = expert_use_table("moce", [BenchmarkOutcome("arith", [], 12, expert_use=moce_counts,
                                                          prompt_expert_use=per_prompt)], top_k=2)
    dense_use = expert_use_table("dense_adapter", [BenchmarkOutcome("arith", [], 12, expert_use=dense_counts)], top_k=1)
    report = build_report([MOCE[0], PESC[0], CLUSTER_ONLY[0]], [MOCE[1], PESC[1], CLUSTER_ONLY[1]],
                          [moce_use, dense_use])
    markdown = report.markdown
    for heading in ("## Routing of the evaluation prompts (cluster × benchmark)", "## How off-home prompts score",
                    "## Expert use on the evaluation prompts"):
        assert heading in markdown
    assert "| arith | 12 | 0: 10, 1: 2 | 0 | 2 | 0.167 [" in markdown
    assert "| moce *tiny* | arith | exact_match | 10, 1.000 [" in markdown
    # Group 0 of arith: the 10 home prompts, 20 tokens per layer, shares 20/40, 10/40, 6/40, 4/40 in every layer;
    # every prompt gives experts 0 and 1 the same shares (0.5, 0.25), so resampling prompts cannot move them.
    assert ("| arith | 0 | 10 | 20 | 0.500 [0.500, 0.500] (0.50–0.50) | 0.250 [0.250, 0.250] (0.25–0.25) | 0.150 ["
            in markdown)
    summary = report.expert_use_summary.filter((pl.col("model_variant") == "moce") & (pl.col("group") == 0))
    third = summary.filter(pl.col("expert") == 2).row(0, named=True)
    assert third["ci_low"] < 0.15 < third["ci_high"] and third["n_prompts"] == 10
    assert "| arith | 1 | 2 (tiny sample: n = 2) | 2 |" in markdown
    assert "**dense_adapter**" not in markdown  # one expert: nothing to show
    assert set(report.expert_use_pngs) == {"moce"} and report.expert_use_pngs["moce"].startswith(b"\x89PNG")
    assert report.routing_contingency_png.startswith(b"\x89PNG")
    assert report.off_home_scores.height == 8  # (arith × 2 metrics, code, tie) × (moce, cluster_only)


def test_prompt_map_draws_each_prompt_once_and_the_report_says_it_is_pca():
    from moce_model.evaluation.analyses import prompt_map
    from moce_model.evaluation.runner import PROMPT_EMBEDDINGS_SCHEMA

    rng = np.random.default_rng(0)
    rows = [{"benchmark": "arith" if i < 12 else "code", "item_id": f"p{i}", "cluster": CLUSTERS.get(f"arith/{i}", 1),
             "embedding": rng.normal(size=8).astype(np.float32).tolist()} for i in range(15)]
    embeddings = pl.DataFrame(rows, schema=PROMPT_EMBEDDINGS_SCHEMA)
    png, mapped = prompt_map(pl.concat([embeddings, embeddings]))  # two routed variants, same prompts
    assert mapped == 15 and png.startswith(b"\x89PNG")
    assert prompt_map(embeddings.head(2)) == (None, 2)
    report = build_report([MOCE[0], PESC[0]], [MOCE[1], PESC[1]], [], [embeddings])
    assert "## 2-D map of the evaluation prompts" in report.markdown and "PCA" in report.markdown
    assert "the 15 evaluated prompts" in report.markdown and report.prompt_map_png.startswith(b"\x89PNG")
