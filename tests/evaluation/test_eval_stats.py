"""Intervals, paired differences, minimum detectable differences and the average over benchmarks, on
constructed data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moce_model.evaluation.stats import (
    average_difference,
    average_estimate,
    mean_estimate,
    minimum_detectable_difference,
    normal_interval,
    paired_difference,
)

Z = 1.959963984540054


def _standardised(n: int) -> np.ndarray:
    """n values with mean exactly 0 and sample standard deviation exactly 1 (normal quantiles, rescaled)."""
    z = scipy_stats.norm.ppf((np.arange(n) + 0.5) / n)
    z = z - z.mean()
    return z / z.std(ddof=1)


# ------------------------------------------------------------------------------------------ proportions


def test_wilson_interval_of_none_and_all_correct_has_its_closed_form():
    # Wilson at k = 0: [0, z² / (n + z²)]; at k = n: [n / (n + z²), 1]. The normal interval would be [0, 0].
    none = mean_estimate([0.0] * 8)
    assert (none.value, none.n, none.method) == (0.0, 8, "wilson")
    assert none.ci_low == 0.0 and none.ci_high == pytest.approx(Z**2 / (8 + Z**2))
    every = mean_estimate([1.0] * 8)
    assert every.ci_low == pytest.approx(8 / (8 + Z**2)) and every.ci_high == pytest.approx(1.0)
    # exactly at the proportion, for every n: a bound past it by rounding (5.6e-17 for 0 of 3) drew a negative
    # error bar in the report's charts
    for n in range(1, 200):
        assert mean_estimate([0.0] * n).ci_low == 0.0 and mean_estimate([1.0] * n).ci_high == 1.0


def test_wilson_interval_covers_the_true_proportion_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for p, n, at_least in [(0.3, 40, 0.925), (0.05, 20, 0.90)]:
        draws = rng.random((2_000, n)) < p
        estimates = [mean_estimate(row.astype(float)) for row in draws]
        coverage = np.mean([e.ci_low <= p <= e.ci_high for e in estimates])
        assert at_least <= coverage <= 0.975, (p, n, coverage)
        # The normal (Wald) interval misses far more often at p = 0.05, n = 20: the reason for Wilson.
        phat = draws.mean(axis=1)
        half = Z * np.sqrt(phat * (1 - phat) / n)
        wald = np.mean((phat - half <= p) & (p <= phat + half))
        if p == 0.05:
            assert wald < 0.75


def test_stderr_is_the_sample_standard_error_and_none_for_one_item():
    estimate = mean_estimate([1.0, 0.0, 1.0, 1.0])
    assert estimate.stderr == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    assert mean_estimate([1.0]).stderr is None
    assert mean_estimate([2.5]).ci_low is None  # one continuous item: no interval


# --------------------------------------------------------------------------------------- continuous mean


def test_bootstrap_interval_of_a_mean_matches_the_t_interval_on_symmetric_data():
    scores = 2.0 + 0.5 * _standardised(200)
    estimate = mean_estimate(scores)
    assert estimate.method == "bootstrap BCa" and estimate.n == 200
    assert estimate.value == pytest.approx(2.0)
    assert estimate.stderr == pytest.approx(0.5 / math.sqrt(200))
    assert estimate.ci_low == pytest.approx(2.0 - Z * 0.5 / math.sqrt(200), abs=0.006)
    assert estimate.ci_high == pytest.approx(2.0 + Z * 0.5 / math.sqrt(200), abs=0.006)
    assert mean_estimate(scores, seed=0) == estimate  # seeded: the same interval every run


def test_bootstrap_interval_covers_a_skewed_mean():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(300):
        sample = rng.exponential(1.0, size=60)  # true mean 1, skewed like per-item losses
        estimate = mean_estimate(sample, seed=int(rng.integers(1 << 30)))
        hits += estimate.ci_low <= 1.0 <= estimate.ci_high
    assert 0.90 <= hits / 300 <= 0.99


def test_normal_interval_from_a_given_stderr():
    assert normal_interval(0.5, 0.01) == pytest.approx((0.5 - Z * 0.01, 0.5 + Z * 0.01))
    assert normal_interval(0.5, None) == (None, None)


# -------------------------------------------------------------------------------------- paired differences


def test_paired_difference_with_known_mean_and_variance_excludes_zero():
    n = 200
    differences = 0.3 + _standardised(n)  # mean 0.3, sd 1 exactly
    baseline = np.linspace(0.5, 3.0, n)
    result = paired_difference(baseline + differences, baseline)
    assert result.n == n and result.difference == pytest.approx(0.3)
    assert result.stderr == pytest.approx(1 / math.sqrt(n))
    assert result.ci_low == pytest.approx(0.3 - Z / math.sqrt(n), abs=0.01)
    assert result.ci_high == pytest.approx(0.3 + Z / math.sqrt(n), abs=0.01)
    assert result.significant
    # MDD = (z_0.975 + z_0.8) · s_d / sqrt(n)
    assert result.mdd == pytest.approx((Z + 0.8416212335729143) / math.sqrt(n))


def test_paired_difference_whose_interval_covers_zero_is_not_significant():
    n = 200
    baseline = np.linspace(0.5, 3.0, n)
    result = paired_difference(baseline + 0.05 + _standardised(n), baseline)
    assert result.ci_low < 0 < result.ci_high and not result.significant
    # The same interval with the roles swapped is the mirror image.
    mirrored = paired_difference(baseline, baseline + 0.05 + _standardised(n))
    assert mirrored.difference == pytest.approx(-result.difference)
    assert mirrored.ci_low == pytest.approx(-result.ci_high, abs=0.01)


def test_pairing_removes_the_spread_between_items():
    # Items differ a lot (sd 1), model a is better than b by 0.1 on every item plus small noise (sd 0.05).
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 1, 100)
    b = difficulty
    a = difficulty + 0.1 + rng.normal(0, 0.05, 100)
    paired = paired_difference(a, b)
    assert paired.significant and paired.ci_high - paired.ci_low < 0.05
    unpaired_half_width = Z * math.sqrt(a.var(ddof=1) / 100 + b.var(ddof=1) / 100)
    assert unpaired_half_width > 0.1  # treated as independent samples the difference would not be significant


def test_identical_models_have_a_zero_difference_and_no_mdd():
    scores = np.linspace(0.1, 2.0, 50)
    result = paired_difference(scores, scores)
    assert (result.difference, result.ci_low, result.ci_high, result.mdd) == (0.0, 0.0, 0.0, None)
    assert not result.significant


def test_paired_binary_difference_uses_bonett_price_and_agrees_with_exact_mcnemar():
    n = 32
    for won, expected_low, expected_high, significant in [
        (4, -0.0179058, 0.2531999, False),  # exact McNemar: p = 2 · 0.5**4 = 0.125
        (6, 0.0245958, 0.3283454, True),  # exact McNemar: p = 2 · 0.5**6 = 0.031
    ]:
        a = np.array([1.0] * won + [0.0] * (n - won))
        b = np.zeros(n)
        result = paired_difference(a, b)
        assert result.method == "bonett-price" and result.difference == pytest.approx(won / n)
        assert (result.ci_low, result.ci_high) == pytest.approx((expected_low, expected_high), abs=1e-6)
        assert result.significant == significant
        assert (scipy_stats.binomtest(won, won).pvalue < 0.05) == significant
    # Items both models get right or both get wrong do not move the difference.
    tied = paired_difference([1, 1, 0, 0, 1], [1, 1, 0, 0, 0])
    assert tied.difference == pytest.approx(0.2)


def test_bonett_price_interval_covers_the_true_paired_difference():
    rng = np.random.default_rng(3)
    p_won, p_lost, n = 0.15, 0.05, 60
    hits = 0
    for _ in range(2_000):
        cell = rng.choice(3, size=n, p=[p_won, p_lost, 1 - p_won - p_lost])
        a, b = (cell == 0).astype(float), (cell == 1).astype(float)
        result = paired_difference(a, b)
        hits += result.ci_low <= p_won - p_lost <= result.ci_high
    assert 0.93 <= hits / 2_000 <= 0.97


def test_no_discordant_items_still_gives_an_interval_and_an_mdd():
    result = paired_difference(np.zeros(30), np.zeros(30))
    assert result.difference == 0.0 and result.ci_low < 0 < result.ci_high
    assert result.mdd is not None and 0 < result.mdd < 1


# ---------------------------------------------------------------------------------------------------- MDD


def test_minimum_detectable_difference_is_detected_with_80_percent_power():
    n, sd = 100, 1.0
    mdd = minimum_detectable_difference(sd, n)
    assert mdd == pytest.approx(2.8015852 * sd / math.sqrt(n))
    rng = np.random.default_rng(4)
    for true_difference, expected_power in [(mdd, 0.80), (mdd / 2, 0.29)]:
        samples = rng.normal(true_difference, sd, size=(4_000, n))
        z = samples.mean(axis=1) / (samples.std(axis=1, ddof=1) / math.sqrt(n))
        assert np.mean(np.abs(z) > Z) == pytest.approx(expected_power, abs=0.03)


# ------------------------------------------------------------------------------------ average over benchmarks


def test_average_over_benchmarks_weights_each_benchmark_once():
    first = 1.0 + _standardised(100)  # mean 1, se 0.1
    second = 3.0 + 2 * _standardised(400)  # mean 3, se 0.1
    estimate = average_estimate([first, second])
    assert estimate.value == pytest.approx(2.0) and estimate.n == 500
    expected_se = math.sqrt(0.1**2 + 0.1**2) / 2
    assert estimate.stderr == pytest.approx(expected_se)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((2.0 - Z * expected_se, 2.0 + Z * expected_se))
    assert average_estimate([[1.0, 1.0], [2.0]]).ci_low is None  # a continuous benchmark of one item: no variance


def test_average_of_proportions_covers_the_true_average():
    rng = np.random.default_rng(5)
    for sizes, proportions in [((32, 4, 8), (0.3, 0.5, 0.2)), ((200, 200, 16, 16), (0.2, 0.05, 0.0, 0.1))]:
        truth = np.mean(proportions)
        hits = 0
        for _ in range(2_000):
            samples = [(rng.random(n) < p).astype(float) for n, p in zip(sizes, proportions)]
            estimate = average_estimate(samples)
            hits += estimate.ci_low <= truth <= estimate.ci_high
        assert 0.93 <= hits / 2_000 <= 0.985, (sizes, hits / 2_000)


def test_average_difference_of_one_benchmark_is_bonett_price():
    a, b = np.array([1.0] * 6 + [0.0] * 26), np.zeros(32)
    single, average = paired_difference(a, b), average_difference([a], [b])
    assert (average.difference, average.ci_low, average.ci_high) == pytest.approx(
        (single.difference, single.ci_low, single.ci_high))
    # the same MDD up to n versus n + 2 in the standard error
    assert average.mdd == pytest.approx(single.mdd * math.sqrt(32 / 34), rel=1e-6)


def test_average_difference_is_not_significant_when_no_benchmark_comes_close():
    # 4 of 32 won (exact McNemar p = 0.125) and 1 of 4 won: a bootstrap over these items excluded 0.
    a = [np.array([1.0] * 4 + [0.0] * 28), np.array([1.0, 0.0, 0.0, 0.0])]
    b = [np.zeros(32), np.zeros(4)]
    result = average_difference(a, b)
    assert result.difference == pytest.approx((4 / 32 + 1 / 4) / 2)
    assert result.ci_low < 0 < result.ci_high and not result.significant
    # Twice as many wins everywhere is a real difference.
    strong = average_difference([np.array([1.0] * 12 + [0.0] * 20), np.array([1.0, 1.0, 1.0, 0.0])], b)
    assert strong.significant


def test_average_difference_covers_the_true_difference():
    rng = np.random.default_rng(6)
    sizes, won, lost = (32, 8, 8), (0.2, 0.2, 0.2), (0.1, 0.2, 0.05)
    truth = np.mean(np.subtract(won, lost))
    hits = 0
    for _ in range(2_000):
        cells = [rng.choice(3, size=n, p=[w, l, 1 - w - l]) for n, w, l in zip(sizes, won, lost)]
        result = average_difference([(c == 0).astype(float) for c in cells], [(c == 1).astype(float) for c in cells])
        hits += result.ci_low <= truth <= result.ci_high
    assert 0.93 <= hits / 2_000 <= 0.99


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="at least one item"):
        mean_estimate([])
    with pytest.raises(ValueError, match="finite"):
        mean_estimate([1.0, float("nan")])
    with pytest.raises(ValueError, match="one score per item"):
        paired_difference([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="at least one benchmark"):
        average_estimate([])
    with pytest.raises(ValueError, match="same benchmarks"):
        average_difference([[1.0]], [])


def test_independent_difference_of_proportions_is_newcombes_hybrid_score_interval():
    from moce_model.evaluation.stats import independent_difference

    # Newcombe (1998), Table II example (a): 56/70 − 48/80 = 0.2000, method 10: 0.0524 to 0.3339.
    result = independent_difference([1.0] * 56 + [0.0] * 14, [1.0] * 48 + [0.0] * 32)
    assert result.difference == pytest.approx(0.2)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert result.significant and (result.n_a, result.n_b) == (70, 80)
    # One item against eight: a wide interval that covers 0, not a verdict.
    tiny = independent_difference([0.0], [1.0] * 4 + [0.0] * 4)
    assert tiny.ci_low < 0 < tiny.ci_high and not tiny.significant


def test_independent_difference_of_continuous_scores_covers_the_known_shift():
    from moce_model.evaluation.stats import independent_difference

    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 0.2, 60), rng.normal(0.5, 0.2, 80)
    result = independent_difference(a, b)
    # Welch's t interval, the textbook answer for two normal samples, and the bootstrap agree closely.
    t = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert result.ci_low == pytest.approx(t.low, abs=0.02) and result.ci_high == pytest.approx(t.high, abs=0.02)
    assert result.ci_low < 0.5 < result.ci_high
    assert independent_difference([1.5], a).ci_low is None


def test_share_intervals_resample_prompts_not_tokens():
    from moce_model.evaluation.stats import share_intervals_over_prompts

    # 100 prompts of 50 tokens each, one expert per token: half the prompts send every token to expert 0, half
    # to expert 1. The share of expert 0 is the share of such prompts, 0.5, with the binomial standard error over
    # prompts sqrt(0.25 / 100) = 0.05 (a token-level interval would be sqrt(0.25 / 5000) = 0.007).
    counts = np.zeros((100, 2, 2))
    counts[:50, :, 0] = 50
    counts[50:, :, 1] = 50
    low, high, pooled_low, pooled_high = share_intervals_over_prompts(counts)
    assert low.shape == (2, 2) and pooled_low.shape == (2,)
    assert pooled_low[0] == pytest.approx(0.5 - Z * 0.05, abs=0.012)
    assert pooled_high[0] == pytest.approx(0.5 + Z * 0.05, abs=0.012)
    assert low[1, 0] == pooled_low[0] and high[0, 1] == pooled_high[1]
    # Every prompt with the same shares: nothing to resample.
    same = np.tile(np.array([[3.0, 1.0]]), (5, 1, 1))
    low, high, _, _ = share_intervals_over_prompts(same)
    assert low.tolist() == [[0.75, 0.25]] and high.tolist() == [[0.75, 0.25]]
    with pytest.raises(ValueError, match="prompts >= 2"):
        share_intervals_over_prompts(same[:1])
