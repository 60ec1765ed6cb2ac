"""The study: every variant of the paper's comparison over several training seeds and the experts-per-group
sweep, on one experiment's data, aggregated over seeds *and* items.

Framework-free pieces the study assets wire together:

- `StudyConfig`: what the study trains and evaluates (seeds, sweep, sizes); `from_mapping` reads the
  `study:` section of an experiment file.
- `study_layouts` / `StudyLayout`: the models of the study (variant x experts per group), each with its
  `MoCEConfig`, and `run_keys`: one run per (layout, seed), the base model once.
- `heldout_split`: a deterministic held-out set of each source (by content id, independent of the seed).
- `trainable_parameters`: total and active (per token) trainable parameters of a layout, from the configs.
- `aggregate` / `paired_differences`: the mean over seeds and items with a two-level bootstrap interval.
- `study_markdown` / `study_figure_png`: the table and the figure.

Why a two-level bootstrap: the study's numbers vary with the training seed (a different sample and order of
training rows, a different initialisation of the adapters) and with the evaluation items. An interval over
items alone (as in the single-seed report) treats one training run as the model; resampling seeds as well
makes the interval cover the variant, not the run. Seeds and items are crossed (every seed's model answers
the same items), so each resample draws seeds with replacement and, independently, items with replacement,
and takes the mean of the scores in the crossed cells (percentile interval). With few seeds the seed level
is resampled from very few values, which understates its variance by a factor (n_seeds - 1) / n_seeds: the
table names the number of seeds next to every interval.
"""

from __future__ import annotations

import dataclasses
import io
import math
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy import stats as scipy_stats

from moce_model.config import TOKEN_ROUTERS, MoCEConfig, variant_semantics
from moce_model.field_values import conformed
from moce_model.evaluation.metrics import HELDOUT_LOSS, LOWER_IS_BETTER, PARTS_LOSS, ROUTING_METRICS

BASE_LAYOUT = "base"
REFERENCE_LAYOUTS: tuple[str, ...] = ("pesc", BASE_LAYOUT)
# Separates a layout from an evaluation-only condition in a row label of the table: `moce/e4 @noised`.
CONDITION_MARK = " @"
CONFIDENCE = 0.95
INTERVAL_METHOD = ("two-level percentile bootstrap (seeds, then items, crossed); for 0/1 scores at least as wide as "
                   "the Wilson (mean) or Bonett–Price (paired difference) interval on the items")
# Metrics compared within each row, item by item: metric -> the metric it is compared with on the same items
# (a blended prompt's loss against the mean loss of its parts asked alone).
WITHIN_ROW_COMPARISONS: dict[str, str] = {HELDOUT_LOSS: PARTS_LOSS}

