"""Evaluate one model directory on a benchmark set: the results table and which expert group answered
each prompt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.common.progress import evaluation_progress
from moce_model.evaluation.benchmarks import BenchmarkOutcome, run_benchmark
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.lm_eval_suite import LM_EVAL_KINDS, run_lm_eval
from moce_model.evaluation.stats import (
    mean_estimate,
    normal_interval,
    share_intervals_over_prompts,
)
from moce_model.evaluation.suites import BenchmarkSpec, resolve_benchmarks

logger = logging.getLogger(__name__)

# One row per (variant, benchmark, metric): the mean over n_items items, its standard error and 95% interval
# (ci_method names how the interval was computed, see moce_model.evaluation.stats).
RESULTS_SCHEMA: dict[str, pl.DataType] = {
    "model_variant": pl.String(),
    "benchmark": pl.String(),
    "metric": pl.String(),
    "value": pl.Float64(),
    "n_items": pl.Int64(),
    "stderr": pl.Float64(),
    "ci_low": pl.Float64(),
    "ci_high": pl.Float64(),
    "ci_method": pl.String(),
    "seconds": pl.Float64(),
}
# One row per (variant, benchmark, metric, item): the item's score, and the expert group (cluster) that answered
# it (null for models without a cluster router). Differences between models are paired on item_id.
ITEM_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "model_variant": pl.String(),
    "benchmark": pl.String(),
    "metric": pl.String(),
    "item_id": pl.String(),
    "score": pl.Float64(),
    "cluster": pl.Int64(),
}
# One row per (variant, benchmark, layer, group, expert) for the groups that received tokens of the benchmark:
# `assignments` is how many of the group's tokens had the expert among their top-k, `group_tokens` how many
# tokens the group processed at that layer (every token picks top_k experts: the assignments of a (layer,
# group) add up to top_k · group_tokens), `share` = assignments / their sum over the group's experts (sums to 1).
# `n_items`: the benchmark's prompts, whose tokens (prompt, scored reference, generated) were counted;
# `n_prompts`: the prompts of this group. The share's 95% interval resamples the group's prompts (percentile
# bootstrap, `stats.share_intervals_over_prompts`), at this layer (`share_ci_*`) and pooled over the layers
# (`pooled_*`, the same on every layer's row); null with fewer than two prompts, or where some tokens could
# not be attributed to their prompt (lm-eval tasks).
EXPERT_USE_SCHEMA: dict[str, pl.DataType] = {
    "model_variant": pl.String(),
    "benchmark": pl.String(),
    "layer": pl.Int64(),
    "group": pl.Int64(),
    "expert": pl.Int64(),
    "assignments": pl.Int64(),
    "group_tokens": pl.Int64(),
    "share": pl.Float64(),
    "n_items": pl.Int64(),
    "n_prompts": pl.Int64(),
    "share_ci_low": pl.Float64(),
    "share_ci_high": pl.Float64(),
    "pooled_share": pl.Float64(),
    "pooled_ci_low": pl.Float64(),
    "pooled_ci_high": pl.Float64(),
}
# The router's embedding of each evaluated prompt (its input side, as the centroids were fit) and its cluster:
# for the 2-D map of the evaluation prompts. Only prompts the model routed by embedding.
PROMPT_EMBEDDINGS_SCHEMA: dict[str, pl.DataType] = {
    "benchmark": pl.String(), "item_id": pl.String(), "cluster": pl.Int64(), "embedding": pl.List(pl.Float32()),
}
# The evaluated prompts a soft assignment gave two expert groups: the nearest cluster (the item's `cluster`
# elsewhere), the second-nearest and its weight (the nearest has 1 - second_weight). Prompts routed to one group
# are not in it; lm-eval items (routed by their documents) are not either.
SOFT_ROUTING_SCHEMA: dict[str, pl.DataType] = {
    "benchmark": pl.String(), "item_id": pl.String(), "cluster": pl.Int64(), "second_cluster": pl.Int64(),
    "second_weight": pl.Float64(),
}
ITEM_CLUSTERS_SCHEMA: dict[str, pl.DataType] = {"benchmark": pl.String(), "item_id": pl.String(), "cluster": pl.Int64()}
ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "benchmark": pl.String(), "item_id": pl.String(), "prompt": pl.String(), "completion": pl.String(),
    "correct": pl.Boolean(), "cluster": pl.Int64(),
}

@dataclass
class EvalResult:
    """`table`: one row per (variant, benchmark, metric) with n, stderr and 95% interval (RESULTS_SCHEMA);
    `item_scores`: every item's score per metric, with the cluster that answered it (ITEM_SCORES_SCHEMA);
    `items`: per-item prompt, completion and correctness for inspection; `notes`: how each benchmark was
    subset; `expert_use`: the share of each benchmark's tokens per expert, group and layer, counted while the
    benchmark ran (EXPERT_USE_SCHEMA; empty for a model without experts)."""

    table: pl.DataFrame
    item_scores: pl.DataFrame
    items: pl.DataFrame
    notes: dict[str, str]
    expert_use: pl.DataFrame = dataclasses.field(default_factory=lambda: pl.DataFrame(schema=EXPERT_USE_SCHEMA))
    prompt_embeddings: pl.DataFrame = dataclasses.field(
        default_factory=lambda: pl.DataFrame(schema=PROMPT_EMBEDDINGS_SCHEMA))
    # The prompts answered by two groups (SOFT_ROUTING_SCHEMA; empty when soft assignment was off).
    soft_routing: pl.DataFrame = dataclasses.field(default_factory=lambda: pl.DataFrame(schema=SOFT_ROUTING_SCHEMA))
    # The soft assignment rule the prompts were routed by (None: hard routing, or a model without clusters).
    soft_assignment: SoftAssignmentRule | None = None

    @property
    def item_clusters(self) -> pl.DataFrame:
        """benchmark, item_id, cluster: which expert group answered each prompt (ITEM_CLUSTERS_SCHEMA)."""
        return self.items.select(list(ITEM_CLUSTERS_SCHEMA)).cast(ITEM_CLUSTERS_SCHEMA)


def evaluate_model(
    model_dir: Path | str | None,
    model_variant: str,
    benchmarks: Sequence[BenchmarkSpec] | Sequence[str],
    limit_per_benchmark: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    seed: int = 0,
    lm: MoCELM | None = None,
    num_threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    autocast: str = "none",
    prompt_format: str = "auto",
    soft_assignment: SoftAssignmentRule | bool | None = None,
) -> EvalResult:
    """Evaluate a model directory (or an already built `lm`) on `benchmarks`.

    `limit_per_benchmark` caps the items of every benchmark; `max_new_tokens` (when given) caps every
    benchmark's generation budget; `seed` seeds torch and the synthetic held-out items. `device` / `dtype`
    place the model and `autocast` (`none` or `bfloat16`) runs its matmuls in bf16 (the experiment's evaluation
    settings, `Experiment.evaluation_settings`); `prompt_format` is the experiment's prompt format
    (`moce_model.data.prompt_format`), the one the model was trained with.

    `soft_assignment` routes the prompts near a cluster boundary to two groups (`SoftAssignmentRule`): None
    follows the model's config, False routes every prompt to one group, True uses the config's margin and
    temperature, a rule its own; so a model trained with hard clusters can be evaluated both ways. It applies to
    models that route by cluster and is ignored by the others (`EvalResult.soft_assignment` says which rule was
    used, `soft_routing` which prompts got two groups). With `lm`, the rule is the one `lm` was built with.

    Long: the one place that runs every benchmark kind on a model and assembles its tables.
    """
    if not model_variant:
        raise ValueError("model_variant must be a non-empty name")
    specs = resolve_benchmarks(benchmarks)
    specs = [
        dataclasses.replace(
            spec,
            seed=seed if spec.kind in ("synthetic", "blended") else spec.seed,
            max_new_tokens=min(spec.max_new_tokens, max_new_tokens) if max_new_tokens else spec.max_new_tokens,
        )
        for spec in specs
    ]
    torch.manual_seed(seed)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    load_started = time.perf_counter()
    if lm is None:
        if model_dir is None:
            raise ValueError("give model_dir or lm")
        logger.info(f"{model_variant}: loading {model_dir}")
        lm = MoCELM(pretrained=str(model_dir), batch_size=batch_size, device=device, dtype=dtype,
                    prompt_format=prompt_format, soft_assignment=soft_assignment, autocast=autocast)
    else:
        if soft_assignment is not None:
            raise ValueError(f"soft_assignment={soft_assignment!r} with an lm: build the MoCELM with it instead "
                             "(MoCELM(..., soft_assignment=...))")
        lm.batch_size = batch_size
    load_seconds = time.perf_counter() - load_started
    logger.info(f"{model_variant}: loaded in {load_seconds:.1f} s; {len(specs)} benchmarks: "
                f"{', '.join(spec.name for spec in specs)}")

    outcomes: list[BenchmarkOutcome] = []
    lm_eval_specs = [s for s in specs if s.kind in LM_EVAL_KINDS]
    own_specs = [s for s in specs if s.kind not in LM_EVAL_KINDS]
    steps = len(own_specs) + (1 if lm_eval_specs else 0)  # lm-eval's tasks run as one batch, with its own bars
    started = time.perf_counter()
    for spec in specs:
        if spec.kind not in LM_EVAL_KINDS:
            benchmark_started = time.perf_counter()
            with lm.counting_expert_use(spec.name):
                outcome = run_benchmark(lm, spec, limit_per_benchmark)
            logger.info(evaluation_progress(model_variant, len(outcomes) + 1, steps, spec.name, outcome.n_items,
                                            time.perf_counter() - benchmark_started,
                                            time.perf_counter() - started))
            outcome.expert_use = lm.take_expert_use().get(spec.name)
            by_prompt = lm.take_prompt_expert_use().get(spec.name, {})
            outcome.prompt_expert_use = {item.item_id: by_prompt[item.prompt] for item in outcome.items
                                         if item.prompt in by_prompt}
            outcomes.append(outcome)
    if lm_eval_specs:
        lm_eval_started = time.perf_counter()
        lm_eval_outcomes = run_lm_eval(lm, lm_eval_specs, limit_per_benchmark)
        outcomes.extend(lm_eval_outcomes)
        logger.info(evaluation_progress(model_variant, steps, steps, f"lm-eval ({len(lm_eval_specs)} tasks)",
                                        sum(o.n_items for o in lm_eval_outcomes),
                                        time.perf_counter() - lm_eval_started, time.perf_counter() - started))
    # Loading is shared by all benchmarks; spread it so the seconds column adds up to the whole evaluation.
    share = load_seconds / max(len(outcomes), 1)
    return EvalResult(
        table=results_table(model_variant, outcomes, extra_seconds=share),
        item_scores=item_scores_table(model_variant, outcomes),
        items=pl.DataFrame(
            [{"benchmark": o.benchmark, "item_id": i.item_id, "prompt": i.prompt, "completion": i.completion,
              "correct": i.correct, "cluster": i.cluster} for o in outcomes for i in o.items],
            schema=ITEMS_SCHEMA,
        ),
        notes={o.benchmark: o.note for o in outcomes},
        expert_use=expert_use_table(model_variant, outcomes, top_k=getattr(lm.model.config, "router_top_k", 1)),
        prompt_embeddings=prompt_embeddings_table(lm, outcomes),
        soft_routing=soft_routing_table(lm, outcomes),
        soft_assignment=lm.soft_assignment,
    )


def soft_routing_table(lm: MoCELM, outcomes: Sequence[BenchmarkOutcome]) -> pl.DataFrame:
    """The evaluated prompts that a soft assignment gave two groups (SOFT_ROUTING_SCHEMA)."""
    rows = []
    for outcome in outcomes:
        for item, route in zip(outcome.items, lm.soft_routes_for([item.prompt for item in outcome.items])):
            if route is not None:
                rows.append({"benchmark": outcome.benchmark, "item_id": item.item_id, "cluster": route.clusters[0],
                             "second_cluster": route.clusters[1], "second_weight": route.weights[1]})
    return pl.DataFrame(rows, schema=SOFT_ROUTING_SCHEMA)


def prompt_embeddings_table(lm: MoCELM, outcomes: Sequence[BenchmarkOutcome]) -> pl.DataFrame:
    """The router's embedding of every evaluated prompt it embedded (PROMPT_EMBEDDINGS_SCHEMA); lm-eval items,
    routed by their documents, are not in it."""
    rows = []
    for outcome in outcomes:
        embeddings = lm.routing_embeddings_for([item.prompt for item in outcome.items])
        rows.extend({"benchmark": outcome.benchmark, "item_id": item.item_id, "cluster": item.cluster,
                     "embedding": embedding.tolist()}
                    for item, embedding in zip(outcome.items, embeddings) if embedding is not None)
    return pl.DataFrame(rows, schema=PROMPT_EMBEDDINGS_SCHEMA)


def expert_use_table(model_variant: str, outcomes: Sequence[BenchmarkOutcome], top_k: int) -> pl.DataFrame:
    """The expert use counted while each benchmark ran, as rows of EXPERT_USE_SCHEMA (groups without tokens
    of the benchmark left out). `top_k`: experts per token (1 for a model without a router)."""
    rows = []
    for outcome in outcomes:
        if outcome.expert_use is None:
            continue
        counts = np.asarray(outcome.expert_use, dtype=np.int64)
        if counts.ndim != 3:
            raise ValueError(f"{outcome.benchmark}: expert use must be (layers, groups, experts), got {counts.shape}")
        experts = counts.shape[2]
        per_token = min(top_k, experts)
        per_prompt = outcome.prompt_expert_use or {}
        intervals = {group: _share_intervals(counts[:, group], [c[:, group] for c in per_prompt.values()])
                     for group in np.nonzero(counts.sum(axis=(0, 2)))[0]}
        for layer, group in zip(*np.nonzero(counts.sum(axis=2))):
            assigned = counts[layer, group]
            total = int(assigned.sum())
            if total % per_token:
                raise ValueError(f"{outcome.benchmark} layer {layer} group {group}: {total} assignments is not a "
                                 f"multiple of top_k = {per_token}")
            n_prompts, per_layer, pooled = intervals[group]
            pooled_share = counts[:, group].sum(axis=0) / counts[:, group].sum()
            rows.extend(
                {"model_variant": model_variant, "benchmark": outcome.benchmark, "layer": int(layer),
                 "group": int(group), "expert": expert, "assignments": int(assigned[expert]),
                 "group_tokens": total // per_token, "share": float(assigned[expert]) / total,
                 "n_items": outcome.n_items, "n_prompts": n_prompts,
                 "share_ci_low": None if per_layer is None else float(per_layer[0][layer, expert]),
                 "share_ci_high": None if per_layer is None else float(per_layer[1][layer, expert]),
                 "pooled_share": float(pooled_share[expert]),
                 "pooled_ci_low": None if pooled is None else float(pooled[0][expert]),
                 "pooled_ci_high": None if pooled is None else float(pooled[1][expert])}
                for expert in range(experts)
            )
    return pl.DataFrame(rows, schema=EXPERT_USE_SCHEMA)


def _share_intervals(group_counts: np.ndarray, prompt_counts: Sequence[np.ndarray]):
    """(prompts of the group, per-layer (low, high) or None, pooled (low, high) or None) for one group's
    [layers, experts] counts and each prompt's share of them."""
    used = [c for c in prompt_counts if c.sum() > 0]
    if not used or not np.array_equal(np.sum(used, axis=0), group_counts):
        # Some of the group's tokens belong to no known prompt: an interval over the known ones would not be
        # about these counts.
        return (len(used) or None), None, None
    if len(used) < 2:
        return len(used), None, None

    low, high, pooled_low, pooled_high = share_intervals_over_prompts(np.stack(used))
    return len(used), (low, high), (pooled_low, pooled_high)


