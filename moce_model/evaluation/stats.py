"""Uncertainty of benchmark scores: intervals of a mean over items, paired differences between two models on
the same items, the minimum detectable difference at a given n, and the average over several benchmarks.

Every interval is a two-sided 95% interval. Which method, and why:

- A mean of 0/1 scores (exact match, pass@1, accuracy) is a binomial proportion: the Wilson score interval
  (scipy). It keeps close to its nominal coverage at small n and near 0 or 1, where the normal (Wald)
  interval collapses to a single point (0 of 8 correct would give [0, 0]).
- A mean of continuous scores (held-out loss per item): the BCa bootstrap over items (scipy, seeded). Per-item
  losses are skewed; BCa corrects the percentile interval for skew and bias without assuming normality.
- A paired difference of 0/1 scores: the Bonett–Price interval for paired proportions, which Fagerland,
  Lydersen and Laake (Stat. Med. 2014, "Recommended tests and confidence intervals for paired binomial
  proportions") recommend. A bootstrap of the mean difference is anti-conservative when few items are
  discordant (4 items won and 0 lost out of 32 excludes 0 under the percentile bootstrap, while the exact
  McNemar test gives p = 0.125). Neither scipy nor numpy provides it, so it is written out here.
- A paired difference of continuous scores: the BCa bootstrap of the mean per-item difference. Resampling
  items with both models' scores together (the paired bootstrap) is the same as resampling the differences.
- A difference between two disjoint sets of items (e.g. the prompts routed off their benchmark's usual cluster
  against the others, scored by one model): Newcombe's hybrid score interval (Stat. Med. 1998, method 10) for
  0/1 scores, built from the two Wilson intervals; it keeps its coverage at small n, unlike the Wald interval.
  Continuous scores: the BCa bootstrap of the difference of means, each set resampled on its own.
- The share of a group's tokens that went to each expert: a ratio of sums over prompts whose tokens are not
  independent of each other (one prompt's tokens share its topic), so the unit resampled is the prompt: a
  percentile bootstrap over prompts of (expert's assignments) / (group's assignments).
- The average over benchmarks (the paper's headline number), and the paired difference of two models'
  averages: each benchmark's mean is independent of the others, so the average's variance is the sum of the
  benchmarks' variances over B². 0/1 benchmarks enter with the adjusted estimates of Price and Bonett (2004,
  "An improved confidence interval for a linear function of binomial proportions": 2/B successes and 4/B
  trials added to each), paired 0/1 differences with the Bonett–Price adjustment scaled the same way (1/B to
  each discordant cell, 2/B to n), which is Bonett–Price itself at B = 1. A stratified bootstrap was the first
  choice, but with a benchmark of 4 items and one discordant item it excluded 0 where no component came close:
  resampling a few 0/1 items understates their variance.

`stderr` of a mean over items is s / sqrt(n) with s the sample standard deviation (ddof = 1), which is also
what lm-eval reports (None when n < 2); of an average over benchmarks, the standard error of the combined
estimate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
POWER = 0.80
BOOTSTRAP_RESAMPLES = 9_999
BOOTSTRAP_SEED = 0
_Z_HALF_ALPHA = float(scipy_stats.norm.ppf(1 - ALPHA / 2))  # 1.960
_Z_POWER = float(scipy_stats.norm.ppf(POWER))  # 0.842


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` items with its standard error and 95% interval; `method` names the interval."""

    value: float
    n: int
    stderr: float | None
    ci_low: float | None
    ci_high: float | None
    method: str


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (a − b) over the `n` items both models answered, its 95% interval, and the minimum detectable
    difference (`mdd`) of this comparison at this n (None when the differences carry no variance estimate)."""

    n: int
    difference: float
    stderr: float | None
    ci_low: float
    ci_high: float
    mdd: float | None
    method: str

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


@dataclass(frozen=True)
class IndependentDifference:
    """mean(a) − mean(b) of two disjoint sets of items (`n_a`, `n_b` items), with its 95% interval (None when a
    set of continuous scores has fewer than two items)."""

    n_a: int
    n_b: int
    difference: float
    ci_low: float | None
    ci_high: float | None
    method: str

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)


def is_binary(scores: np.ndarray) -> bool:
    return bool(scores.size) and bool(np.isin(scores, (0.0, 1.0)).all())


def wilson_interval(proportion: float, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion observed on n trials (a proportion pooled over seeds may be
    fractional, so the closed form rather than a binomial test on counts)."""
    z = _Z_HALF_ALPHA
    centre = (proportion + z**2 / (2 * n)) / (1 + z**2 / n)
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    # The interval holds the proportion; in floating point a bound can land a hair past it (5.6e-17 above 0 for
    # 0 of 3), which draws a negative error bar.
    return min(max(centre - half_width, 0.0), proportion), max(min(centre + half_width, 1.0), proportion)