# One row per (layout, seed, benchmark, metric, item): what every run writes and the table aggregates.
STUDY_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "seed": pl.Int64(), "benchmark": pl.String(), "metric": pl.String(),
    "item_id": pl.String(), "score": pl.Float64(),
}


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; every field can be set from an experiment's `study:` mapping.

    Sizes, from runs measured on the 2-core CPU while other jobs kept its load average at 4-9 (so in CPU
    seconds of the one-thread process, what a run costs an idle core; wall times were 2.3-2.8x longer):
    realmix with SmolLM2-135M in fp32, `moce/e4/s0` (the largest layout) took 285 CPU-s: training 16 steps
    of 4 rows at <= 160 tokens with the expert-use count and saving ~155, merge + merge check ~15, evaluation
    ~115 (held-out loss on 4 x 20 rows ~85, 10 GSM8K answers of <= 96 tokens ~30); `dense_adapter/s0` 236;
    the base model's evaluation 108-116; the study's inputs (sources, MiniLM embeddings of 3,200 rows, elbow, k-means, base model
    conversion) 114. 114 + 116 + 18 runs x <= 285 = 5,360 CPU-s, ~45 minutes in two one-thread workers on two
    idle cores (`make study` runs two); one worker would take ~90.

    Estimates, not measured on realmix, for what the AC router layouts and the conditions add: the 6 runs of
    `moce+ac/e4` and `pesc+ac` cost about as much as their linear counterparts (a whole train step of a
    SmolLM2-135M-shaped model measured 9.16 s with the AC router against 9.14 s without), so 6 x <= 290 =
    ~1,740 CPU-s. `study_conditions` per trained run: merging the adapters again ~10-15, `noised` the held-out
    loss on the 80 corrupted rows ~85, `adaptive` (layouts that route by centroids) a few seconds to embed the
    held-out prompts plus ~1 per held-out item routed to another group (every item re-scored would add ~85);
    so <= 110 per trained run and ~90 for the base model: 24 x 110 + 90 = ~2,730 CPU-s. The whole study with its
    conditions: 5,360 + 1,740 + 2,730 = ~9,800 CPU-s, ~80 minutes in two workers, ~2 h 45 in one, past the
    60-minute target (`conditions=()` and `token_routers=("linear",)` give back the study above); on top of a
    study already run, ~4,500 CPU-s, ~40 minutes in two workers. `blended` comes on top of that (an estimate
    too): on realmix's 4 sources 6 source pairs x `blend_items` 10 = 60 blended prompts per run, each about as
    long as its two parts together, so about the held-out loss of 120 rows, ~130 CPU-s per run (the base model
    included), ~3,300 over the 25 runs.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ("dense_adapter", "pesc", "moce", "random_group", "cluster_only")
    # The sweep applies to `moce` (the paper's Table 3); the ablations and `pesc` use the largest value, and
    # `pesc`'s single group holds k x that many experts, so that its expert budget matches `moce`'s.
    experts_per_group_sweep: tuple[int, ...] = (1, 2, 4)
    # Token routers compared: `linear` (PESC's, every layout above) and each other router of TOKEN_ROUTERS as
    # extra layouts `moce+<router>/e<largest>` and `pesc+<router>`, with the expert budget of their linear
    # counterparts. Listed after the linear layouts, so their runs only add partition keys.
    token_routers: tuple[str, ...] = ("linear", "ac")
    router_top_k: int = 2
    adapter_dim: int = 16
    # Training of each run (TrainingConfig overrides over the experiment's preset).
    train_rows: int = 256
    max_steps: int = 16
    per_device_batch_size: int = 4
    max_length: int = 160
    lr: float = 1e-3
    # Evaluation of each run: the held-out loss on this many held-out rows of every source (one forward pass
    # each), and exact match on the first `gsm8k_items` questions of the GSM8K test sample (generation).
    heldout_rows_per_source: int = 20
    gsm8k_items: int = 10
    gsm8k_max_new_tokens: int = 96
    bootstrap_resamples: int = 4_000
    # Evaluation-only conditions scored on every trained run (`moce_model.study_conditions.CONDITIONS`), table
    # rows `layout @condition`: `noised` replaces `noise_share` of each held-out prompt's words (seeded by
    # `noise_seed`, the same corruption for every run); `soft` answers prompts near a cluster boundary with both
    # clusters' groups (`SoftAssignmentRule(soft_margin, soft_temperature)`); `adaptive` routes by centroids
    # updated with the held-out prompts (`soft` and `adaptive`: layouts that route by centroids only); `blended`
    # asks two held-out items of different sources in one prompt, up to `blend_items` blends per pair of sources.
    conditions: tuple[str, ...] = ("noised", "soft", "adaptive", "blended")
    noise_share: float = 0.15
    noise_seed: int = 0
    soft_margin: float = 0.1
    soft_temperature: float = 0.025
    blend_items: int = 10
    # A merged SmolLM2-135M is 575 MB in fp32, 10 GB for the 18 trained runs; the adapters (a few MB) are
    # kept, and merged_model-style directories can be rebuilt from them.
    keep_merged_models: bool = False

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study seeds must be distinct and at least one, got {self.seeds}")
        for variant in self.variants:
            variant_semantics(variant)  # raises for an unknown name
        if not self.experts_per_group_sweep or min(self.experts_per_group_sweep) < 1:
            raise ValueError(f"experts_per_group_sweep must hold positive ints, got {self.experts_per_group_sweep}")
        unknown_routers = [r for r in self.token_routers if r not in TOKEN_ROUTERS]
        if unknown_routers or len(set(self.token_routers)) != len(self.token_routers):
            raise ValueError(f"study token_routers must be distinct names of {TOKEN_ROUTERS}, got {self.token_routers}")
        if "linear" not in self.token_routers:
            raise ValueError(f"study token_routers must include 'linear' (the router of every baseline layout), "
                             f"got {self.token_routers}")
        if len(self.token_routers) > 1 and "moce" in self.variants and max(self.experts_per_group_sweep) < 2:
            raise ValueError(f"study token_routers {self.token_routers}: a token router needs at least 2 experts per "
                             f"group, but experts_per_group_sweep is {self.experts_per_group_sweep}")
        for name in ("router_top_k", "adapter_dim", "train_rows", "max_steps", "per_device_batch_size",
                     "max_length", "heldout_rows_per_source", "bootstrap_resamples", "blend_items",
                     "gsm8k_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"study {name} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"study lr must be a finite number > 0, got {self.lr!r}")
        # numpy's and the Trainer's seeds are unsigned 32-bit
        for seed in (*self.seeds, self.noise_seed):
            if not 0 <= seed < 2**32:
                raise ValueError(f"study seeds and noise_seed must be in [0, 2**32), got {seed}")
        if self.gsm8k_items < 0:
            raise ValueError(f"study gsm8k_items must be >= 0, got {self.gsm8k_items}")
        from moce_model.study_conditions import study_condition

        for condition in self.conditions:
            study_condition(condition)  # raises for an unknown name
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"study conditions must be distinct, got {self.conditions}")
        from moce_model.routing import SoftAssignmentRule

        SoftAssignmentRule(self.soft_margin, self.soft_temperature)  # raises, naming the field, for a bad value
        if not 0.0 < self.noise_share <= 1.0:
            raise ValueError(f"study noise_share must be in (0, 1], got {self.noise_share}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> StudyConfig:
        """A config from an experiment's `study:` mapping; missing keys keep the defaults, unknown keys fail."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown study field(s) {unknown}; known: {sorted(known)}")
        defaults = cls()
        hints = typing.get_type_hints(cls)
        for name, value in list(values.items()):
            try:
                values[name] = conformed(value, hints[name])
            except TypeError as error:
                default = getattr(defaults, name)
                example = list(default) if isinstance(default, tuple) else default
                raise ValueError(f"study {name} = {value!r}: {error}, e.g. {example!r}") from None
        return cls(**values)

    def training_overrides(self, seed: int) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "per_device_batch_size": self.per_device_batch_size,
                "max_length": self.max_length, "lr": self.lr, "seed": seed}


@dataclass(frozen=True)
class StudyLayout:
    """One model of the study: a variant with an expert layout. `experts_per_group` is None for `base` and for
    the variants without token routing (one adapter per group); `pesc_matched_groups` marks `pesc`, whose single
    group holds (number of clusters) x `experts_per_group` experts. `token_router` picks how tokens are routed
    inside a group. `counterpart` names the layout that differs from this one in a single thing, which the table
    compares it with: for a layout with another router than `linear`, the same layout with the linear router; for
    `random_group`, `moce` with the same experts (the group picked by the cluster instead of a hash of the
    prompt: the paper's question whether the cluster, not the grouping alone, matters)."""

    name: str
    variant: str | None
    experts_per_group: int | None = None
    pesc_matched_groups: bool = False
    note: str = ""
    token_router: str = "linear"
    counterpart: str | None = None

    @property
    def trained(self) -> bool:
        return self.variant is not None

    def moce_config(self, config: StudyConfig, num_clusters: int, embedder: dict | None = None) -> MoCEConfig:
        if self.variant is None:
            raise ValueError("the base model has no MoCE config")
        experts = self.experts_per_group or 1
        single_group_experts = num_clusters * experts if self.pesc_matched_groups else None
        largest_group = single_group_experts or experts
        return MoCEConfig.for_variant(
            self.variant,
            num_clusters=num_clusters,
            experts_per_group=experts,
            single_group_experts=single_group_experts,
            router_top_k=min(config.router_top_k, largest_group),
            adapter_dim=config.adapter_dim,
            token_router=self.token_router,
            embedder=embedder,
        )


def study_layouts(config: StudyConfig) -> list[StudyLayout]:
    """The base model, then each variant; `moce` once per experts-per-group value of the sweep; then, for each
    token router other than `linear`, `moce+<router>/e<largest>` and `pesc+<router>` (when `moce` / `pesc` are
    studied): the same expert layouts as `moce/e<largest>` and `pesc`, routed inside the group by that router.

    `moce` with one expert per group is `cluster_only`'s layout (the cluster picks the group, one adapter, no
    router: the same model, trained the same way), so when both are in the study it is run once, as
    `cluster_only`, which stands for the sweep's 1."""
    largest = max(config.experts_per_group_sweep)
    layouts = [StudyLayout(BASE_LAYOUT, None, note="the base model, not trained")]
    for variant in config.variants:
        semantics = variant_semantics(variant)
        if not semantics.token_routing:
            note = "= moce with 1 expert per group" if semantics.needs_centroids else ""
            layouts.append(StudyLayout(variant, variant, None, note=note))
        elif semantics.needs_centroids:  # moce: the experts-per-group sweep
            for experts in sorted(set(config.experts_per_group_sweep)):
                if experts == 1 and any(
                    variant_semantics(v).needs_centroids and not variant_semantics(v).token_routing
                    for v in config.variants
                ):
                    continue
                layouts.append(StudyLayout(f"{variant}/e{experts}", variant, experts))
        elif semantics.needs_num_clusters:  # random_group: moce's groups, picked by a hash of the prompt
            counterpart = f"moce/e{largest}" if "moce" in config.variants else None
            layouts.append(StudyLayout(f"{variant}/e{largest}", variant, largest, counterpart=counterpart))
        else:
            layouts.append(StudyLayout(variant, variant, largest, pesc_matched_groups=True,
                                       note=f"one group of k x {largest} experts (matches moce/e{largest})"))
    # After every linear layout: the partition keys of the runs above do not depend on the routers studied.
    for router in [r for r in config.token_routers if r != "linear"]:
        if "moce" in config.variants:
            counterpart = f"moce/e{largest}"
            layouts.append(StudyLayout(f"moce+{router}/e{largest}", "moce", largest, token_router=router,
                                       counterpart=counterpart, note=f"{counterpart} with the {router} router"))
        if "pesc" in config.variants:
            layouts.append(StudyLayout(f"pesc+{router}", "pesc", largest, pesc_matched_groups=True,
                                       token_router=router, counterpart="pesc",
                                       note=f"pesc with the {router} router"))
    return layouts


def counterparts(config: StudyConfig) -> dict[str, str]:
    """Layout -> its counterpart (the layout it differs from in one thing: the token router, or for
    `random_group` the cluster picking the group)."""
    return {layout.name: layout.counterpart for layout in study_layouts(config) if layout.counterpart}


def run_key(layout: StudyLayout, seed: int | None) -> str:
    """The partition key of one run: `moce/e4/s0`; the base model (not trained) is the one run `base`."""
    return layout.name if not layout.trained else f"{layout.name}/s{seed}"


def run_keys(config: StudyConfig) -> list[str]:
    keys = []
    for layout in study_layouts(config):
        keys.extend([run_key(layout, None)] if not layout.trained else [run_key(layout, s) for s in config.seeds])
    return keys


def parse_run_key(config: StudyConfig, key: str) -> tuple[StudyLayout, int | None]:
    layouts = {layout.name: layout for layout in study_layouts(config)}
    if key in layouts and not layouts[key].trained:
        return layouts[key], None
    name, _, seed_part = key.rpartition("/s")
    if name not in layouts or not seed_part.isdigit() or int(seed_part) not in config.seeds:
        raise ValueError(f"{key!r} is not a run of this study; runs: {run_keys(config)}")
    return layouts[name], int(seed_part)


# ------------------------------------------------------------------------------------------------ data


def heldout_split(instructions: pl.DataFrame, rows_per_source: int) -> pl.DataFrame:
    """`instructions` with a `heldout` column: of each source, the `rows_per_source` rows whose content id sorts
    first. Ids are content hashes, so the choice is deterministic, spread over the source like a random sample,
    and the same for every seed (seeds change the training, never the items)."""
    if rows_per_source < 1:
        raise ValueError(f"rows_per_source must be at least 1, got {rows_per_source}")
    for source, count in instructions.group_by("source").len().iter_rows():
        if count <= rows_per_source:
            raise ValueError(f"source {source!r} has {count} rows: holding out {rows_per_source} leaves none to train")
    rank = pl.col("id").rank(method="ordinal").over("source")
    return instructions.with_columns((rank <= rows_per_source).alias("heldout"))


# ---------------------------------------------------------------------------------- parameter counts


def lora_parameters(base_config: Mapping[str, Any], lora_r: int, lora_targets: Sequence[str]) -> int:
    """LoRA parameters (A: r x in, B: out x r) on the named projections of every decoder layer of a Llama-family
    model, from its config: every token goes through all of them."""
    hidden = base_config["hidden_size"]
    heads = base_config["num_attention_heads"]
    head_dim = base_config.get("head_dim") or hidden // heads
    kv_heads = base_config.get("num_key_value_heads") or heads
    intermediate = base_config["intermediate_size"]
    shapes = {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden),
    }
    unknown = [t for t in lora_targets if t not in shapes]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not projections of a Llama-family layer: {sorted(shapes)}")
    per_layer = sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in lora_targets)
    return per_layer * base_config["num_hidden_layers"]


