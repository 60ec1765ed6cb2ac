"""The comparison report: every score with n and interval, differences paired on items with their interval and
verdict, the average over benchmarks, charts, prompts per cluster. Built from constructed per-item scores whose
answers are known, through the same functions the pipeline uses."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import numpy as np
import polars as pl
import pytest

from moce_model.evaluation.benchmarks import BenchmarkOutcome, MetricValue, item_metric
from moce_model.evaluation.compare import comparisons
from moce_model.evaluation.k_comparison import k_comparison
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.provenance import (
    NOT_TRAINED,
    RunProvenance,
    model_training_precision,
    source_revision,
    training_precision,
)
from moce_model.evaluation.report import build_report, cluster_distribution
from moce_model.evaluation.runner import (
    ITEM_SCORES_SCHEMA,
    evaluate_model,
    item_scores_table,
    results_table,
)
from moce_model.evaluation.suites import BenchmarkSpec
from tests.evaluation.test_eval_fixtures import build_model, build_tokenizer

N_LOSS, N_EXACT = 200, 32
RNG = np.random.default_rng(0)
PESC_LOSS = RNG.uniform(0.5, 2.0, N_LOSS)
LOSS_IDS = [f"synthetic_arithmetic/{i}" for i in range(N_LOSS)]
EXACT_IDS = LOSS_IDS[:N_EXACT]


def _outcomes(exact: list[float], loss: np.ndarray, python: list[float]) -> list[BenchmarkOutcome]:
    return [
        BenchmarkOutcome("synthetic_arithmetic", [item_metric("exact_match", EXACT_IDS, exact),
                                                  item_metric("heldout_loss", LOSS_IDS, list(loss))], N_LOSS),
        BenchmarkOutcome("synthetic_python", [item_metric("pass@1", [f"py/{i}" for i in range(len(python))], python)],
                         len(python)),
    ]


def _variant(name: str, exact: list[float], loss: np.ndarray, python: list[float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    outcomes = _outcomes(exact, loss, python)
    return results_table(name, outcomes), item_scores_table(name, outcomes)


# pesc gets items 0-7 right; moce the same plus 8-11 (4 more wins, no losses: not significant at n = 32) and a
# held-out loss lower by 0.1 on every item (± 0.05 noise: significant); base is 6 wins behind pesc (significant).
PESC = _variant("pesc", [1.0] * 8 + [0.0] * 24, PESC_LOSS, [1.0, 0.0, 1.0, 0.0])
MOCE = _variant("moce", [1.0] * 12 + [0.0] * 20, PESC_LOSS - 0.1 + RNG.normal(0, 0.05, N_LOSS), [1.0, 1.0, 1.0, 0.0])
BASE = _variant("base", [1.0] * 2 + [0.0] * 30, PESC_LOSS + 1.0 + RNG.normal(0, 0.3, N_LOSS), [0.0, 0.0, 1.0, 0.0])
ALL = [MOCE, BASE, PESC]


def _report(variants=ALL):
    return build_report([table for table, _ in variants], [scores for _, scores in variants])


def _difference(report, metric: str, variant: str, reference: str) -> dict:
    rows = report.differences.filter((pl.col("metric") == metric) & (pl.col("variant") == variant)
                                     & (pl.col("reference") == reference))
    assert rows.height == 1, (metric, variant, reference)
    return rows.row(0, named=True)


def test_comparison_has_variants_as_columns_with_value_interval_and_n():
    comparison = _report().comparison
    assert comparison.columns[:3] == ["benchmark", "metric", "base"]
    assert [c for c in comparison.columns if c in ("base", "pesc", "moce")] == ["base", "pesc", "moce"]
    row = comparison.filter(pl.col("metric") == "exact_match").row(0, named=True)
    assert row["moce"] == pytest.approx(12 / 32) and row["n_items_moce"] == N_EXACT
    assert row["moce_ci_low"] < 12 / 32 < row["moce_ci_high"]
    loss = comparison.filter(pl.col("metric") == "heldout_loss").row(0, named=True)
    assert loss["n_items_pesc"] == N_LOSS and loss["pesc_ci_low"] < loss["pesc"] < loss["pesc_ci_high"]


def test_paired_differences_intervals_and_verdicts():
    report = _report()
    loss = _difference(report, "heldout_loss", "moce", "pesc")
    assert loss["n_items"] == N_LOSS and loss["difference"] == pytest.approx(-0.1, abs=0.01)
    assert loss["ci_high"] < 0 and loss["significant"] and loss["verdict"] == "moce better"
    assert loss["method"] == "paired bootstrap BCa"
    # The paired interval is narrow (per-item noise 0.05) although the losses themselves spread over 0.5-2.0.
    assert loss["ci_high"] - loss["ci_low"] < 0.03
    assert loss["mdd"] == pytest.approx(2.8016 * 0.05 / np.sqrt(N_LOSS), rel=0.15)

    four_wins = _difference(report, "exact_match", "moce", "pesc")
    assert four_wins["difference"] == pytest.approx(4 / 32) and four_wins["method"] == "bonett-price"
    assert four_wins["ci_low"] < 0 < four_wins["ci_high"] and not four_wins["significant"]
    assert four_wins["verdict"] == "no significant difference"
    six_wins = _difference(report, "exact_match", "pesc", "base")
    assert six_wins["ci_low"] > 0 and six_wins["verdict"] == "pesc better"
    assert _difference(report, "heldout_loss", "moce", "base")["verdict"] == "moce better"
    assert report.differences.filter((pl.col("variant") == "base")).height == 0  # no mirrored base − pesc


def test_markdown_bolds_only_significant_differences_and_says_no_significant_difference():
    markdown = _report().markdown
    lines = {line.split(" | ")[2] + " " + line.split(" | ")[1]: line for line in markdown.splitlines()
             if line.startswith("| synthetic_") and " − " in line}
    not_significant = lines["moce − pesc exact_match"]
    assert "no significant difference" in not_significant and "**" not in not_significant
    assert "| 32 |" in not_significant and "+0.125 [" in not_significant
    significant = lines["moce − pesc heldout_loss ↓"]
    assert "**-0.1" in significant and "moce better" in significant and "| 200 |" in significant
    assert "Wilson" in markdown and "MDD" in markdown and "(z₀.₉₇₅ + z₀.₈) · s_d / √n" in markdown
    # Each score cell: value [low, high]; the n column.
    assert "| synthetic_arithmetic | exact_match | 32 | 0.062 [" in markdown


def test_each_variant_is_compared_with_pesc_and_base_without_mirrored_pairs():
    assert comparisons(["base", "dense_adapter", "pesc", "moce"]) == [
        ("dense_adapter", "pesc"), ("dense_adapter", "base"), ("pesc", "base"), ("moce", "pesc"), ("moce", "base")]
    assert comparisons(["moce"]) == []
    only_moce = _report([MOCE])
    assert only_moce.differences.height == 0 and "## Paired differences" not in only_moce.markdown


def test_pairs_use_only_items_both_models_answered():
    fewer_table, fewer_scores = _variant("pesc", [1.0] * 8 + [0.0] * 24, PESC_LOSS, [1.0, 0.0, 1.0, 0.0])
    fewer_scores = fewer_scores.filter(~pl.col("item_id").is_in(LOSS_IDS[150:]))
    report = build_report([MOCE[0], fewer_table], [MOCE[1], fewer_scores])
    assert _difference(report, "heldout_loss", "moce", "pesc")["n_items"] == 150
    no_scores = build_report([MOCE[0], PESC[0]], [])
    row = _difference(no_scores, "heldout_loss", "moce", "pesc")
    assert row["verdict"] == "no per-item scores: not compared" and row["ci_low"] is None


def test_paper_average_is_the_mean_over_benchmarks_with_interval_and_paired_difference():
    average = _report().paper_average
    assert average["benchmarks"][0] == "synthetic_arithmetic exact_match, synthetic_python pass@1"
    models = {row["variant"]: row for row in average.filter(pl.col("reference").is_null()).iter_rows(named=True)}
    assert models["moce"]["value"] == pytest.approx((12 / 32 + 3 / 4) / 2)
    assert models["pesc"]["value"] == pytest.approx((8 / 32 + 2 / 4) / 2)
    assert models["moce"]["n_items"] == N_EXACT + 4 and models["moce"]["n_benchmarks"] == 2
    assert models["moce"]["ci_low"] < models["moce"]["value"] < models["moce"]["ci_high"]
    difference = average.filter((pl.col("variant") == "moce") & (pl.col("reference") == "pesc")).row(0, named=True)
    assert difference["value"] == pytest.approx(models["moce"]["value"] - models["pesc"]["value"])
    # Neither benchmark's moce − pesc difference is significant, and neither is their average's.
    assert difference["ci_low"] < 0 < difference["ci_high"] and not difference["significant"]
    assert difference["mdd"] > difference["value"]
    assert "## Paper average" in _report().markdown


def test_paper_average_leaves_out_losses_and_benchmarks_without_item_scores():
    aggregate_only = BenchmarkOutcome("mmlu", [MetricValue("acc", 0.4, 0.01)], 1000)
    tables = [pl.concat([table, results_table(name, [aggregate_only])])
              for (table, _), name in zip(ALL, ["moce", "base", "pesc"])]
    report = build_report(tables, [scores for _, scores in ALL])
    assert "mmlu" not in report.paper_average["benchmarks"][0]
    mmlu = report.comparison.filter(pl.col("benchmark") == "mmlu").row(0, named=True)
    assert mmlu["moce_ci_low"] == pytest.approx(0.4 - 1.96 * 0.01, abs=1e-4)  # lm-eval's stderr, normal interval
    assert _difference(report, "acc", "moce", "pesc")["verdict"] == "no per-item scores: not compared"


def test_charts_have_error_bars_and_cluster_distribution_comes_from_item_scores():
    report = _report()
    assert set(report.bar_chart_pngs) == {"synthetic_arithmetic", "synthetic_python"}
    assert all(png.startswith(b"\x89PNG") for png in report.bar_chart_pngs.values())
    assert report.differences_chart_png.startswith(b"\x89PNG")
    assert build_report([MOCE[0], PESC[0]], []).differences_chart_png is None  # nothing paired, no chart
    routed = MOCE[1].with_columns(
        pl.when(pl.col("benchmark") == "synthetic_python").then(0).otherwise(1).cast(pl.Int64).alias("cluster"))
    with_clusters = build_report([MOCE[0], PESC[0]], [routed, PESC[1]])
    assert with_clusters.cluster_distribution.rows() == [("synthetic_arithmetic", 1, N_LOSS, 1.0),
                                                         ("synthetic_python", 0, 4, 1.0)]
    # Its markdown row: 4 prompts (tiny), all in cluster 0, none off home (Wilson upper bound 1.96² / (4 + 1.96²)).
    assert ("| synthetic_python | 4 (tiny sample: n = 4) | 0: 4 | 0 | 0 | 0.000 [0.000, 0.490] |"
            in with_clusters.markdown)


def test_cluster_distribution_counts_each_prompt_once_and_skips_unrouted_models():
    def clusters(values):
        return pl.DataFrame([{"benchmark": "synthetic_python", "item_id": f"p/{i}", "cluster": c}
                             for i, c in enumerate(values)], schema={"benchmark": pl.String, "item_id": pl.String,
                                                                     "cluster": pl.Int64})

    routed_moce, routed_ablation, base = clusters([0, 0, 0, 1]), clusters([0, 0, 0, 1]), clusters([None] * 4)
    distribution = cluster_distribution(pl.concat([routed_moce, routed_ablation, base]))
    assert distribution.rows() == [("synthetic_python", 0, 3, 0.75), ("synthetic_python", 1, 1, 0.25)]
    with pytest.raises(ValueError, match="different clusters"):
        cluster_distribution(pl.concat([routed_moce, clusters([1, 0, 0, 1])]))


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        build_report([], [])
    with pytest.raises(ValueError, match="missing column"):
        build_report([MOCE[0].drop("ci_low")], [])
    with pytest.raises(ValueError, match="more than one row"):
        build_report([MOCE[0], MOCE[0]], [])
    with pytest.raises(ValueError, match="more than one score"):
        build_report([MOCE[0]], [MOCE[1], MOCE[1]])
    assert pl.Schema(ITEM_SCORES_SCHEMA) == MOCE[1].schema


def test_k_comparison_puts_one_model_at_each_k_side_by_side():
    # The same model at k=3 and k=2 (the first with one benchmark fewer): one column per k, in order of k.
    at_3 = MOCE[0].filter(pl.col("benchmark") == "synthetic_arithmetic")
    comparison = k_comparison({3: at_3, 2: PESC[0].with_columns(pl.lit("moce").alias("model_variant"))})
    table = comparison.table
    assert [c for c in table.columns if c.startswith("k=") and c[2:].isdigit()] == ["k=2", "k=3"]
    assert table.height == PESC[0].height
    exact = table.filter(pl.col("metric") == "exact_match").row(0, named=True)
    assert exact["k=2"] == pytest.approx(8 / 32) and exact["k=3"] == pytest.approx(12 / 32)
    assert exact["n_items_k=2"] == exact["n_items_k=3"] == N_EXACT
    assert exact["k=3_ci_low"] < exact["k=3"] < exact["k=3_ci_high"]
    python = table.filter(pl.col("benchmark") == "synthetic_python").row(0, named=True)
    assert python["k=3"] is None and python["k=2"] == pytest.approx(0.5)
    assert "| benchmark | metric | n | k=2 | k=3 |" in comparison.markdown
    assert "heldout_loss ↓" in comparison.markdown and "| – |" in comparison.markdown


def test_k_comparison_refuses_what_is_not_one_model_per_k():
    with pytest.raises(ValueError, match="at least one k"):
        k_comparison({})
    with pytest.raises(ValueError, match=r"k=2: one model expected, found \['moce', 'pesc'\]"):
        k_comparison({2: pl.concat([MOCE[0], PESC[0]])})
    with pytest.raises(ValueError, match="k=4: missing column"):
        k_comparison({2: MOCE[0], 4: MOCE[0].drop("ci_high")})


# ------------------------------------------------------------------------------------------ provenance

PROVENANCE = RunProvenance(commit="0123abc", seed=0, evaluation_dtype="float32", evaluation_device="cpu",
                           evaluation_autocast="bfloat16",
                           training_precision={"base": NOT_TRAINED, "moce": "bf16", "pesc": "bf16"},
                           machine="x86_64 Linux, CPU computes bf16 natively (AVX512-BF16 / AMX)",
                           expert_layouts={"pesc": (1, 16), "moce": (4, 4)})


def _report_contents(report) -> tuple:
    return (report.markdown, report.comparison.rows(), report.differences.rows(), report.paper_average.rows(),
            report.bar_chart_pngs, report.differences_chart_png)


def test_the_report_states_commit_seed_and_precision_and_is_the_same_for_the_same_inputs():
    report = build_report([t for t, _ in ALL], [s for _, s in ALL], provenance=PROVENANCE)
    run_section = report.markdown.split("## Benchmark comparison")[0]
    assert "commit 0123abc" in run_section and "seed: 0" in run_section
    assert "training precision: base not trained, moce bf16, pesc bf16" in run_section
    assert "evaluation: float32 on cpu, matmuls in bfloat16 (autocast)" in run_section
    assert "computes bf16 natively" in run_section
    assert "experts (groups x experts per group): pesc 1 x 16 = 16, moce 4 x 4 = 16 (budget-matched" in run_section
    unmatched = dataclasses.replace(PROVENANCE, expert_layouts={"pesc": (1, 8), "moce": (4, 4)}).markdown()
    assert "NOT budget-matched" in unmatched
    again = build_report([t for t, _ in ALL], [s for _, s in ALL], provenance=PROVENANCE)
    assert _report_contents(again) == _report_contents(report)  # numbers, tables and figures, byte for byte
    # and another precision is a different report
    other = build_report([t for t, _ in ALL], [s for _, s in ALL], provenance=dataclasses.replace(
        PROVENANCE, training_precision={"base": NOT_TRAINED, "moce": "float32", "pesc": "float32"}))
    assert other.markdown != report.markdown


def test_evaluating_a_model_twice_with_the_same_seed_gives_the_same_report():
    """Seeded held-out items, greedy generation, the same weights: the item scores agree exactly, so does the
    report (its evaluation time aside, the one measured quantity)."""
    tokenizer = build_tokenizer()
    specs = [BenchmarkSpec(name="synthetic_arithmetic", kind="synthetic", domain="arithmetic", n_items=3,
                           n_loss_items=6, max_new_tokens=6),
             BenchmarkSpec(name="synthetic_text", kind="synthetic", domain="text", n_items=2, n_loss_items=4,
                           max_new_tokens=6)]

    def run():
        lm = MoCELM.from_objects(build_model(tokenizer, seed=1), tokenizer, batch_size=4)
        result = evaluate_model(None, "base", specs, lm=lm, seed=3, batch_size=4)
        return result.table.with_columns(seconds=pl.lit(0.0)), result.item_scores

    (first_table, first_scores), (second_table, second_scores) = run(), run()
    assert first_scores.rows() == second_scores.rows() and first_scores.height == 3 + 6 + 2 + 4
    assert first_table.rows() == second_table.rows()
    assert _report_contents(build_report([first_table], [first_scores], provenance=PROVENANCE)) == \
        _report_contents(build_report([second_table], [second_scores], provenance=PROVENANCE))


def test_training_precision_comes_from_the_training_record(tmp_path):
    assert training_precision({"training_config": {"bf16": True}}, "x") == "bf16"
    assert training_precision({"training_config": {"bf16": False}}, "x") == "float32"
    assert training_precision({"training_config": {"bf16": True, "qlora": True}}, "x") == "QLoRA NF4 + bf16"
    with pytest.raises(ValueError, match="m/training.json: no training_config.bf16"):
        training_precision({"training_config": {}}, "m/training.json")
    assert model_training_precision(None) == model_training_precision(tmp_path) == NOT_TRAINED
    (tmp_path / "training.json").write_text(json.dumps({"training_config": {"bf16": False, "qlora": False}}))
    assert model_training_precision(tmp_path) == "float32"


def test_source_revision_names_the_commit_and_marks_uncommitted_changes(tmp_path):
    assert source_revision(tmp_path).startswith("unknown (")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert source_revision(tmp_path) == commit
    (tmp_path / "f.txt").write_text("b")
    assert source_revision(tmp_path) == f"{commit} + uncommitted changes"
