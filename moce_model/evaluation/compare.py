"""What every results table says the same way: which rows are compared with which, how a paired difference
reads, and how numbers and metrics are written. The benchmark report (one training run per model) and the
study table (several seeds per layout) use these; each keeps its own estimator of the difference."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from moce_model.evaluation.metrics import LOWER_IS_BETTER, ROUTING_METRICS
from moce_model.variants import BASE

# The rows every other row is compared with, in this order; a reference is not compared with the ones after it
# (pesc − base is reported, its mirror base − pesc is not).
REFERENCES: tuple[str, ...] = ("pesc", BASE)
# A row label `<layout> @<condition>`: the same runs evaluated under an evaluation-only condition.
CONDITION_MARK = " @"
NO_VALUE = "–"


def condition_label(layout: str, condition: str | None) -> str:
    return layout if condition is None else f"{layout}{CONDITION_MARK}{condition}"


def split_condition_label(label: str) -> tuple[str, str | None]:
    layout, mark, condition = label.partition(CONDITION_MARK)
    return (layout, condition) if mark else (label, None)


def comparisons(labels: Sequence[str], references: Sequence[str] = REFERENCES,
                counterparts: Mapping[str, str] | None = None, own_items: Collection[str] = ()
                ) -> list[tuple[str, str]]:
    """(row, reference row) pairs of the paired differences, among the row labels present, in their order:

    - every row against each reference under the same condition (`moce/e4 @noised` against `pesc @noised` and
      `base @noised`); a reference is not compared with the references listed after it;
    - a layout against its counterpart (`counterparts`: the linear router for another token router, `moce` for
      `random_group`), under the same condition;
    - a row under a condition against the same runs without it (`moce/e4 @noised` against `moce/e4`), except under
      the conditions of `own_items`, which score items of their own rather than the clean items."""
    present = set(labels)
    counterparts = counterparts or {}
    pairs: list[tuple[str, str]] = []
    for label in labels:
        layout, condition = split_condition_label(label)
        candidates = [condition_label(reference, condition) for index, reference in enumerate(references)
                      if layout != reference and layout not in references[index + 1:]]
        if layout in counterparts:
            candidates.append(condition_label(counterparts[layout], condition))
        if condition is not None and condition not in own_items:
            candidates.append(layout)
        for reference in candidates:
            if reference in present and reference != label and (label, reference) not in pairs:
                pairs.append((label, reference))
    return pairs


def side_name(label: str, other: str) -> str:
    """How a verdict names one row of a pair: the row label, or, where both rows are the same runs under two
    conditions, just the condition ("clean" for none)."""
    layout, condition = split_condition_label(label)
    if layout != split_condition_label(other)[0]:
        return label
    return "clean" if condition is None else f"{CONDITION_MARK.strip()}{condition}"


def verdict(significant: bool, difference: float, metric: str, sides: tuple[str, str]) -> str:
    """How a paired difference `sides[0] − sides[1]` of `metric` reads: which side is better (or, for a routing
    metric, higher), or that the interval covers 0."""
    if not significant:
        return "no significant difference"
    if metric in ROUTING_METRICS:  # where prompts went: a difference, not a better model
        return f"{sides[0] if difference > 0 else sides[1]} higher"
    better = (difference < 0) if metric in LOWER_IS_BETTER else (difference > 0)
    return f"{sides[0] if better else sides[1]} better"


def format_value(value: float | None, signed: bool = False) -> str:
    if value is None or value != value:  # None or NaN
        return NO_VALUE
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def with_interval(value: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    if value is None:
        return NO_VALUE
    if low is None or high is None:
        return f"{format_value(value, signed)} (no interval)"
    return f"{format_value(value, signed)} [{format_value(low, signed)}, {format_value(high, signed)}]"


def metric_label(metric: str) -> str:
    """The metric's name, marked `↓` where lower is better."""
    return f"{metric} ↓" if metric in LOWER_IS_BETTER else metric