def trainable_parameters(moce_config: MoCEConfig | None, base_config: Mapping[str, Any], lora_r: int,
                         lora_targets: Sequence[str]) -> tuple[int, int]:
    """(total, active per token) trainable parameters: LoRA, plus in every layer the adapter experts (down
    H x r and up r x H each) and, where a group has several experts, one router per group (E x H).

    A token uses LoRA, its group's router and the `router_top_k` experts chosen in that group; the other
    groups' routers and experts are trained (by other sequences) but not active for it. None: the base model."""
    if moce_config is None:
        return 0, 0
    hidden, layers = base_config["hidden_size"], base_config["num_hidden_layers"]
    lora = lora_parameters(base_config, lora_r, lora_targets)
    groups, experts, rank = moce_config.num_groups, moce_config.experts_per_group, moce_config.adapter_dim
    router = experts * hidden if moce_config.has_router else 0
    per_expert = 2 * hidden * rank
    total = lora + layers * groups * (experts * per_expert + router)
    active = lora + layers * (moce_config.router_top_k * per_expert + router)
    return total, active


# -------------------------------------------------------------------------------------------- statistics


def two_level_bootstrap(scores: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a seeds x items score matrix with its 95% two-level percentile interval: each resample draws the
    seeds with replacement and, independently, the items with replacement, and averages the crossed cells.

    The mean over a resample is (seed counts)ᵀ · S · (item counts) / (n_seeds · n_items), so all resamples are
    two matrix products, without materialising the resampled matrices."""
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"scores must be a non-empty seeds x items matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("scores must be finite")
    n_seeds, n_items = matrix.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples).astype(np.float64)
    item_counts = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=resamples).astype(np.float64)
    means = np.einsum("bs,si,bi->b", seed_counts, matrix, item_counts) / (n_seeds * n_items)
    alpha = 1 - CONFIDENCE
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(matrix.mean()), float(low), float(high)


def _is_binary(matrix: np.ndarray) -> bool:
    return bool(np.isin(matrix, (0.0, 1.0)).all())


def _wilson(proportion: float, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion observed on n trials (a pooled proportion may be fractional)."""
    z = float(scipy_stats.norm.ppf(0.5 + CONFIDENCE / 2))
    centre = (proportion + z**2 / (2 * n)) / (1 + z**2 / n)
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return max(centre - half_width, 0.0), min(centre + half_width, 1.0)


def _bonett_price(won_rate: float, lost_rate: float, n: int) -> tuple[float, float]:
    """Bonett–Price interval of a paired 0/1 difference (as in moce_model.evaluation.stats) from the rates of
    won and lost items, which pooled over seeds may be fractional counts."""
    z = float(scipy_stats.norm.ppf(0.5 + CONFIDENCE / 2))
    p_won, p_lost = (won_rate * n + 1) / (n + 2), (lost_rate * n + 1) / (n + 2)
    centre = p_won - p_lost
    half_width = z * math.sqrt(p_won + p_lost - centre**2) / math.sqrt(n + 2)
    return max(centre - half_width, -1.0), min(centre + half_width, 1.0)


def _mean_interval(matrix: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """The two-level interval; for 0/1 scores widened to at least the Wilson interval of the pooled proportion
    on n_items trials. A resample of 0/1 items cannot vary when every item scored the same (0 of 10 correct
    would give [0, 0]); the items, not the seeds' repeats of them, are the independent trials."""
    mean, low, high = two_level_bootstrap(matrix, resamples, seed)
    if _is_binary(matrix):
        wilson_low, wilson_high = _wilson(mean, matrix.shape[1])
        low, high = min(low, wilson_low), max(high, wilson_high)
    return mean, low, high


def _difference_interval(first: np.ndarray, second: np.ndarray, resamples: int, seed: int
                         ) -> tuple[float, float, float]:
    """The two-level interval of first − second; for 0/1 scores widened to at least the Bonett–Price interval
    of the pooled won / lost rates on n_items pairs (same reason as `_mean_interval`)."""
    mean, low, high = two_level_bootstrap(first - second, resamples, seed)
    if _is_binary(first) and _is_binary(second):
        won, lost = float(((first == 1) & (second == 0)).mean()), float(((first == 0) & (second == 1)).mean())
        bp_low, bp_high = _bonett_price(won, lost, first.shape[1])
        low, high = min(low, bp_low), max(high, bp_high)
    return mean, low, high


def score_matrix(scores: pl.DataFrame, layout: str, benchmark: str, metric: str,
                 items: Sequence[str] | None = None) -> tuple[list[int], list[str], np.ndarray]:
    """(seeds, item ids, seeds x items matrix) of one layout on one metric; every seed must have scored the same
    items (the runs of a layout evaluate one held-out set)."""
    subset = scores.filter((pl.col("layout") == layout) & (pl.col("benchmark") == benchmark)
                           & (pl.col("metric") == metric))
    if subset.height == 0:
        raise ValueError(f"no scores of {layout!r} on {benchmark} {metric}")
    wide = subset.pivot(on="item_id", index="seed", values="score").sort("seed")
    item_ids = list(items) if items is not None else sorted(c for c in wide.columns if c != "seed")
    missing = [i for i in item_ids if i not in wide.columns]
    if missing:
        raise ValueError(f"{layout!r} {benchmark} {metric}: no scores for items {missing[:5]}")
    matrix = wide.select(item_ids).to_numpy().astype(np.float64)
    if np.isnan(matrix).any():
        raise ValueError(f"{layout!r} {benchmark} {metric}: the seeds did not score the same items")
    return wide["seed"].to_list(), item_ids, matrix


def _check_scores(scores: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in STUDY_SCORES_SCHEMA if c not in scores.columns]
    if missing:
        raise ValueError(f"study scores lack column(s) {missing}")
    scores = scores.select(list(STUDY_SCORES_SCHEMA)).cast(STUDY_SCORES_SCHEMA)
    repeated = scores.group_by("layout", "seed", "benchmark", "metric", "item_id").len().filter(pl.col("len") > 1)
    if repeated.height:
        raise ValueError(f"more than one score per (layout, seed, benchmark, metric, item): {repeated.rows()[:3]}")
    return scores


AGGREGATE_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "benchmark": pl.String(), "metric": pl.String(), "n_seeds": pl.Int64(),
    "n_items": pl.Int64(), "mean": pl.Float64(), "ci_low": pl.Float64(), "ci_high": pl.Float64(),
    "seed_sd": pl.Float64(),
}
# `reference_metric`: the reference row's metric, `metric` but for a comparison within a row
# (WITHIN_ROW_COMPARISONS, where `reference` is the row itself).
DIFFERENCE_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "reference": pl.String(), "benchmark": pl.String(), "metric": pl.String(),
    "reference_metric": pl.String(), "n_seeds": pl.Int64(), "n_items": pl.Int64(), "difference": pl.Float64(), "ci_low": pl.Float64(),
    "ci_high": pl.Float64(), "significant": pl.Boolean(), "verdict": pl.String(),
}


