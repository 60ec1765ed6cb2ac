"""The study's pieces on constructed data with a known answer: the two-level interval, paired differences,
parameter counts, layouts and the held-out split."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from moce_model.study.config import (
    StudyConfig,
    StudyLayout,
    counterparts,
    heldout_split,
    parse_run_key,
    run_key,
    run_keys,
    study_layouts,
    trainable_parameters,
)
from moce_model.study.run import (
    StudyRunInputs,
    heldout_benchmark_specs,
    run_study_layout,
)
from moce_model.study.table import (
    aggregate,
    build_study_table,
    comparisons,
    paired_differences,
    two_level_bootstrap,
)
from moce_model.training import TrainingConfig


def _crossed_scores(rng, n_seeds, n_items, mean=1.0, seed_sd=0.3, item_sd=0.5, noise_sd=0.2):
    """Score of (seed, item) = mean + seed effect + item effect + noise: the population mean is `mean`."""
    return (mean + rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, item_sd, (1, n_items))
            + rng.normal(0, noise_sd, (n_seeds, n_items)))


def test_two_level_interval_covers_the_truth_where_an_items_only_interval_does_not():
    rng = np.random.default_rng(1)
    replications, covered_two_level, covered_items_only = 200, 0, 0
    for replication in range(replications):
        scores = _crossed_scores(rng, n_seeds=10, n_items=40)
        _, low, high = two_level_bootstrap(scores, resamples=1_000, seed=replication)
        covered_two_level += low <= 1.0 <= high
        # Items only: the seeds' models held fixed, as if the training runs were the variant.
        item_means = scores.mean(axis=0)
        boot = rng.choice(item_means, size=(1_000, item_means.size)).mean(axis=1)
        low, high = np.quantile(boot, [0.025, 0.975])
        covered_items_only += low <= 1.0 <= high
    # Nominal 95%; 200 replications put the estimate within about ±3.5 points of the true coverage.
    assert covered_two_level / replications >= 0.90
    assert covered_items_only / replications < 0.85


def test_two_level_interval_known_answers():
    constant = np.full((3, 20), 0.25)
    assert two_level_bootstrap(constant, 500) == (0.25, 0.25, 0.25)
    # One seed: only the items are resampled, and the interval is the items' percentile bootstrap.
    rng = np.random.default_rng(0)
    one_seed = rng.normal(2.0, 1.0, (1, 400))
    mean, low, high = two_level_bootstrap(one_seed, 4_000)
    standard_error = one_seed.std(ddof=1) / np.sqrt(400)
    assert mean == pytest.approx(one_seed.mean())
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    with pytest.raises(ValueError):
        two_level_bootstrap(np.array([1.0, 2.0]), 10)


def _long(layout, matrix, benchmark="heldout_a", metric="heldout_loss", seeds=None):
    seeds = seeds if seeds is not None else list(range(matrix.shape[0]))
    return pl.DataFrame([
        {"layout": layout, "seed": seeds[s], "benchmark": benchmark, "metric": metric, "item_id": f"i{i}",
         "score": float(matrix[s, i])}
        for s in range(matrix.shape[0]) for i in range(matrix.shape[1])
    ])


def test_paired_differences_have_the_constructed_sign_and_size():
    rng = np.random.default_rng(3)
    pesc = _crossed_scores(rng, 3, 60)
    lower = pesc - 0.3 + rng.normal(0, 0.02, pesc.shape)  # 0.3 lower loss on every item and seed
    same = pesc + rng.normal(0, 0.05, pesc.shape)
    base = _crossed_scores(rng, 1, 60, mean=3.0)
    scores = pl.concat([_long("pesc", pesc), _long("moce/e4", lower), _long("dense_adapter", same),
                        _long("base", base)])
    differences = paired_differences(scores, resamples=2_000)
    row = differences.filter((pl.col("layout") == "moce/e4") & (pl.col("reference") == "pesc")).row(0, named=True)
    assert row["difference"] == pytest.approx(-0.3, abs=0.01)
    assert row["ci_low"] < -0.3 < row["ci_high"] < 0 and row["significant"]
    assert row["verdict"] == "moce/e4 better"  # lower loss is better
    assert (row["n_seeds"], row["n_items"]) == (3, 60)
    row = differences.filter((pl.col("layout") == "dense_adapter") & (pl.col("reference") == "pesc")).row(0, named=True)
    assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == "no significant difference"
    # The base model is one run: every seed's run is compared with it.
    row = differences.filter((pl.col("layout") == "pesc") & (pl.col("reference") == "base")).row(0, named=True)
    assert row["difference"] == pytest.approx(float((pesc - base).mean()))
    assert row["significant"] and row["verdict"] == "pesc better" and row["n_seeds"] == 3
    # A reference is not compared with the earlier reference's mirror (base − pesc is not reported).
    assert differences.filter((pl.col("layout") == "base") & (pl.col("reference") == "pesc")).height == 0


def test_aggregate_counts_seeds_and_items_and_rejects_unequal_items():
    rng = np.random.default_rng(4)
    matrix = _crossed_scores(rng, 3, 10)
    table = aggregate(_long("moce/e2", matrix, seeds=[0, 1, 2]), resamples=500)
    row = table.row(0, named=True)
    assert (row["n_seeds"], row["n_items"]) == (3, 10)
    assert row["mean"] == pytest.approx(matrix.mean())
    assert row["seed_sd"] == pytest.approx(matrix.mean(axis=1).std(ddof=1))
    ragged = _long("moce/e2", matrix).filter(~((pl.col("seed") == 1) & (pl.col("item_id") == "i3")))
    with pytest.raises(ValueError, match="same items"):
        aggregate(ragged, resamples=10)


BASE_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


@pytest.mark.parametrize("name", ["dense_adapter", "pesc", "moce/e2", "moce/e4", "random_group/e4", "cluster_only",
                                  "moce+ac/e4", "pesc+ac"])
def test_trainable_parameter_counts_match_the_built_model(tmp_path, name):
    from moce_model.training import TrainingConfig
    from moce_model.training.model import build_model, count_trainable_parameters
    from tests.tiny_models import save_tiny_llama

    base_dir = save_tiny_llama(tmp_path / "base", hidden_size=64, layers=2)
    config = StudyConfig(adapter_dim=4)
    layout = {layout.name: layout for layout in study_layouts(config)}[name]
    moce_config = layout.moce_config(config, num_clusters=3)
    training = TrainingConfig.demo(lora_r=2)
    model = build_model(base_dir, moce_config, training)
    total, _ = trainable_parameters(moce_config, BASE_CONFIG, training.lora_r, training.lora_targets)
    assert total == count_trainable_parameters(model)


def test_active_parameters_and_matched_budgets():
    config = StudyConfig(adapter_dim=4, router_top_k=2)
    layouts = {layout.name: layout for layout in study_layouts(config)}
    hidden, layers, rank = 64, 2, 4
    counts = {name: trainable_parameters(layouts[name].moce_config(config, num_clusters=3), BASE_CONFIG, 2,
                                         ("q_proj",))
              for name in ("pesc", "moce/e4", "moce/e2", "cluster_only", "dense_adapter")}
    lora = layers * 2 * (hidden + hidden)  # q_proj: r x (in + out) per layer
    # moce/e4: 3 groups x 4 experts; a token uses its group's router (4 x H) and 2 experts.
    assert counts["moce/e4"] == (lora + layers * 3 * (4 * 2 * hidden * rank + 4 * hidden),
                                 lora + layers * (2 * 2 * hidden * rank + 4 * hidden))
    # pesc holds k x 4 = 12 experts in one group: the same total as moce/e4, a larger router per token.
    assert counts["pesc"][0] == counts["moce/e4"][0]
    assert counts["pesc"][1] == lora + layers * (2 * 2 * hidden * rank + 12 * hidden)
    # One adapter, no router: everything trained is active.
    assert counts["dense_adapter"][0] == counts["dense_adapter"][1] == lora + layers * 2 * hidden * rank
    assert counts["cluster_only"] == (lora + layers * 3 * 2 * hidden * rank, lora + layers * 2 * hidden * rank)
    assert trainable_parameters(None, BASE_CONFIG, 2, ("q_proj",)) == (0, 0)


def test_layouts_runs_and_config_mapping():
    config = StudyConfig.from_mapping({"seeds": [0, 1], "experts_per_group_sweep": [1, 2, 4]})
    names = [layout.name for layout in study_layouts(config)]
    # moce with one expert per group is cluster_only's layout: run once, as cluster_only.
    assert names == ["base", "dense_adapter", "pesc", "moce/e2", "moce/e4", "random_group/e4", "cluster_only",
                     "moce+ac/e4", "pesc+ac"]
    keys = run_keys(config)
    assert keys[0] == "base" and "moce/e4/s1" in keys and "moce+ac/e4/s1" in keys and len(keys) == 1 + 8 * 2
    for key in keys:
        layout, seed = parse_run_key(config, key)
        assert (layout.name if seed is None else f"{layout.name}/s{seed}") == key
    with pytest.raises(ValueError, match="not a run"):
        parse_run_key(config, "moce/e4/s7")
    with pytest.raises(ValueError, match="unknown study field"):
        StudyConfig.from_mapping({"seed": [0]})
    without_cluster_only = StudyConfig(variants=("moce",), token_routers=("linear",))
    assert [layout.name for layout in study_layouts(without_cluster_only)] == ["base", "moce/e1", "moce/e2", "moce/e4"]
    assert StudyLayout("moce/e1", "moce", 1).moce_config(config, 3).router_top_k == 1


# The partition keys of the default study before the AC router layouts were added: runs materialized under them
# must keep their keys.
LINEAR_ROUTER_KEYS = [
    "base",
    "dense_adapter/s0", "dense_adapter/s1", "dense_adapter/s2",
    "pesc/s0", "pesc/s1", "pesc/s2",
    "moce/e2/s0", "moce/e2/s1", "moce/e2/s2",
    "moce/e4/s0", "moce/e4/s1", "moce/e4/s2",
    "random_group/e4/s0", "random_group/e4/s1", "random_group/e4/s2",
    "cluster_only/s0", "cluster_only/s1", "cluster_only/s2",
]


def test_ac_router_layouts_only_add_partition_keys():
    assert run_keys(StudyConfig(token_routers=("linear",))) == LINEAR_ROUTER_KEYS
    keys = run_keys(StudyConfig())
    assert keys[:len(LINEAR_ROUTER_KEYS)] == LINEAR_ROUTER_KEYS
    assert keys[len(LINEAR_ROUTER_KEYS):] == ["moce+ac/e4/s0", "moce+ac/e4/s1", "moce+ac/e4/s2",
                                              "pesc+ac/s0", "pesc+ac/s1", "pesc+ac/s2"]
    for key in keys:
        layout, seed = parse_run_key(StudyConfig(), key)
        assert run_key(layout, seed) == key


def test_random_group_is_compared_with_moce_of_the_same_experts():
    config = StudyConfig(adapter_dim=4)
    layouts = {layout.name: layout for layout in study_layouts(config)}
    hashed, clustered = (layouts[n].moce_config(config, num_clusters=3) for n in ("random_group/e4", "moce/e4"))
    # The same groups and experts; only what picks the group differs.
    assert hashed.to_dict() | {"variant": "moce"} == clustered.to_dict()
    labels = ["base", "pesc", "moce/e4", "random_group/e4", "random_group/e4 @noised", "moce/e4 @noised"]
    pairs = comparisons(labels, counterparts=counterparts(config))
    assert ("random_group/e4", "moce/e4") in pairs and ("random_group/e4 @noised", "moce/e4 @noised") in pairs
    # Without moce in the study there is nothing to compare it with.
    assert "random_group/e4" not in counterparts(StudyConfig(variants=("random_group", "pesc")))


def test_ac_router_layouts_match_their_linear_counterparts():
    config = StudyConfig(adapter_dim=4)
    layouts = {layout.name: layout for layout in study_layouts(config)}
    assert counterparts(config) == {"random_group/e4": "moce/e4", "moce+ac/e4": "moce/e4", "pesc+ac": "pesc"}
    for name in ("moce+ac/e4", "pesc+ac"):
        counterpart = counterparts(config)[name]
        ac, linear = (layouts[n].moce_config(config, num_clusters=3) for n in (name, counterpart))
        assert ac.token_router == "ac" and linear.token_router == "linear"
        # Same expert budget and layout: only the router differs.
        assert ac.to_dict() | {"token_router": "linear"} == linear.to_dict()
    assert layouts["pesc+ac"].moce_config(config, num_clusters=3).experts_per_group == 12
    # The other layouts keep the linear router.
    assert {layouts[n].token_router for n in layouts if n not in ("moce+ac/e4", "pesc+ac")} == {"linear"}
    # Without moce or pesc in the study, their AC layouts are not run either.
    only_pesc = StudyConfig(variants=("pesc",))
    assert [layout.name for layout in study_layouts(only_pesc)] == ["base", "pesc", "pesc+ac"]


@pytest.mark.parametrize("values, message", [
    ({"token_routers": ["ac"]}, "must include 'linear'"),
    ({"token_routers": ["linear", "softmax"]}, "softmax"),
    ({"token_routers": ["linear", "ac", "ac"]}, "distinct"),
    ({"experts_per_group_sweep": [1]}, "at least 2 experts per group"),
])
def test_token_router_config_errors_name_the_value(values, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_mapping(values)


def test_heldout_split_is_deterministic_and_per_source():
    instructions = pl.DataFrame({"id": [f"{i:04x}" for i in range(40)][::-1],
                                 "source": ["a"] * 25 + ["b"] * 15})
    split = heldout_split(instructions, rows_per_source=5)
    assert split.group_by("source").agg(pl.col("heldout").sum()).sort("source")["heldout"].to_list() == [5, 5]
    assert split.equals(heldout_split(instructions.sample(fraction=1.0, shuffle=True, seed=2).sort("id", descending=True),
                                      rows_per_source=5))
    held = split.filter("heldout")
    assert held.filter(pl.col("source") == "a")["id"].sort().to_list() == sorted(
        instructions.filter(pl.col("source") == "a")["id"].to_list())[:5]
    with pytest.raises(ValueError, match="leaves none"):
        heldout_split(instructions, rows_per_source=15)


def test_study_table_markdown_and_figure():
    rng = np.random.default_rng(5)
    scores = pl.concat([_long("base", _crossed_scores(rng, 1, 8, mean=2.0)),
                        _long("pesc", _crossed_scores(rng, 2, 8)),
                        _long("pesc", rng.integers(0, 2, (2, 6)).astype(float), benchmark="gsm8k_test",
                              metric="exact_match")])
    parameters = pl.DataFrame({"layout": ["base", "pesc"], "groups": [None, 1], "experts_per_group": [None, 12],
                               "router_top_k": [None, 2], "total_trainable": [0, 1234], "active_trainable": [0, 567],
                               "note": ["", "matched"]})
    table = build_study_table(scores, parameters, resamples=200, missing_runs=["moce/e4/s0"])
    assert "| pesc (matched) | 1,234 | 567 | 2 |" in table.markdown
    assert "two-level" in table.markdown and "moce/e4/s0" in table.markdown
    assert "gsm8k_test exact_match" in table.markdown and "heldout_a heldout_loss ↓" in table.markdown
    assert table.figure_png.startswith(b"\x89PNG")
    assert table.differences.height == 1  # pesc − base on the loss; base has no gsm8k scores


def test_binary_scores_never_get_a_zero_width_interval():
    none_correct = np.zeros((3, 10))
    row = aggregate(_long("moce/e4", none_correct, benchmark="gsm8k_test", metric="exact_match"), 500).row(0, named=True)
    # 0 of 10 items: the Wilson interval [0, 0.278], which a bootstrap of identical items (0, 0) would not give.
    assert row["mean"] == 0.0 and row["ci_low"] == 0.0 and row["ci_high"] == pytest.approx(0.2775, abs=1e-3)
    some_correct = none_correct.copy()
    some_correct[:, :2] = 1.0
    scores = pl.concat([_long("pesc", none_correct, benchmark="g", metric="exact_match"),
                        _long("moce/e4", some_correct, benchmark="g", metric="exact_match")])
    row = paired_differences(scores, 500).row(0, named=True)
    # 2 of 10 won, 0 lost, on every seed: Bonett–Price on 10 pairs covers 0, so it is not called a difference.
    assert row["difference"] == pytest.approx(0.2) and row["ci_low"] < 0 < row["ci_high"]
    assert row["verdict"] == "no significant difference"


def test_comparisons_pair_routers_with_their_counterparts_and_conditions_with_clean_runs():
    labels = ["base", "pesc", "moce/e4", "moce+ac/e4", "pesc+ac", "base @noised", "pesc @noised",
              "moce/e4 @noised", "moce+ac/e4 @noised", "moce/e4 @adaptive"]
    pairs = comparisons(labels, counterparts={"moce+ac/e4": "moce/e4", "pesc+ac": "pesc"})
    assert ("pesc", "base") in pairs and ("base", "pesc") not in pairs
    assert ("moce+ac/e4", "moce/e4") in pairs and ("moce+ac/e4", "pesc") in pairs
    assert pairs.count(("pesc+ac", "pesc")) == 1  # its counterpart is also a reference: compared once
    # Under a condition: against the references and the counterpart under the same condition, and against the
    # same runs without the condition; never across conditions.
    assert {p for p in pairs if p[0] == "moce+ac/e4 @noised"} == {
        ("moce+ac/e4 @noised", "pesc @noised"), ("moce+ac/e4 @noised", "base @noised"),
        ("moce+ac/e4 @noised", "moce/e4 @noised"), ("moce+ac/e4 @noised", "moce+ac/e4")}
    assert ("pesc @noised", "base @noised") in pairs and ("base @noised", "base") in pairs
    # No reference row exists under `adaptive` (pesc and base do not route by centroids): only the clean runs.
    assert [p for p in pairs if p[0] == "moce/e4 @adaptive"] == [("moce/e4 @adaptive", "moce/e4")]


def test_paired_differences_of_a_router_and_a_condition_have_the_constructed_size():
    rng = np.random.default_rng(6)
    linear = _crossed_scores(rng, 3, 50)
    scores = pl.concat([
        _long("pesc", _crossed_scores(rng, 3, 50)),
        _long("moce/e4", linear),
        _long("moce+ac/e4", linear - 0.2 + rng.normal(0, 0.02, linear.shape)),
        _long("moce/e4 @noised", linear + 0.5 + rng.normal(0, 0.02, linear.shape)),
    ])
    differences = paired_differences(scores, resamples=1_000, counterparts={"moce+ac/e4": "moce/e4"})
    pairs = {(r["layout"], r["reference"]): r for r in differences.iter_rows(named=True)}
    assert pairs["moce+ac/e4", "moce/e4"]["difference"] == pytest.approx(-0.2, abs=0.01)
    assert pairs["moce+ac/e4", "moce/e4"]["verdict"] == "moce+ac/e4 better"
    noised = pairs["moce/e4 @noised", "moce/e4"]
    assert noised["difference"] == pytest.approx(0.5, abs=0.01) and noised["verdict"] == "clean better"
    assert (noised["n_seeds"], noised["n_items"]) == (3, 50)
    # No pesc row under the condition, so the noised row is compared with nothing else.
    assert {r for r in pairs if r[0] == "moce/e4 @noised"} == {("moce/e4 @noised", "moce/e4")}


def test_study_table_shows_condition_rows_after_the_layouts_with_their_notes():
    rng = np.random.default_rng(7)
    scores = pl.concat([_long("base", _crossed_scores(rng, 1, 8, mean=2.0)),
                        _long("moce/e2", _crossed_scores(rng, 2, 8)),
                        _long("moce/e2 @noised", _crossed_scores(rng, 1, 8, mean=1.5)),
                        _long("base @noised", _crossed_scores(rng, 1, 8, mean=2.5))])
    parameters = pl.DataFrame({"layout": ["base", "moce/e2"], "groups": [None, 3], "experts_per_group": [None, 2],
                               "router_top_k": [None, 2], "total_trainable": [0, 999], "active_trainable": [0, 99],
                               "note": ["not trained", ""]})
    table = build_study_table(scores, parameters, resamples=200,
                              condition_notes={"noised": "15% of the prompt's words replaced",
                                               "adaptive": "centroids updated"},
                              missing_conditions=["moce/e2/s1"])
    assert table.parameters["layout"].to_list() == ["base", "moce/e2", "base @noised", "moce/e2 @noised"]
    assert "| moce/e2 @noised | 999 | 99 | 1 |" in table.markdown
    assert "- `@noised`: 15% of the prompt's words replaced" in table.markdown
    assert "@adaptive" not in table.markdown  # no row under that condition: no note
    assert "moce/e2/s1" in table.markdown
    layouts = table.differences.select("layout", "reference").rows()
    assert ("moce/e2 @noised", "moce/e2") in layouts and ("moce/e2 @noised", "base @noised") in layouts


# ------------------------------------------------------------------------------- evaluation-only conditions

HELDOUT_ROWS = pl.DataFrame({
    "id": [f"r{i}" for i in range(6)],
    "system": [None, "You are terse.", "", None, "Be exact.", None],
    "instruction": ["Add the two numbers and explain each step.", "Translate this sentence into French, please.",
                    "Write a function that reverses a list.", "Name three primes below twenty.",
                    "Convert 5 km to miles.", "Summarise: the cat sat on the mat and slept all day long."],
    "input": ["17 and 25", "", "def reverse(items): ...", None, "", "The weather was fine."],
    "response": ["17 + 25 = 42", "Bonjour", "return items[::-1]", "2, 3, 5", "3.1 miles", "A cat slept."],
})


def test_corrupted_prompts_replace_the_share_of_words_deterministically_and_leave_the_response():
    import re

    from moce_model.study.condition_plans import WORD, noised_rows, prompt_vocabulary

    vocabulary = prompt_vocabulary([HELDOUT_ROWS])
    noised = noised_rows(HELDOUT_ROWS, share=0.3, seed=0, vocabulary=vocabulary)
    assert noised.equals(noised_rows(HELDOUT_ROWS, share=0.3, seed=0, vocabulary=vocabulary))
    assert not noised.equals(noised_rows(HELDOUT_ROWS, share=0.3, seed=1, vocabulary=vocabulary))
    # Seeded by the item: the same rows in another order or without the others are corrupted the same way.
    subset = noised_rows(HELDOUT_ROWS.reverse().head(3), share=0.3, seed=0, vocabulary=vocabulary)
    assert subset.equals(noised.reverse().head(3))
    assert noised["response"].equals(HELDOUT_ROWS["response"]) and noised["id"].equals(HELDOUT_ROWS["id"])
    for original, row in zip(HELDOUT_ROWS.iter_rows(named=True), noised.iter_rows(named=True)):
        before = [w for f in ("system", "instruction", "input") for w in WORD.findall(original[f] or "")]
        after = [w for f in ("system", "instruction", "input") for w in WORD.findall(row[f] or "")]
        assert row["words"] == len(before) == len(after)
        assert row["replaced_words"] == int(np.floor(0.3 * len(before) + 0.5))
        # Exactly the replaced words differ, each from its original, and only words change.
        assert sum(a != b for a, b in zip(before, after)) == row["replaced_words"]
        for field in ("system", "instruction", "input"):
            assert re.sub(r"\w+", "", original[field] or "") == re.sub(r"\w+", "", row[field] or "")
            if not original[field]:
                assert row[field] == original[field]  # an empty or missing part stays as it was
    everything = noised_rows(HELDOUT_ROWS, share=1.0, seed=0, vocabulary=vocabulary)
    assert (everything["replaced_words"] == everything["words"]).all()
    with pytest.raises(ValueError, match="share"):
        noised_rows(HELDOUT_ROWS, share=0.0, seed=0, vocabulary=vocabulary)
    with pytest.raises(ValueError, match="at least 2 distinct words"):
        noised_rows(HELDOUT_ROWS, share=0.5, seed=0, vocabulary=["word"])


def test_noised_condition_corrupts_every_held_out_benchmark_and_counts_the_words():
    from moce_model.study.condition_plans import ConditionInputs
    from moce_model.study.conditions import CONDITIONS

    clean = pl.DataFrame(schema={"benchmark": pl.String, "metric": pl.String, "item_id": pl.String,
                                 "score": pl.Float64})
    inputs = ConditionInputs("pesc", StudyConfig(noise_share=0.5), {"heldout_a": HELDOUT_ROWS.head(3),
                                                                     "heldout_b": HELDOUT_ROWS.tail(3)}, clean)
    plan = CONDITIONS["noised"].prepare(inputs)
    assert set(plan.rows) == {"heldout_a", "heldout_b"} and plan.router is None and plan.kept_scores is None
    assert plan.rows["heldout_b"]["id"].to_list() == ["r3", "r4", "r5"]
    details = plan.details.sort("benchmark")
    assert details["replaced_words"].to_list() == [int(plan.rows[b]["replaced_words"].sum())
                                                   for b in ("heldout_a", "heldout_b")]
    summary = CONDITIONS["noised"].summarize(details.with_columns(pl.lit("pesc/s0").alias("run")))
    assert f"heldout_a: {details['replaced_words'][0]} of {details['words'][0]} words in 3 prompts" in summary


class LookupEncoder:
    """An encoder that returns a fixed vector per text (the router's embedding, made up)."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, texts):
        return np.stack([self.vectors[text] for text in texts]).astype(np.float32)


def _unit(*values):
    vector = np.zeros(8)
    vector[:len(values)] = values
    return vector / np.linalg.norm(vector)


def test_adaptive_condition_reroutes_by_the_updated_centroids_and_keeps_the_other_clean_scores():
    from moce_model.study.condition_plans import ConditionInputs
    from moce_model.study.conditions import CONDITIONS, combine_scores

    axes = [_unit(*([0.0] * c + [1.0])) for c in range(3)]
    centroids = np.stack(axes).astype(np.float32)
    # 10 training rows on each axis; 10 held-out rows between clusters 0 and 1, nearer 0, pull centroid 0
    # towards cluster 1, so that the held-out item `hx` (nearer 1 than 0 before) moves to cluster 0.
    ids = [f"t{c}_{i}" for c in range(3) for i in range(10)] + [f"h{i}" for i in range(10)] + ["hx"]
    vectors = np.stack([axes[c] for c in range(3) for _ in range(10)] + [_unit(1.0, 0.9)] * 10
                       + [_unit(0.8, 1.0)]).astype(np.float32)
    heldout = pl.DataFrame({"id": ids[30:], "system": [None] * 11, "instruction": [f"prompt {i}" for i in ids[30:]],
                            "input": [None] * 11, "response": ["answer"] * 11})
    encoder = LookupEncoder({f"prompt {i}": v for i, v in zip(ids[30:], vectors[30:])})
    clean = pl.DataFrame({"benchmark": "heldout_a", "metric": ["heldout_loss"] * 11 + ["exact_match"],
                          "item_id": [f"heldout_a/{i}" for i in ids[30:]] + ["gsm8k/0"],
                          "score": [float(s) for s in range(11)] + [1.0]})
    inputs = ConditionInputs("moce/e2", StudyConfig(), {"heldout_a": heldout}, clean, centroids=centroids,
                             encoder=encoder, embeddings=(np.array(ids), vectors))
    plan = CONDITIONS["adaptive"].prepare(inputs)
    assert plan.rows["heldout_a"]["id"].to_list() == ["hx"]
    assert plan.router.assign(["prompt hx"]).tolist() == [0]
    kept = plan.kept_scores.sort("item_id")
    assert kept["item_id"].to_list() == [f"heldout_a/h{i}" for i in range(10)]
    assert kept["score"].to_list() == [float(s) for s in range(10)]  # their clean scores, unchanged
    details = plan.details.sort("cluster")
    assert details["members"].to_list() == [10, 10, 10] and details["heldout_rows"].to_list() == [10, 1, 0]
    assert details["rerouted_items"].to_list() == [0, 1, 0]  # counted by the cluster it left
    assert details["drift"][0] > 0.01 and details["drift"][1] > 0 and details["drift"][2] == 0
    assert "cluster 1: 10 rows + 1 held-out" in CONDITIONS["adaptive"].summarize(
        details.with_columns(pl.lit("moce/e2/s0").alias("run")))

    scored = pl.DataFrame({"benchmark": ["heldout_a"], "metric": ["heldout_loss"], "item_id": ["heldout_a/hx"],
                           "score": [0.5]})
    scores = combine_scores("moce/e2 @adaptive", 2, scored, plan.kept_scores)
    assert scores.height == 11 and set(scores["layout"]) == {"moce/e2 @adaptive"} and set(scores["seed"]) == {2}
    assert scores.filter(pl.col("item_id") == "heldout_a/hx")["score"].to_list() == [0.5]
    with pytest.raises(ValueError, match="both scored and kept"):
        combine_scores("moce/e2 @adaptive", 2, plan.kept_scores.head(1), plan.kept_scores)
    # A run whose scores lack a kept item, and a layout that does not route by centroids.
    with pytest.raises(ValueError, match="clean scores lack"):
        CONDITIONS["adaptive"].prepare(ConditionInputs(
            "moce/e2", StudyConfig(), {"heldout_a": heldout}, clean.head(3), centroids=centroids, encoder=encoder,
            embeddings=(np.array(ids), vectors)))
    assert CONDITIONS["adaptive"].prepare(ConditionInputs("pesc", StudyConfig(), {"heldout_a": heldout}, clean)) is None


def test_soft_condition_rescores_only_the_prompts_near_a_boundary_with_two_groups():
    from moce_model.study.condition_plans import ConditionInputs
    from moce_model.study.conditions import CONDITIONS

    axes = [_unit(*([0.0] * c + [1.0])) for c in range(2)]
    centroids = np.stack(axes).astype(np.float32)
    # `mid` lies halfway between the two centroids (soft, weight 0.5); `near0` and `near1` sit on them (hard).
    vectors = {"prompt mid": _unit(1.0, 1.0), "prompt near0": axes[0], "prompt near1": _unit(0.8, 1.0)}
    heldout = pl.DataFrame({"id": ["mid", "near0", "near1"], "system": [None] * 3,
                            "instruction": ["prompt mid", "prompt near0", "prompt near1"], "input": [None] * 3,
                            "response": ["answer"] * 3})
    clean = pl.DataFrame({"benchmark": "heldout_a", "metric": "heldout_loss",
                          "item_id": ["heldout_a/mid", "heldout_a/near0", "heldout_a/near1"],
                          "score": [1.0, 2.0, 3.0]})
    inputs = ConditionInputs("moce/e2", StudyConfig(), {"heldout_a": heldout}, clean, centroids=centroids,
                             encoder=LookupEncoder(vectors))
    plan = CONDITIONS["soft"].prepare(inputs)
    assert plan.rows["heldout_a"]["id"].to_list() == ["mid"]
    assert (plan.soft_assignment.margin, plan.soft_assignment.temperature) == (0.1, 0.025)
    assert plan.kept_scores.sort("item_id")["score"].to_list() == [2.0, 3.0]
    assert plan.details.row(0, named=True) == {"benchmark": "heldout_a", "items": 3, "soft_items": 1,
                                               "mean_second_weight": pytest.approx(0.5)}
    assert "heldout_a: 1 of 3 items soft" in CONDITIONS["soft"].summarize(plan.details)
    # A wider margin takes in `near1` too; layouts without centroids have no boundary.
    wide = CONDITIONS["soft"].prepare(ConditionInputs("moce/e2", StudyConfig(soft_margin=0.5), {"heldout_a": heldout},
                                                      clean, centroids=centroids, encoder=LookupEncoder(vectors)))
    assert wide.rows["heldout_a"]["id"].to_list() == ["mid", "near1"]
    assert CONDITIONS["soft"].prepare(ConditionInputs("pesc", StudyConfig(), {"heldout_a": heldout}, clean)) is None
    with pytest.raises(ValueError, match="margin"):
        StudyConfig(soft_margin=0.0)


def test_condition_scores_aggregate_as_rows_paired_with_the_clean_runs():
    """Condition scores written by `combine_scores` for two seeds reach the table as their own row, paired with
    the clean runs of the same seeds."""
    from moce_model.study.conditions import combine_scores

    rng = np.random.default_rng(8)
    clean = _crossed_scores(rng, 2, 30)
    noised = clean + 0.4 + rng.normal(0, 0.01, clean.shape)
    frames = [_long("moce/e2", clean)]
    for seed in range(2):
        evaluated = pl.DataFrame({"benchmark": "heldout_a", "metric": "heldout_loss",
                                  "item_id": [f"i{i}" for i in range(30)], "score": noised[seed]})
        frames.append(combine_scores("moce/e2 @noised", seed, evaluated, None))
    scores = pl.concat(frames)
    row = aggregate(scores, resamples=500).filter(pl.col("layout") == "moce/e2 @noised").row(0, named=True)
    assert (row["n_seeds"], row["n_items"]) == (2, 30) and row["mean"] == pytest.approx(noised.mean())
    difference = paired_differences(scores, resamples=500).row(0, named=True)
    assert (difference["layout"], difference["reference"]) == ("moce/e2 @noised", "moce/e2")
    assert difference["difference"] == pytest.approx(0.4, abs=0.01) and difference["verdict"] == "clean better"


def _blend_heldout(names=("heldout_a", "heldout_b", "heldout_c"), rows=3):
    """Held-out rows of a few benchmarks: row j of benchmark `heldout_x` has id `x{j}` (so ids sort as rows)."""
    return {name: pl.DataFrame({
        "id": [f"{name[-1]}{j}" for j in range(rows)], "system": [None] * rows,
        "instruction": [f"task {name[-1]}{j}" for j in range(rows)], "input": [f"input {name[-1]}{j}" for j in range(rows)],
        "response": [f"answer {name[-1]}{j}" for j in range(rows)]}) for name in names}


def test_blended_rows_pair_item_i_of_every_two_sources_deterministically_with_the_shared_builder():
    from moce_model.evaluation.benchmarks import blend_rows
    from moce_model.study.condition_plans import BLENDED_BENCHMARK, blended_heldout_rows

    heldout = _blend_heldout()
    rows = blended_heldout_rows(heldout, items_per_pair=2)
    # 3 pairs of sources x 2 items; the first part alternates with i, so each source comes first and second.
    assert rows["id"].to_list() == ["a0+b0", "b1+a1", "a0+c0", "c1+a1", "b0+c0", "c1+b1"]
    assert rows.select("first_benchmark", "first_id", "second_benchmark", "second_id").row(1) == (
        "heldout_b", "b1", "heldout_a", "a1")
    by_id = {name: {r["id"]: r for r in frame.iter_rows(named=True)} for name, frame in heldout.items()}
    for row in rows.iter_rows(named=True):
        built = blend_rows(by_id[row["first_benchmark"]][row["first_id"]],
                           by_id[row["second_benchmark"]][row["second_id"]])
        assert {k: row[k] for k in built} == built
    assert rows.row(0, named=True)["instruction"] == "task a0\ninput a0\n\nThen: task b0"
    assert rows.row(0, named=True)["response"] == "answer a0\n\nanswer b0"
    # The rows' order in the files and the benchmarks' order do not matter.
    shuffled = {name: heldout[name].reverse() for name in reversed(list(heldout))}
    assert blended_heldout_rows(shuffled, items_per_pair=2).equals(rows)
    # The cap is per pair of sources, and never more than a source holds.
    assert blended_heldout_rows(heldout, items_per_pair=10).height == 3 * 3
    assert blended_heldout_rows({"heldout_a": heldout["heldout_a"]}, items_per_pair=2).height == 0
    with pytest.raises(ValueError, match="at least 1"):
        blended_heldout_rows(heldout, items_per_pair=0)
    with pytest.raises(ValueError, match=BLENDED_BENCHMARK):
        blended_heldout_rows({**heldout, BLENDED_BENCHMARK: heldout["heldout_a"]}, items_per_pair=1)
    with pytest.raises(ValueError, match="blend_items must be at least 1"):
        StudyConfig(blend_items=0)


def test_blended_condition_takes_the_parts_losses_from_the_clean_scores_and_says_where_blends_went():
    from moce_model.data.instructions import routing_text
    from moce_model.study.condition_plans import (
        BLENDED_BENCHMARK,
        ConditionInputs,
        blended_heldout_rows,
        clean_heldout_scores,
    )
    from moce_model.study.conditions import CONDITIONS

    heldout = _blend_heldout(("heldout_a", "heldout_b"))
    axes = [_unit(*([0.0] * c + [1.0])) for c in range(3)]
    centroids = np.stack(axes).astype(np.float32)
    # Parts of `a` in cluster 0, of `b` in cluster 1, but b2 in cluster 0 (with its partner a2).
    part_cluster = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 0}
    vectors = {routing_text(None, f"task {i}", f"input {i}"): axes[c] for i, c in part_cluster.items()}
    # The blends a0+b0 -> cluster 0 (its first part's), b1+a1 -> 0 (its second's), a2+b2 -> 0 (both's).
    rows = blended_heldout_rows(heldout, items_per_pair=3)
    assert rows["id"].to_list() == ["a0+b0", "b1+a1", "a2+b2"]
    for row in rows.iter_rows(named=True):
        vectors[routing_text(row["system"], row["instruction"], row["input"])] = axes[0]
    clean = pl.DataFrame({"benchmark": ["heldout_a"] * 3 + ["heldout_b"] * 3 + ["gsm8k_test"],
                          "metric": ["heldout_loss"] * 6 + ["exact_match"],
                          "item_id": [f"heldout_a/a{j}" for j in range(3)] + [f"heldout_b/b{j}" for j in range(3)]
                          + ["gsm8k_test/0"],
                          "score": [1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 1.0]})
    inputs = ConditionInputs("moce/e2", StudyConfig(blend_items=3), heldout, clean, centroids=centroids,
                             encoder=LookupEncoder(vectors))
    plan = CONDITIONS["blended"].prepare(inputs)
    assert list(plan.rows) == [BLENDED_BENCHMARK] and plan.rows[BLENDED_BENCHMARK]["id"].equals(rows["id"])
    assert plan.router.assign([routing_text(None, "task b1", "input b1")]).tolist() == [1]
    derived = {metric: dict(zip(frame["item_id"], frame["score"]))
               for (metric,), frame in plan.kept_scores.partition_by("metric", as_dict=True).items()}
    ids = [f"{BLENDED_BENCHMARK}/{i}" for i in rows["id"]]
    # The mean of the parts' clean losses: nothing scored again.
    assert [derived["heldout_loss_of_parts"][i] for i in ids] == [5.5, 11.0, 16.5]
    assert [derived["routed_as_first_part"][i] for i in ids] == [1.0, 0.0, 1.0]
    assert [derived["routed_as_second_part"][i] for i in ids] == [0.0, 1.0, 1.0]
    assert "heldout_loss" not in derived  # the blends' own loss is what the plan's rows are scored for
    assert plan.details.select("items", "routed_as_first_part", "routed_as_second_part", "routed_as_neither",
                               "parts_in_one_cluster").rows() == [(2, 2, 1, 0, 1), (1, 0, 1, 0, 0)]
    runs = pl.concat([plan.details.with_columns(pl.lit(f"moce/e2/s{s}").alias("run")) for s in range(2)]
                     + [plan.details.with_columns(pl.lit("moce/e4").alias("layout"), pl.lit("moce/e4/s0").alias("run"))])
    summary = CONDITIONS["blended"].summarize(runs)
    assert ("moce/e2: routed as the first part 67%, as the second 67%, neither 0% (parts in one cluster 33%; "
            "6 blends over 2 run(s))") in summary and "moce/e4: " in summary

    # A layout without centroids: the losses only, routed by the model itself.
    plain = CONDITIONS["blended"].prepare(ConditionInputs("pesc", StudyConfig(blend_items=3), heldout, clean))
    assert plain.router is None and plain.details is None
    assert set(plain.kept_scores["metric"]) == {"heldout_loss_of_parts"}
    # Parts the clean run did not score, and a study of one source (nothing to blend).
    with pytest.raises(ValueError, match=r"clean scores lack 1 held-out item.*heldout_b/b2"):
        CONDITIONS["blended"].prepare(ConditionInputs("pesc", StudyConfig(blend_items=3), heldout,
                                                      clean.filter(pl.col("item_id") != "heldout_b/b2")))
    assert CONDITIONS["blended"].prepare(ConditionInputs(
        "pesc", StudyConfig(), {"heldout_a": heldout["heldout_a"]}, clean)) is None
    assert clean_heldout_scores(inputs, ["heldout_b", "heldout_a"], ["b2", "a0"])["score"].to_list() == [30.0, 1.0]