def results_table(model_variant: str, outcomes: Sequence[BenchmarkOutcome], extra_seconds: float = 0.0) -> pl.DataFrame:
    """One row per metric: its value, n, stderr and 95% interval.

    The interval comes from the metric's per-item scores when it has them (Wilson for 0/1 scores, BCa
    bootstrap otherwise); a metric known only as an aggregate with a standard error (lm-eval without logged
    samples) gets value ± 1.96 stderr; one with neither gets none, and the report says so.
    """

    rows = []
    for outcome in outcomes:
        for metric in outcome.metrics:
            n_items = metric.n_items if metric.n_items is not None else outcome.n_items
            stderr, (ci_low, ci_high), ci_method = metric.stderr, normal_interval(metric.value, metric.stderr), None
            if metric.item_scores:
                estimate = mean_estimate(metric.item_scores)
                if abs(estimate.value - metric.value) > 1e-6 * max(1.0, abs(metric.value)):
                    raise ValueError(f"{outcome.benchmark} {metric.metric}: value {metric.value} is not the mean "
                                     f"of its {len(metric.item_scores)} item scores ({estimate.value})")
                # lm-eval's own stderr is kept where it gave one; it is the same s / sqrt(n) for a mean.
                stderr = metric.stderr if metric.stderr is not None else estimate.stderr
                ci_low, ci_high, ci_method = estimate.ci_low, estimate.ci_high, estimate.method
            elif ci_low is not None:
                ci_method = "normal (stderr)"
            rows.append({
                "model_variant": model_variant, "benchmark": outcome.benchmark, "metric": metric.metric,
                "value": metric.value, "n_items": n_items, "stderr": stderr, "ci_low": ci_low, "ci_high": ci_high,
                "ci_method": ci_method, "seconds": outcome.seconds + extra_seconds,
            })
    table = pl.DataFrame(rows, schema=RESULTS_SCHEMA)
    duplicated = table.group_by("benchmark", "metric").len().filter(pl.col("len") > 1)
    if duplicated.height:
        raise ValueError(f"results hold more than one row for {duplicated.select('benchmark', 'metric').rows()}")
    return table