def aggregate(scores: pl.DataFrame, resamples: int, seed: int = 0) -> pl.DataFrame:
    """Per (layout, benchmark, metric): the mean over seeds and items, its two-level 95% interval, and the
    standard deviation of the per-seed means (how much training seeds alone move the number)."""
    scores = _check_scores(scores)
    rows = []
    for layout, benchmark, metric in scores.select("layout", "benchmark", "metric").unique(maintain_order=True).rows():
        seeds, items, matrix = score_matrix(scores, layout, benchmark, metric)
        mean, low, high = _mean_interval(matrix, resamples, seed)
        seed_means = matrix.mean(axis=1)
        rows.append({"layout": layout, "benchmark": benchmark, "metric": metric, "n_seeds": len(seeds),
                     "n_items": len(items), "mean": mean, "ci_low": low, "ci_high": high,
                     "seed_sd": float(seed_means.std(ddof=1)) if len(seeds) > 1 else None})
    return pl.DataFrame(rows, schema=AGGREGATE_SCHEMA)


def paired_matrices(scores: pl.DataFrame, layout: str, reference: str, benchmark: str, metric: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(layout, reference) seeds x items matrices to subtract, on the items both scored. Runs of the same seed are paired (they
    trained on the same sample of rows in the same order); a reference with a single run (the base model) is
    compared with every seed's run."""
    _, items, _ = score_matrix(scores, layout, benchmark, metric)
    ref_seeds, ref_items, _ = score_matrix(scores, reference, benchmark, metric)
    common = [i for i in items if i in set(ref_items)]
    if not common:
        raise ValueError(f"{layout!r} and {reference!r} share no items on {benchmark} {metric}")
    seeds, _, matrix = score_matrix(scores, layout, benchmark, metric, common)
    ref_seeds, _, ref_matrix = score_matrix(scores, reference, benchmark, metric, common)
    if len(ref_seeds) == 1:
        return matrix, np.broadcast_to(ref_matrix, matrix.shape)
    shared = [s for s in seeds if s in ref_seeds]
    if not shared:
        raise ValueError(f"{layout!r} and {reference!r} share no seed on {benchmark} {metric}")
    return matrix[[seeds.index(s) for s in shared]], ref_matrix[[ref_seeds.index(s) for s in shared]]


def condition_label(layout: str, condition: str | None) -> str:
    """The table's row of `layout` under an evaluation-only condition (`moce/e4 @noised`), or the layout itself."""
    return layout if condition is None else f"{layout}{CONDITION_MARK}{condition}"


def split_condition_label(label: str) -> tuple[str, str | None]:
    """(layout, condition or None) of a row label made by `condition_label`."""
    layout, mark, condition = label.partition(CONDITION_MARK)
    return (layout, condition) if mark else (label, None)


def comparisons(labels: Sequence[str], references: Sequence[str] = REFERENCE_LAYOUTS,
                counterparts: Mapping[str, str] | None = None, own_items: Collection[str] = ()
                ) -> list[tuple[str, str]]:
    """(row, reference row) pairs of the paired differences, among the row labels present, in their order:

    - every row against each reference layout under the same condition (`moce/e4 @noised` against
      `pesc @noised` and `base @noised`); a reference is not compared with the references listed after it (pesc −
      base is reported, its mirror base − pesc is not);
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


def within_row_matrices(scores: pl.DataFrame, label: str, benchmark: str, metric: str, reference_metric: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(metric, reference metric) seeds x items matrices of one row to subtract: the same runs, the same items."""
    seeds, items, matrix = score_matrix(scores, label, benchmark, metric)
    ref_seeds, ref_items, _ = score_matrix(scores, label, benchmark, reference_metric)
    if ref_seeds != seeds or ref_items != items:
        raise ValueError(f"{label!r} {benchmark}: {metric} and {reference_metric} were not scored on the same "
                         f"seeds and items ({len(seeds)} x {len(items)} against {len(ref_seeds)} x {len(ref_items)})")
    return matrix, score_matrix(scores, label, benchmark, reference_metric, items)[2]


def paired_differences(scores: pl.DataFrame, resamples: int, seed: int = 0,
                       references: Sequence[str] = REFERENCE_LAYOUTS,
                       counterparts: Mapping[str, str] | None = None,
                       own_items: Collection[str] = ()) -> pl.DataFrame:
    """Every pair of `comparisons` (each row against `pesc` and `base`, a layout against its counterpart, a
    condition against the clean runs unless it is one of `own_items`), paired on items (and seeds), with the
    two-level interval of the mean difference on every (benchmark, metric) both rows have, then within every row
    each metric of WITHIN_ROW_COMPARISONS against its reference metric on the same items; "no significant
    difference" where the interval covers 0."""
    scores = _check_scores(scores)
    labels = scores["layout"].unique(maintain_order=True).to_list()
    metrics_of = {label: scores.filter(pl.col("layout") == label).select("benchmark", "metric").unique(
        maintain_order=True).rows() for label in labels}
    rows = []

    def add(layout: str, reference: str, benchmark: str, metric: str, reference_metric: str,
            first: np.ndarray, second: np.ndarray) -> None:
        difference, low, high = _difference_interval(first, second, resamples, seed)
        significant = low > 0 or high < 0
        rows.append({"layout": layout, "reference": reference, "benchmark": benchmark, "metric": metric,
                     "reference_metric": reference_metric, "n_seeds": first.shape[0], "n_items": first.shape[1],
                     "difference": difference, "ci_low": low, "ci_high": high, "significant": significant,
                     "verdict": _verdict(significant, difference, metric, layout, reference, reference_metric)})

    for layout, reference in comparisons(labels, references, counterparts, own_items):
        shared = set(metrics_of[reference])
        for benchmark, metric in [m for m in metrics_of[layout] if m in shared]:
            add(layout, reference, benchmark, metric, metric,
                *paired_matrices(scores, layout, reference, benchmark, metric))
    for label in labels:
        for benchmark, metric in metrics_of[label]:
            reference_metric = WITHIN_ROW_COMPARISONS.get(metric)
            if reference_metric is not None and (benchmark, reference_metric) in metrics_of[label]:
                add(label, label, benchmark, metric, reference_metric,
                    *within_row_matrices(scores, label, benchmark, metric, reference_metric))
    return pl.DataFrame(rows, schema=DIFFERENCE_SCHEMA)


def _verdict(significant: bool, difference: float, metric: str, layout: str, reference: str,
             reference_metric: str | None = None) -> str:
    if not significant:
        return "no significant difference"
    if reference_metric not in (None, metric):  # within a row: the sides are the metrics
        sides = (metric, reference_metric)
    else:
        sides = (_side(layout, reference), _side(reference, layout))
    if metric in ROUTING_METRICS:  # where prompts went: a difference, not a better model
        return f"{sides[0] if difference > 0 else sides[1]} higher"
    better = (difference < 0) if metric in LOWER_IS_BETTER else (difference > 0)
    return f"{sides[0] if better else sides[1]} better"


def _side(label: str, other: str) -> str:
    """How a verdict names one row of a pair: the row label, or, where both rows are the same runs under two
    conditions, just the condition ("clean" for none)."""
    layout, condition = split_condition_label(label)
    if layout != split_condition_label(other)[0]:
        return label
    return "clean" if condition is None else f"{CONDITION_MARK.strip()}{condition}"


# ------------------------------------------------------------------------------------ table and figure


@dataclass(frozen=True)
class StudyTable:
    aggregate: pl.DataFrame
    differences: pl.DataFrame
    parameters: pl.DataFrame
    markdown: str
    figure_png: bytes
    missing_runs: list[str] = field(default_factory=list)
    missing_conditions: list[str] = field(default_factory=list)


PARAMETERS_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "groups": pl.Int64(), "experts_per_group": pl.Int64(), "router_top_k": pl.Int64(),
    "total_trainable": pl.Int64(), "active_trainable": pl.Int64(), "note": pl.String(),
}