def _blended_long(layout, matrix, metric="heldout_loss"):
    from moce_model.study.condition_plans import BLENDED_BENCHMARK

    return _long(layout, matrix, benchmark=BLENDED_BENCHMARK, metric=metric).with_columns(
        pl.format("{}/b{}", pl.lit(BLENDED_BENCHMARK), pl.col("item_id")).alias("item_id"))


def test_blended_rows_are_compared_model_with_model_and_blend_with_parts_never_with_the_clean_items():
    from moce_model.study.condition_plans import BLENDED_BENCHMARK

    rng = np.random.default_rng(9)
    parts = _crossed_scores(rng, 2, 40)
    blend = parts + 0.3 + rng.normal(0, 0.02, parts.shape)  # 0.3 above its parts asked alone
    pesc_blend = blend + 0.2 + rng.normal(0, 0.02, parts.shape)
    routed_first = (rng.random((1, 40)) < 0.5).astype(float).repeat(2, axis=0)
    scores = pl.concat([
        _long("base", _crossed_scores(rng, 1, 40, mean=2.0)), _long("pesc", _crossed_scores(rng, 2, 40)),
        _long("moce/e4", parts), _long("moce+ac/e4", parts),
        _blended_long("moce/e4 @blended", blend), _blended_long("moce/e4 @blended", parts, "heldout_loss_of_parts"),
        _blended_long("moce/e4 @blended", routed_first, "routed_as_first_part"),
        _blended_long("moce+ac/e4 @blended", blend), _blended_long("moce+ac/e4 @blended", np.ones((2, 40)),
                                                                   "routed_as_first_part"),
        _blended_long("pesc @blended", pesc_blend), _blended_long("pesc @blended", parts, "heldout_loss_of_parts"),
        _blended_long("base @blended", _crossed_scores(rng, 1, 40, mean=3.0)),
    ])
    labels = scores["layout"].unique(maintain_order=True).to_list()
    assert ("moce/e4 @blended", "moce/e4") in comparisons(labels)
    assert not [p for p in comparisons(labels, own_items={"blended"}) if p[1] in ("moce/e4", "pesc", "base")
                and "@" in p[0]]

    differences = paired_differences(scores, 1_000, counterparts={"moce+ac/e4": "moce/e4"}, own_items={"blended"})
    rows = {(r["layout"], r["reference"], r["metric"], r["reference_metric"]): r
            for r in differences.iter_rows(named=True)}
    blended_rows = {k for k in rows if "@blended" in k[0]}
    assert {(k[0], k[1]) for k in blended_rows} == {
        ("moce/e4 @blended", "pesc @blended"), ("moce/e4 @blended", "base @blended"),
        ("moce/e4 @blended", "moce/e4 @blended"), ("moce+ac/e4 @blended", "pesc @blended"),
        ("moce+ac/e4 @blended", "base @blended"), ("moce+ac/e4 @blended", "moce/e4 @blended"),
        ("pesc @blended", "base @blended"), ("pesc @blended", "pesc @blended")}
    assert all(r["benchmark"] == BLENDED_BENCHMARK for k, r in rows.items() if k in blended_rows)
    model = rows["moce/e4 @blended", "pesc @blended", "heldout_loss", "heldout_loss"]
    assert model["difference"] == pytest.approx(-0.2, abs=0.01) and model["verdict"] == "moce/e4 @blended better"
    assert (model["n_seeds"], model["n_items"]) == (2, 40)
    within = rows["moce/e4 @blended", "moce/e4 @blended", "heldout_loss", "heldout_loss_of_parts"]
    assert within["difference"] == pytest.approx(0.3, abs=0.01)
    assert within["verdict"] == "heldout_loss_of_parts better" and within["n_items"] == 40
    # Where prompts went: higher or lower, never better.
    routing = rows["moce+ac/e4 @blended", "moce/e4 @blended", "routed_as_first_part", "routed_as_first_part"]
    assert routing["verdict"] == "moce+ac/e4 @blended higher"

    # Without `own_items` the table would pair the blends with the clean items: none in common.
    clashing = pl.concat([_long("moce/e4", parts), _long("moce/e4 @blended", blend).with_columns(
        pl.format("{}x", pl.col("item_id")).alias("item_id"))])
    with pytest.raises(ValueError, match="share no items"):
        paired_differences(clashing, 100)
    assert paired_differences(clashing, 100, own_items={"blended"}).height == 0

    parameters = pl.DataFrame({"layout": ["base", "pesc", "moce/e4", "moce+ac/e4"], "groups": [None, 1, 3, 3],
                               "experts_per_group": [None, 12, 4, 4], "router_top_k": [None, 2, 2, 2],
                               "total_trainable": [0, 10, 10, 10], "active_trainable": [0, 5, 5, 5],
                               "note": ["", "", "", ""]})
    table = build_study_table(scores, parameters, 200, counterparts={"moce+ac/e4": "moce/e4"},
                              condition_notes={"blended": "blends; moce/e4: routed as the first part 50%"},
                              own_items={"blended"})
    assert "- `@blended`: blends; moce/e4: routed as the first part 50%" in table.markdown
    assert (f"| moce/e4 @blended | moce/e4 @blended | {BLENDED_BENCHMARK} | heldout_loss ↓ − heldout_loss_of_parts "
            "| 2 x 40 |") in table.markdown
    assert f"{BLENDED_BENCHMARK} routed_as_first_part" in table.markdown