def standard_error(scores: np.ndarray) -> float | None:
    if scores.size < 2:
        return None
    return float(scores.std(ddof=1) / math.sqrt(scores.size))


def mean_estimate(scores: Sequence[float] | np.ndarray, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """The mean of per-item scores with its 95% interval: Wilson for 0/1 scores, BCa bootstrap otherwise."""
    values = _as_scores(scores)
    mean = float(values.mean())
    stderr = standard_error(values)
    if is_binary(values):
        low, high = wilson_interval(mean, values.size)
        return Estimate(mean, values.size, stderr, low, high, "wilson")
    if values.size < 2:
        return Estimate(mean, values.size, None, None, None, "none (one item)")
    low, high = _bootstrap((values,), _mean_of_first, seed, method="BCa")
    return Estimate(mean, values.size, stderr, low, high, "bootstrap BCa")


def normal_interval(value: float, stderr: float | None) -> tuple[float | None, float | None]:
    """value ± z · stderr: for metrics that come with a standard error but without per-item scores."""
    if stderr is None or not math.isfinite(stderr):
        return None, None
    return value - _Z_HALF_ALPHA * stderr, value + _Z_HALF_ALPHA * stderr


def minimum_detectable_difference(sd_of_differences: float, n: int, alpha: float = ALPHA,
                                  power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired test at level `alpha` detects with probability
    `power`, normal approximation: MDD = (z_{1-alpha/2} + z_{power}) · s_d / sqrt(n)  (2.80 · s_d / sqrt(n) at
    alpha 0.05, power 0.8), with s_d the standard deviation of the per-item differences."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    z_sum = float(scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power))
    return z_sum * sd_of_differences / math.sqrt(n)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """Mean of a − b over items (a[i] and b[i] are two models' scores on the same item i) with its 95%
    interval and the minimum detectable difference at this n."""
    first, second = _as_scores(a), _as_scores(b)
    if first.shape != second.shape:
        raise ValueError(f"paired scores need one score per item from both models, got {first.size} and {second.size}")
    n = first.size
    differences = first - second
    mean = float(differences.mean())
    stderr = standard_error(differences)
    if is_binary(first) and is_binary(second):
        low, high, sd = bonett_price(int(((first == 1) & (second == 0)).sum()),
                                      int(((first == 0) & (second == 1)).sum()), n)
        return PairedDifference(n, mean, stderr, low, high, minimum_detectable_difference(sd, n), "bonett-price")
    if n < 2:
        raise ValueError("a paired difference of continuous scores needs at least two items")
    sd = float(differences.std(ddof=1))
    if sd == 0.0:
        # Every item differs by the same amount (e.g. two identical models): no spread to resample.
        return PairedDifference(n, mean, 0.0, mean, mean, None, "none (identical differences)")
    low, high = _bootstrap((differences,), _mean_of_first, seed, method="BCa")
    return PairedDifference(n, mean, stderr, low, high, minimum_detectable_difference(sd, n), "paired bootstrap BCa")


def independent_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                           seed: int = BOOTSTRAP_SEED) -> IndependentDifference:
    """mean(a) − mean(b) where a and b score different items, with its 95% interval: Newcombe's hybrid score
    interval for 0/1 scores, else the BCa bootstrap resampling a and b separately."""
    first, second = _as_scores(a), _as_scores(b)
    difference = float(first.mean() - second.mean())
    if is_binary(first) and is_binary(second):
        estimate_a, estimate_b = mean_estimate(first), mean_estimate(second)
        p_a, p_b = estimate_a.value, estimate_b.value
        low = difference - math.sqrt((p_a - estimate_a.ci_low) ** 2 + (estimate_b.ci_high - p_b) ** 2)
        high = difference + math.sqrt((estimate_a.ci_high - p_a) ** 2 + (p_b - estimate_b.ci_low) ** 2)
        return IndependentDifference(first.size, second.size, difference, low, high, "newcombe hybrid score")
    if first.size < 2 or second.size < 2:
        return IndependentDifference(first.size, second.size, difference, None, None,
                                     "none (a set with one item)")
    if first.std() == 0.0 and second.std() == 0.0:
        return IndependentDifference(first.size, second.size, difference, difference, difference,
                                     "none (no spread)")
    low, high = _bootstrap((first, second), _difference_of_means, seed, method="BCa", paired=False)
    return IndependentDifference(first.size, second.size, difference, low, high, "bootstrap BCa (independent)")


def share_intervals_over_prompts(counts: np.ndarray, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """95% percentile-bootstrap intervals, resampling prompts, of each expert's share of the assignments.

    `counts` [prompts, layers, experts]: each prompt's assignments per layer and expert (one group). Returns
    (low, high) of the share per layer [layers, experts] and (low, high) of the share pooled over layers
    [experts]. Needs at least two prompts."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[0] < 2:
        raise ValueError(f"share intervals need (prompts >= 2, layers, experts) counts, got shape {counts.shape}")
    prompts, layers, experts = counts.shape
    rng = np.random.default_rng(seed)
    # Each resample as multiplicities of the prompts: one matmul instead of gathering resampled rows.
    weights = rng.multinomial(prompts, np.full(prompts, 1.0 / prompts), size=resamples).astype(np.float64)
    totals = (weights @ counts.reshape(prompts, layers * experts)).reshape(resamples, layers, experts)
    per_layer = totals / np.maximum(totals.sum(axis=2, keepdims=True), 1e-300)
    pooled_totals = totals.sum(axis=1)
    pooled = pooled_totals / np.maximum(pooled_totals.sum(axis=1, keepdims=True), 1e-300)
    tail = 100 * ALPHA / 2
    return (np.percentile(per_layer, tail, axis=0), np.percentile(per_layer, 100 - tail, axis=0),
            np.percentile(pooled, tail, axis=0), np.percentile(pooled, 100 - tail, axis=0))


def _difference_of_means(first: np.ndarray, second: np.ndarray, axis: int = -1) -> np.ndarray:
    return first.mean(axis=axis) - second.mean(axis=axis)


def bonett_price(won: float, lost: float, n: int) -> tuple[float, float, float]:
    """Bonett & Price (2012) adjusted Wald interval for p10 − p01 of paired 0/1 outcomes: add one to each
    discordant cell and two to n, then p̃10 − p̃01 ± z · sqrt((p̃10 + p̃01 − (p̃10 − p̃01)²) / (n + 2)).

    Returns (low, high, s_d) with s_d = sqrt(p̃10 + p̃01 − (p̃10 − p̃01)²), the adjusted standard deviation of
    one item's difference; it stays positive when no item is discordant, so the MDD stays meaningful then.
    `won` and `lost` may be fractional: the study pools them over seeds."""
    p_won, p_lost = (won + 1) / (n + 2), (lost + 1) / (n + 2)
    centre = p_won - p_lost
    sd = math.sqrt(p_won + p_lost - centre**2)
    half_width = _Z_HALF_ALPHA * sd / math.sqrt(n + 2)
    return max(centre - half_width, -1.0), min(centre + half_width, 1.0), sd


def average_estimate(per_benchmark_scores: Sequence[Sequence[float] | np.ndarray]) -> Estimate:
    """Unweighted mean over benchmarks of each benchmark's mean score (each benchmark counts once, whatever
    its n), with its 95% interval (see the module docstring); `n` is the number of items in all."""
    samples = [_as_scores(s) for s in per_benchmark_scores]
    if not samples:
        raise ValueError("an average over benchmarks needs at least one benchmark")
    weight = 1 / len(samples)
    components = []
    for sample in samples:
        if is_binary(sample):
            # Price & Bonett (2004): add 2/B successes and 4/B trials to each of B proportions.
            adjusted_n = sample.size + 4 * weight
            adjusted = (sample.sum() + 2 * weight) / adjusted_n
            components.append((adjusted, adjusted * (1 - adjusted) / adjusted_n))
        else:
            components.append((sample.mean(), sample.var(ddof=1) / sample.size if sample.size > 1 else math.nan))
    return _combined(float(np.mean([s.mean() for s in samples])), sum(s.size for s in samples), components,
                     "adjusted wald (price-bonett)")


def average_difference(per_benchmark_a: Sequence[Sequence[float] | np.ndarray],
                       per_benchmark_b: Sequence[Sequence[float] | np.ndarray]) -> PairedDifference:
    """Difference of two models' averages over benchmarks, paired on items within each benchmark
    (per_benchmark_a[j][i] and per_benchmark_b[j][i] score the same item), with its 95% interval and MDD."""
    if len(per_benchmark_a) != len(per_benchmark_b) or not per_benchmark_a:
        raise ValueError("an average difference needs the same benchmarks, at least one, for both models")
    weight = 1 / len(per_benchmark_a)
    raw, components, n = [], [], 0
    for a, b in zip(per_benchmark_a, per_benchmark_b):
        first, second = _as_scores(a), _as_scores(b)
        if first.shape != second.shape:
            raise ValueError(f"paired scores need one score per item from both models, got {first.size} and {second.size}")
        differences = first - second
        raw.append(differences.mean())
        n += differences.size
        if is_binary(first) and is_binary(second):
            # Bonett–Price with its adjustment scaled by 1/B, as Price & Bonett scale theirs for B proportions.
            adjusted_n = differences.size + 2 * weight
            won = (((first == 1) & (second == 0)).sum() + weight) / adjusted_n
            lost = (((first == 0) & (second == 1)).sum() + weight) / adjusted_n
            components.append((won - lost, (won + lost - (won - lost) ** 2) / adjusted_n))
        else:
            variance = differences.var(ddof=1) / differences.size if differences.size > 1 else math.nan
            components.append((differences.mean(), variance))
    estimate = _combined(float(np.mean(raw)), n, components, "adjusted wald (bonett-price)")
    if estimate.ci_low is None or estimate.ci_high is None or estimate.stderr is None:
        raise ValueError("a paired average difference needs at least two items in every continuous benchmark")
    mdd = (_Z_HALF_ALPHA + _Z_POWER) * estimate.stderr if estimate.stderr > 0 else None
    return PairedDifference(n, estimate.value, estimate.stderr, estimate.ci_low, estimate.ci_high, mdd, estimate.method)


def _combined(value: float, n: int, components: list[tuple[float, float]], method: str) -> Estimate:
    """An unweighted mean of B independent estimates (centre, variance): centre ± z · sqrt(Σ variance) / B."""
    variances = [variance for _, variance in components]
    if not all(math.isfinite(v) for v in variances):
        return Estimate(value, n, None, None, None, "none (a benchmark with one item)")
    centre = float(np.mean([c for c, _ in components]))
    stderr = math.sqrt(sum(variances)) / len(components)
    return Estimate(value, n, stderr, centre - _Z_HALF_ALPHA * stderr, centre + _Z_HALF_ALPHA * stderr, method)


def _mean_of_first(sample: np.ndarray, axis: int = -1) -> np.ndarray:
    return sample.mean(axis=axis)


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, seed: int, method: str,
               paired: bool = True) -> tuple[float, float]:
    with warnings.catch_warnings():
        # scipy warns when a resampled statistic is degenerate; callers have handled the no-spread cases.
        warnings.simplefilter("ignore", category=scipy_stats.DegenerateDataWarning)
        result = scipy_stats.bootstrap(samples, statistic, n_resamples=BOOTSTRAP_RESAMPLES, vectorized=True,
                                       confidence_level=CONFIDENCE, method=method, paired=paired and len(samples) > 1,
                                       rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        # BCa's acceleration is undefined for some near-degenerate samples; the percentile interval is not.
        if method != "percentile":
            return _bootstrap(samples, statistic, seed, method="percentile", paired=paired)
        return low, high
    return low, high


def _as_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no scores: a mean over items needs at least one item")
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite numbers")
    return values