def item_scores_table(model_variant: str, outcomes: Sequence[BenchmarkOutcome]) -> pl.DataFrame:
    """Every item's score per metric, with the cluster (expert group) that answered the item."""
    rows = []
    for outcome in outcomes:
        clusters = {item.item_id: item.cluster for item in outcome.items}
        for metric in outcome.metrics:
            rows.extend(
                {"model_variant": model_variant, "benchmark": outcome.benchmark, "metric": metric.metric,
                 "item_id": item_id, "score": score, "cluster": clusters.get(item_id)}
                for item_id, score in zip(metric.item_ids, metric.item_scores)
            )
    return pl.DataFrame(rows, schema=ITEM_SCORES_SCHEMA)


def model_provenance(model_dir: Path | str) -> dict[str, object]:
    """What a model directory's numbers depend on: variant, k (number of centroids), embedder, and a
    content hash of the centroids (their version). Values are None where the directory has no router."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: cannot read the model config: {err}") from err
    provenance: dict[str, object] = {
        "variant": config.get("variant", "base"), "k": None, "embedder": None, "centroids_sha256": None,
    }
    centroids_path = model_dir / "centroids.npy"
    if centroids_path.is_file():
        import numpy as np

        centroids = np.load(centroids_path, allow_pickle=False)
        provenance["k"] = int(centroids.shape[0])
        provenance["centroids_sha256"] = hashlib.sha256(centroids_path.read_bytes()).hexdigest()
    embedder_path = model_dir / "embedder.json"
    if embedder_path.is_file():
        provenance["embedder"] = json.loads(embedder_path.read_text()).get("model")
    return provenance