def _format(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _metric_label(metric: str) -> str:
    return f"{metric} ↓" if metric in LOWER_IS_BETTER else metric


def _compared_metrics(difference: Mapping[str, Any]) -> str:
    label = _metric_label(difference["metric"])
    reference_metric = difference["reference_metric"]
    return label if reference_metric == difference["metric"] else f"{label} − {reference_metric}"


def study_markdown(aggregated: pl.DataFrame, differences: pl.DataFrame, parameters: pl.DataFrame,
                   missing_runs: Sequence[str] = (), condition_notes: Mapping[str, str] | None = None,
                   missing_conditions: Sequence[str] = ()) -> str:
    """The table (one row per entry of `parameters`: layouts, then layouts under each condition), the notes on
    the conditions shown (`condition_notes`: condition -> markdown), and the paired differences."""
    metrics = aggregated.select("benchmark", "metric").unique(maintain_order=True).sort("benchmark", "metric").rows()
    cells = {(r["layout"], r["benchmark"], r["metric"]): r for r in aggregated.iter_rows(named=True)}
    header = ["layout", "trainable (total)", "trainable (active/token)", "seeds"] + [
        f"{b} {_metric_label(m)}" for b, m in metrics]
    lines = ["## Study: mean over seeds and items [95% interval]", "",
             f"Interval: {INTERVAL_METHOD}. n = seeds x items per cell (items in the column header's row below).",
             "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    items_row = ["items", "", "", ""]
    for b, m in metrics:
        counts = {cells[k]["n_items"] for k in cells if k[1:] == (b, m)}
        items_row.append("/".join(str(c) for c in sorted(counts)))
    lines.append("| " + " | ".join(items_row) + " |")
    for row in parameters.iter_rows(named=True):
        layout = row["layout"]
        seeds = {cells[k]["n_seeds"] for k in cells if k[0] == layout}
        values = []
        for b, m in metrics:
            cell = cells.get((layout, b, m))
            values.append("–" if cell is None else
                          f"{_format(cell['mean'])} [{_format(cell['ci_low'])}, {_format(cell['ci_high'])}]")
        name = layout + (f" ({row['note']})" if row["note"] else "")
        lines.append("| " + " | ".join([name, f"{row['total_trainable']:,}", f"{row['active_trainable']:,}",
                                         "/".join(str(s) for s in sorted(seeds)) or "–", *values]) + " |")
    shown_conditions = {split_condition_label(label)[1] for label in parameters["layout"]} - {None}
    notes = {c: text for c, text in (condition_notes or {}).items() if c in shown_conditions}
    if notes:
        lines += ["", f"Rows `layout{CONDITION_MARK}condition` score the same trained runs again under an "
                      "evaluation-only condition (never retrained), on the clean rows' items unless the condition "
                      "says otherwise:", ""]
        lines += [f"- `{CONDITION_MARK.strip()}{condition}`: {text}" for condition, text in notes.items()]
    order = {condition: rank for rank, condition in enumerate([None, *(condition_notes or {})])}
    ranked = differences.with_columns(pl.Series("rank", [order.get(split_condition_label(label)[1], len(order))
                                                         for label in differences["layout"]], dtype=pl.Int64))
    lines += ["", "## Paired differences (same items; same seed, or every seed against the one base run)", "",
              "A row compared with itself compares two of its metrics on the same items and runs.", "",
              "| layout | reference | benchmark | metric | seeds x items | difference [95% interval] | verdict |",
              "|---|---|---|---|---|---|---|"]
    for row in ranked.sort("rank", "reference", "benchmark", "metric", maintain_order=True).iter_rows(named=True):
        lines.append(
            f"| {row['layout']} | {row['reference']} | {row['benchmark']} | {_compared_metrics(row)} | "
            f"{row['n_seeds']} x {row['n_items']} | {_format(row['difference'], True)} "
            f"[{_format(row['ci_low'], True)}, {_format(row['ci_high'], True)}] | {row['verdict']} |")
    if missing_runs:
        lines += ["", f"Runs not materialized (left out of this table): {', '.join(missing_runs)}"]
    if missing_conditions:
        lines += ["", f"Runs with conditions not scored (left out of those rows; in brackets when only some): "
                      f"{', '.join(missing_conditions)}"]
    return "\n".join(lines) + "\n"


def study_figure_png(aggregated: pl.DataFrame, layout_order: Sequence[str]) -> bytes:
    """One panel per (benchmark, metric): each layout's mean with its two-level interval. A layout's rows under the
    evaluation-only conditions sit beside its clean row, one colour per condition (one legend for the figure), so
    that a panel has one tick per layout however many conditions there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(split_condition_label(label)[0] for label in layout_order))
    conditions = list(dict.fromkeys(split_condition_label(label)[1] for label in layout_order))
    colours = {condition: f"C{i}" for i, condition in enumerate(conditions)}
    markers = dict(zip(conditions, "osD^vP*X"))
    metrics = aggregated.select("benchmark", "metric").unique().sort("benchmark", "metric").rows()
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False)
    for axis, (benchmark, metric) in zip(axes.flat, metrics):
        subset = {r["layout"]: r for r in aggregated.filter(
            (pl.col("benchmark") == benchmark) & (pl.col("metric") == metric)).iter_rows(named=True)}
        shown = [split_condition_label(label) for label in layout_order if label in subset]
        names = [layout for layout in layouts if any(layout == shown_layout for shown_layout, _ in shown)]
        here = [condition for condition in conditions if any(condition == c for _, c in shown)]
        width = 0.8 / len(here)
        for j, condition in enumerate(here):
            points = [(names.index(layout), subset[condition_label(layout, condition)])
                      for layout, c in shown if c == condition]
            offset = (j - (len(here) - 1) / 2) * width
            axis.errorbar([x + offset for x, _ in points], [r["mean"] for _, r in points],
                          yerr=[[r["mean"] - r["ci_low"] for _, r in points], [r["ci_high"] - r["mean"] for _, r in points]],
                          fmt=markers[condition], color=colours[condition], capsize=2, markersize=4, elinewidth=1)
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_xlim(-0.6, len(names) - 0.4)
        axis.set_title(f"{benchmark}\n{_metric_label(metric)}", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    if len(conditions) > 1:
        handles = [plt.Line2D([], [], marker=markers[c], color=colours[c], linestyle="") for c in conditions]
        labels = ["clean" if c is None else f"{CONDITION_MARK.strip()}{c}" for c in conditions]
        figure.legend(handles, labels, loc="upper right", ncol=len(conditions), fontsize=8, frameon=False)
    figure.suptitle("Study: mean over seeds and items, 95% two-level bootstrap interval", fontsize=10, x=0.3)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _rows_of_labels(parameters: pl.DataFrame, labels: Sequence[str], conditions: Sequence[str]) -> pl.DataFrame:
    """One parameter row per row label present: the layouts in `parameters`' order, then the same layouts under
    each condition (in `conditions`' order, then any other condition present); a condition row carries its
    layout's counts (the same trained model)."""
    present = set(labels)
    others = [c for c in dict.fromkeys(split_condition_label(label)[1] for label in labels)
              if c is not None and c not in conditions]
    rows = []
    for condition in [None, *conditions, *others]:
        for row in parameters.iter_rows(named=True):
            label = condition_label(row["layout"], condition)
            if label in present:
                rows.append({**row, "layout": label, "note": row["note"] if condition is None else ""})
    return pl.DataFrame(rows, schema=PARAMETERS_SCHEMA)


def build_study_table(scores: pl.DataFrame, parameters: pl.DataFrame, resamples: int,
                      missing_runs: Sequence[str] = (), counterparts: Mapping[str, str] | None = None,
                      condition_notes: Mapping[str, str] | None = None,
                      missing_conditions: Sequence[str] = (), own_items: Collection[str] = ()) -> StudyTable:
    """The study's table (aggregate + paired differences + parameter counts) and its figure.

    `scores` may hold rows of evaluation-only conditions (layout `condition_label(layout, condition)`), shown after
    the layouts, in the order of `condition_notes` (condition -> what it is, in markdown); `counterparts`: a
    layout -> the layout it differs from in one thing (the token router, or cluster vs hash), which it is also
    compared with; `own_items`:
    the conditions scored on items of their own, not compared with the clean runs."""
    parameters = parameters.select(list(PARAMETERS_SCHEMA)).cast(PARAMETERS_SCHEMA)
    aggregated = aggregate(scores, resamples)
    differences = paired_differences(scores, resamples, counterparts=counterparts, own_items=own_items)
    shown = _rows_of_labels(parameters, aggregated["layout"].unique(maintain_order=True).to_list(),
                            list(condition_notes or {}))
    markdown = study_markdown(aggregated, differences, shown, missing_runs, condition_notes, missing_conditions)
    figure = study_figure_png(aggregated, shown["layout"].to_list())
    return StudyTable(aggregated, differences, shown, markdown, figure, list(missing_runs), list(missing_conditions))
