"""One run of the study, as `study_runs` runs it: train a layout at a seed on the training split, merge it, check
the merged model against the unmerged one, evaluate it on the held-out split of every source (and the GSM8K
sample, and the HumanEval multiple-choice probe outside the training mix), and write its item scores and run record. Training is a callable the caller passes, so that the
orchestrator decides where it runs (in process, torchrun, a subprocess)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from moce_model.clustering.embedding import load_embedder
from moce_model.clustering.kmeans import load_centroids, read_embeddings
from moce_model.common.io import atomic_write_parquet, atomic_write_text
from moce_model.evaluation.humaneval_choice import (
    humaneval_choice_spec,
    write_humaneval_choice_task,
)
from moce_model.evaluation.runner import evaluate_model
from moce_model.evaluation.suites import BenchmarkSpec, default_gsm8k_path
from moce_model.merging import compare_merged_to_unmerged, merge_trained
from moce_model.model.config import MoCEConfig
from moce_model.study.condition_plans import ConditionInputs
from moce_model.study.conditions import score_conditions
from moce_model.study.config import StudyConfig, parse_run_key, trainable_parameters
from moce_model.training import TrainingConfig
from moce_model.training.trainer import ARTIFACT_DIRNAME


@dataclass(frozen=True)
class TrainRequest:
    """What one study run asks the trainer for."""

    variant: str
    rows: pl.DataFrame
    moce_config: MoCEConfig
    num_clusters: int | None
    cluster_ids: dict[str, int] | None
    centroids_path: str | None
    embedder: dict | None
    training_config: TrainingConfig
    run_dir: Path


@dataclass(frozen=True)
class TrainedAdapters:
    directory: Path
    # The trainer's facts about the run: optimizer_steps, final_loss, tokens_per_second, loss_curve, ...
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyRunInputs:
    config: StudyConfig
    run_key: str
    base_model_dir: Path
    instructions: pl.DataFrame
    heldout_ids: pl.Series
    heldout_files: Mapping[str, str]
    k: int
    centroids_path: str
    embedder: dict | None
    cluster_ids: dict[str, int]
    training_config: TrainingConfig
    evaluation_settings: Mapping[str, Any]
    run_dir: Path


@dataclass(frozen=True)
class StudyRunResult:
    record: dict[str, Any]
    facts: dict[str, Any]
    scores_table: pl.DataFrame
    gsm8k_missing: bool


def heldout_benchmark_specs(heldout_files: Mapping[str, str], config: StudyConfig,
                            probe_tasks_dir: Path | None = None) -> list[BenchmarkSpec]:
    """Each source's held-out rows (benchmark `heldout_<source>`), plus the GSM8K test sample when it is found,
    plus, with `probe_tasks_dir` (the folder `write_humaneval_choice_task` wrote), the HumanEval multiple-choice
    probe of `config.humaneval_choice_items` problems: the one benchmark outside the training distribution."""
    specs = [BenchmarkSpec(name=f"heldout_{source}", kind="instruction_rows", path=path)
             for source, path in sorted(heldout_files.items())]
    gsm8k_path = default_gsm8k_path()
    if config.gsm8k_items and gsm8k_path is not None:
        specs.append(BenchmarkSpec(name="gsm8k_test", kind="gsm8k", path=str(gsm8k_path),
                                   n_items=config.gsm8k_items, max_new_tokens=config.gsm8k_max_new_tokens))
    if config.humaneval_choice_items and probe_tasks_dir is not None:
        specs.append(humaneval_choice_spec(probe_tasks_dir, config.humaneval_choice_items))
    return specs


def run_study_layout(inputs: StudyRunInputs, train: Callable[[TrainRequest], TrainedAdapters]) -> StudyRunResult:
    config = inputs.config
    layout, seed = parse_run_key(config, inputs.run_key)
    seed_value = seed if seed is not None else 0
    base_config = json.loads((inputs.base_model_dir / "config.json").read_text())
    timings: dict[str, float] = {}
    # CPU seconds of this process as well as wall seconds: on a shared machine the wall time says more about the
    # other jobs than about the run; one-thread CPU time is what the run costs an idle core.
    cpu_started = time.process_time()
    facts: dict[str, Any] = {"layout": layout.name, "seed": seed, "k": inputs.k}
    moce_config = None
    model_dir = inputs.base_model_dir
    if layout.trained:
        moce_config = layout.moce_config(config, inputs.k, inputs.embedder)
        rows = inputs.instructions.filter(~pl.col("id").is_in(inputs.heldout_ids.implode())).select(
            "id", "system", "instruction", "input", "response")
        # A seeded sample: seeds differ in the rows they see (and in their order and initialisation).
        if config.train_rows < rows.height:
            rows = rows.sample(n=config.train_rows, seed=seed_value, shuffle=True)
        routed = moce_config.needs_centroids
        started = time.perf_counter()
        trained = train(TrainRequest(
            variant=layout.variant, rows=rows, moce_config=moce_config,
            num_clusters=inputs.k if moce_config.needs_num_clusters else None,
            cluster_ids=inputs.cluster_ids if routed else None,
            centroids_path=inputs.centroids_path if routed else None,
            embedder=inputs.embedder if routed else None,
            training_config=inputs.training_config, run_dir=inputs.run_dir / "training",
        ))
        timings["train_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        model_dir = merge_trained(trained.directory, inputs.base_model_dir, inputs.run_dir / "merged",
                                  inputs.centroids_path if routed else None, inputs.embedder if routed else None)
        check = compare_merged_to_unmerged(model_dir, trained.directory, inputs.base_model_dir)
        timings["merge_seconds"] = time.perf_counter() - started
        if not check.passed:
            raise ValueError(f"{inputs.run_key}: the merged model does not reproduce the unmerged model: "
                             f"{check.describe()}")
        facts.update({
            "merge_check_max_abs_logit_diff": check.max_abs_diff, "merge_check_tolerance": check.tolerance,
            "merge_check": check.describe(), "train_rows": rows.height,
            **{name: trained.facts.get(name) for name in
               ("optimizer_steps", "final_loss", "loss_curve", "tokens_per_second")},
        })

    # Every run writes the same documents (fixed seed), so the layouts are compared on the same items.
    probe_dir = (write_humaneval_choice_task(inputs.run_dir / "lm_eval_tasks")
                 if config.humaneval_choice_items else None)
    benchmarks = heldout_benchmark_specs(inputs.heldout_files, config, probe_dir)
    started = time.perf_counter()
    result = evaluate_model(model_dir, model_variant=layout.name, benchmarks=benchmarks, seed=seed_value,
                            **inputs.evaluation_settings)
    timings["evaluation_seconds"] = time.perf_counter() - started
    timings["cpu_seconds"] = time.process_time() - cpu_started
    if layout.trained and not config.keep_merged_models:
        shutil.rmtree(model_dir)

    total, active = trainable_parameters(moce_config, base_config, inputs.training_config.lora_r,
                                         inputs.training_config.lora_targets)
    scores = result.item_scores.select(
        pl.lit(layout.name).alias("layout"), pl.lit(seed_value, pl.Int64).alias("seed"),
        "benchmark", "metric", "item_id", "score")
    atomic_write_parquet(scores, inputs.run_dir / "item_scores.parquet")
    gsm8k_path = default_gsm8k_path()
    record = {
        "layout": layout.name, "variant": layout.variant, "seed": seed, "k": inputs.k,
        "groups": moce_config.num_groups if moce_config else None,
        "experts_per_group": moce_config.experts_per_group if moce_config else None,
        "router_top_k": moce_config.router_top_k if moce_config else None,
        "total_trainable": total, "active_trainable": active, "note": layout.note,
        "gsm8k_file": str(gsm8k_path) if gsm8k_path else None,
        **{name: round(value, 1) for name, value in timings.items()},
    }
    atomic_write_text(json.dumps(record, indent=2), inputs.run_dir / "run.json")
    facts.update({name: round(value, 1) for name, value in timings.items()})
    facts.update(total_trainable_parameters=total, active_trainable_parameters=active)
    return StudyRunResult(record=record, facts=facts, scores_table=result.table.drop("ci_method", "model_variant"),
                          gsm8k_missing=gsm8k_path is None and bool(config.gsm8k_items))


@dataclass(frozen=True)
class ConditionsResult:
    record: dict[str, Any]
    timings: dict[str, float]
    means: pl.DataFrame
    details: dict[str, pl.DataFrame]


def rescore_run_conditions(config: StudyConfig, run_key: str, run_dir: Path, out_dir: Path, *, base_model_dir: Path,
                           heldout_files: Mapping[str, str], centroids_path: str, embedder: dict | None,
                           embeddings_path: str, evaluation_settings: Mapping[str, Any]) -> ConditionsResult:
    """Score a finished study run again on its held-out items under each of the study's evaluation-only
    conditions, from the adapters the run kept (merged again where the run did not keep its merged model; the
    same merge as `run_study_layout`, whose check passed on these adapters, so not checked again)."""
    layout, seed = parse_run_key(config, run_key)
    clean_scores = pl.read_parquet(run_dir / "item_scores.parquet")
    heldout = {spec.name: pl.read_parquet(spec.path) for spec in heldout_benchmark_specs(heldout_files, config)
               if spec.kind == "instruction_rows"}
    adapter_dir = run_dir / "training" / ARTIFACT_DIRNAME
    moce_config = None
    if layout.trained:
        if not (adapter_dir / "config.json").is_file():
            raise FileNotFoundError(f"study_runs {run_key} kept no adapters at {adapter_dir}: materialize it again")
        moce_config = MoCEConfig.from_pretrained(adapter_dir)
    routed = {}
    if moce_config is not None and moce_config.needs_centroids:
        routed = {"centroids": load_centroids(centroids_path)[0], "encoder": load_embedder(embedder),
                  "embeddings": read_embeddings(embeddings_path)}
    inputs = ConditionInputs(layout.name, config, heldout, clean_scores, moce_config, **routed)
    merged_dir = run_dir / "merged"  # kept by the run with keep_merged_models
    rebuilt: list[Path] = []
    timings: dict[str, float] = {}

    def model_dir() -> Path:
        if not layout.trained:
            return base_model_dir
        if merged_dir.is_dir():
            return merged_dir
        started = time.perf_counter()
        routed_by_cluster = moce_config.needs_centroids
        path = merge_trained(adapter_dir, base_model_dir, out_dir / "merged",
                             centroids_path if routed_by_cluster else None, embedder if routed_by_cluster else None)
        timings["merge_seconds"] = time.perf_counter() - started
        rebuilt.append(path)
        return path

    cpu_started = time.process_time()
    try:
        results = score_conditions(config.conditions, inputs, model_dir, seed if seed is not None else 0, out_dir,
                                   **evaluation_settings)
    finally:
        for path in rebuilt:
            shutil.rmtree(path, ignore_errors=True)
    timings.update({f"{name}_seconds": value for name, value in results.seconds.items()})
    timings["cpu_seconds"] = time.process_time() - cpu_started
    timings = {name: round(value, 1) for name, value in timings.items()}
    atomic_write_parquet(results.scores, out_dir / "condition_scores.parquet")
    for stale in out_dir.glob("details_*.parquet"):  # of conditions no longer applied; the table reads these
        stale.unlink()
    for name, details in results.details.items():
        atomic_write_parquet(details, out_dir / f"details_{name}.parquet")
    record = {"layout": layout.name, "seed": seed, "conditions": list(results.seconds),
              "conditions_considered": list(config.conditions), **timings}
    atomic_write_text(json.dumps(record, indent=2), out_dir / "conditions.json")
    means = results.scores.group_by("layout", "benchmark", "metric").agg(
        pl.len().alias("n_items"), pl.col("score").mean().alias("mean")).sort("layout", "benchmark")
    return ConditionsResult(record=record, timings=timings, means=means, details=dict(results.details))
