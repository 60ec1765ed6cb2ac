"""Evaluation-only conditions of the study: a trained run scored again on its held-out items under a change of
the inputs or of the routing, never retrained. Each condition's scores become table rows `layout @condition`
(`moce_model.evaluation.compare.condition_label`), paired on items with the clean runs and with the references under the
same condition.

A condition is one function `prepare(inputs) -> ConditionPlan | None` (in `condition_plans`), registered in
`CONDITIONS`: it gets the
run's held-out rows, its clean scores and (for layouts that route by centroids) the clustering, and says which
rows to score, routed by which router, and which clean scores carry over unchanged; None where it does not apply
to the layout. `evaluate_plan` runs any plan the same way (the held-out loss of `instruction_rows` benchmarks,
through `MoCELM`). A condition that needs a setting adds a field to `StudyConfig` and reads it from
`inputs.config`.

- `noised`: robustness to corrupted prompts, which the AC router's paper (Nielsen et al., ICLR 2025) tests
  on corrupted data (the corruption here is this study's own): a fixed, seeded share of the words of every
  held-out prompt (system, instruction, input) is replaced by other words, the response is untouched, and the
  model routes by the corrupted text as a deployed model would (`corrupt_prompt`).
- `soft`: prompts near the boundary of two clusters are answered by both clusters' groups, mixed by distance
  (`moce_model.clustering.soft.SoftAssignmentRule` with the study's `soft_margin` / `soft_temperature`), on models
  trained with hard clusters; every other item keeps its clean score.
- `adaptive`: the clustering adapts to the held-out prompts instead of staying fixed: the centroids are updated
  incrementally with them (`moce_model.clustering.kmeans.update_centroids`, the same update as the
  `kmeans_centroids` asset's incremental mode) and the held-out items are routed by the updated centroids
  (`adapt_centroids`); the per-cluster drift is reported.
- `blended`: prompts that ask two held-out items of different sources in one (`blended_heldout_rows`, built
  by `moce_model.evaluation.benchmarks.blend_rows`, as the synthetic blended benchmark): the held-out loss of
  the two answers after the blended prompt, against the mean clean loss of the two parts asked alone, and, for
  layouts that route by centroids, whether the blend went to the cluster of its first part, of its second, or
  neither. Its items are its own, not the clean items (`StudyCondition.own_items`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from moce_model.common.io import atomic_write_parquet
from moce_model.evaluation.compare import condition_label
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.runner import ITEM_SCORES_SCHEMA, evaluate_model
from moce_model.evaluation.suites import BenchmarkSpec
from moce_model.study.condition_plans import (
    SCORE_COLUMNS,
    STUDY_CONDITIONS,
    ConditionInputs,
    ConditionPlan,
    StudyCondition,
)
from moce_model.study.config import (
    STUDY_SCORES_SCHEMA,
)

CONDITIONS: dict[str, StudyCondition] = {condition.name: condition for condition in STUDY_CONDITIONS}


def study_condition(name: str) -> StudyCondition:
    try:
        return CONDITIONS[name]
    except KeyError:
        raise ValueError(f"study condition {name!r} is not one of {sorted(CONDITIONS)}") from None


def combine_scores(label: str, seed: int, evaluated: pl.DataFrame, kept: pl.DataFrame | None) -> pl.DataFrame:
    """The study's score rows (STUDY_SCORES_SCHEMA) of one run under a condition: the items scored under it and
    the clean scores it kept, each item once."""

    frames = [evaluated.select(SCORE_COLUMNS)] + ([kept.select(SCORE_COLUMNS)] if kept is not None else [])
    scores = pl.concat([f.cast({"score": pl.Float64}) for f in frames])
    repeated = scores.group_by("benchmark", "metric", "item_id").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"{label}: items both scored and kept: {repeated['item_id'].head(3).to_list()}")
    return scores.select(pl.lit(label).alias("layout"), pl.lit(seed, pl.Int64).alias("seed"),
                         *SCORE_COLUMNS).cast(STUDY_SCORES_SCHEMA)


def evaluate_plan(plan: ConditionPlan, model_dir: Path | str | None, label: str, seed: int, work_dir: Path,
                  **evaluation_settings: Any) -> pl.DataFrame:
    """Score a plan: its rows (written to `work_dir`, kept for inspection) as `instruction_rows` benchmarks of
    the model in `model_dir`, routed by the plan's router (else the model's own), plus its kept scores.
    `evaluation_settings`: device, dtype and prompt format (`Experiment.evaluation_settings`). `model_dir` may be
    None when the plan has no row to score."""

    specs = []
    for benchmark, rows in plan.rows.items():
        if rows.height:
            path = Path(work_dir) / f"{benchmark}.parquet"
            atomic_write_parquet(rows, path)
            specs.append(BenchmarkSpec(name=benchmark, kind="instruction_rows", path=str(path)))
    evaluated = pl.DataFrame(schema={c: ITEM_SCORES_SCHEMA[c] for c in SCORE_COLUMNS})
    if specs:
        if model_dir is None:
            raise ValueError(f"{label}: the plan has rows to score but no model directory was given")

        lm = MoCELM(pretrained=str(model_dir), router=plan.router, soft_assignment=plan.soft_assignment,
                    **evaluation_settings)
        evaluated = evaluate_model(None, model_variant=label, benchmarks=specs, seed=seed, lm=lm).item_scores
    return combine_scores(label, seed, evaluated, plan.kept_scores)


@dataclass(frozen=True)
class ConditionResults:
    """What `score_conditions` gives for one run: the score rows of every condition that applies to it
    (STUDY_SCORES_SCHEMA), each condition's details, and the seconds each took (preparing and scoring)."""

    scores: pl.DataFrame
    details: dict[str, pl.DataFrame]
    seconds: dict[str, float]


def score_conditions(names: Sequence[str], inputs: ConditionInputs, model_dir: Callable[[], Path | str],
                     seed: int, out_dir: Path, **evaluation_settings: Any) -> ConditionResults:
    """Prepare every condition of `names` for one run and score those that apply to its layout. `model_dir` gives
    the run's model directory; it is called once, and only when some plan has rows to score (a merged model is
    rebuilt from the adapters only when needed). Each condition's scored rows are written under
    `out_dir/<condition>/`."""
    import time

    plans: dict[str, ConditionPlan] = {}
    seconds: dict[str, float] = {}
    for name in names:
        started = time.perf_counter()
        plan = study_condition(name).prepare(inputs)
        seconds[name] = time.perf_counter() - started
        if plan is not None:
            plans[name] = plan
    directory = None
    if any(rows.height for plan in plans.values() for rows in plan.rows.values()):
        directory = model_dir()
    frames = [pl.DataFrame(schema=STUDY_SCORES_SCHEMA)]
    for name, plan in plans.items():
        started = time.perf_counter()
        frames.append(evaluate_plan(plan, directory, condition_label(inputs.layout, name), seed, out_dir / name,
                                    **evaluation_settings))
        seconds[name] += time.perf_counter() - started
    details = {name: plan.details for name, plan in plans.items() if plan.details is not None}
    return ConditionResults(pl.concat(frames), details, {name: seconds[name] for name in plans})