def test_every_condition_name_has_one_registered_condition():
    from moce_model.study.conditions import CONDITIONS
    from moce_model.study.config import CONDITION_NAMES

    assert tuple(CONDITIONS) == CONDITION_NAMES


def test_the_humaneval_choice_probe_joins_the_held_out_benchmarks_of_every_run(tmp_path):
    files = {"b": str(tmp_path / "heldout_b.parquet"), "a": str(tmp_path / "heldout_a.parquet")}
    config = StudyConfig(gsm8k_items=0, humaneval_choice_items=40)
    specs = heldout_benchmark_specs(files, config, tmp_path / "tasks")
    assert [s.name for s in specs] == ["heldout_a", "heldout_b", "humaneval_choice"]
    probe = specs[-1]
    assert (probe.kind, probe.lm_eval_task, probe.n_items, probe.completion, probe.lm_eval_tasks_dir) == (
        "lm_eval", "humaneval_choice", 40, True, str(tmp_path / "tasks"))
    # left out when switched off, or where no task folder was written (the conditions re-score held-out rows only)
    assert [s.name for s in heldout_benchmark_specs(files, config)] == ["heldout_a", "heldout_b"]
    off = StudyConfig(gsm8k_items=0, humaneval_choice_items=0)
    assert [s.name for s in heldout_benchmark_specs(files, off, tmp_path / "tasks")] == ["heldout_a", "heldout_b"]
    assert StudyConfig.from_mapping({"humaneval_choice_items": 12}).humaneval_choice_items == 12
    with pytest.raises(ValueError, match="humaneval_choice_items must be >= 0, got -1"):
        StudyConfig(humaneval_choice_items=-1)


def test_the_base_run_scores_the_probe_item_by_item_for_the_paired_table(tmp_path):
    """The base model's study run (no training) through `run_study_layout`: its item scores hold the probe's acc
    and acc_norm per problem, item ids the trained runs share, so the table pairs them."""
    from tests.evaluation.test_eval_fixtures import save_model_dir

    model_dir = save_model_dir(tmp_path / "base")
    heldout = pl.DataFrame({"id": ["r1", "r2"], "source": ["s", "s"], "system": ["", ""],
                            "instruction": ["Add 1 and 2.", "Name a colour."], "input": ["", ""],
                            "response": ["3", "Red"]})
    heldout.write_parquet(tmp_path / "heldout_s.parquet")
    config = StudyConfig(gsm8k_items=0, humaneval_choice_items=2, conditions=())
    result = run_study_layout(StudyRunInputs(
        config=config, run_key="base", base_model_dir=model_dir, instructions=heldout,
        heldout_ids=heldout["id"], heldout_files={"s": str(tmp_path / "heldout_s.parquet")}, k=2,
        centroids_path="", embedder=None, cluster_ids={}, training_config=TrainingConfig(),
        evaluation_settings={"batch_size": 4}, run_dir=tmp_path / "run"), train=None)
    scores = pl.read_parquet(tmp_path / "run" / "item_scores.parquet")
    probe = scores.filter(pl.col("benchmark") == "humaneval_choice").sort("metric", "item_id")
    assert probe.select("layout", "seed", "metric", "item_id").rows() == [
        ("base", 0, metric, f"humaneval_choice/{i}") for metric in ("acc", "acc_norm") for i in (0, 1)]
    assert set(probe["score"].to_list()) <= {0.0, 1.0}
    assert result.scores_table.filter(pl.col("benchmark") == "humaneval_choice")["n_items"].to_list() == [2, 2]
