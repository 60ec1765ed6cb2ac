"""The study: every variant of the paper's comparison over several training seeds and the experts-per-group
sweep, on one experiment's data, aggregated over seeds *and* items.

What the study trains: `StudyConfig` (the `study:` section of an experiment file), `study_layouts` /
`StudyLayout` (variant x experts per group, each with its `MoCEConfig`), `run_keys` (one run per layout and
seed, the base model once), `heldout_split` (a deterministic held-out set of each source) and
`trainable_parameters` (total and active per token). The table over the results is in `study.table`.

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
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.common.field_values import conformed
from moce_model.evaluation.compare import REFERENCES
from moce_model.model.config import ExpertLayout, MoCEConfig
from moce_model.variants import BASE, TOKEN_ROUTERS, variant_semantics

BASE_LAYOUT = BASE
# The evaluation-only conditions (`study.conditions` registers one per name).
NOISED, SOFT, ADAPTIVE, BLENDED = "noised", "soft", "adaptive", "blended"
CONDITION_NAMES: tuple[str, ...] = (NOISED, SOFT, ADAPTIVE, BLENDED)
REFERENCE_LAYOUTS: tuple[str, ...] = REFERENCES

# One row per (layout, seed, benchmark, metric, item): what every run writes and the table aggregates.
STUDY_SCORES_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "seed": pl.Int64(), "benchmark": pl.String(), "metric": pl.String(),
    "item_id": pl.String(), "score": pl.Float64(),
}


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; every field can be set from an experiment's `study:` mapping. How long a study of
    these sizes takes on the 2-core CPU, measured per run, is in docs/study.md ("Time")."""

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
    # A generalisation probe outside every training mix (`moce_model.evaluation.humaneval_choice`): which of 4
    # function bodies completes a HumanEval prompt, lm-eval's acc / acc_norm on the first this many of the 164
    # problems (0 leaves it out). Chance is 0.25; the base SmolLM2-135M scored acc 0.719 [0.599, 0.814] on the
    # first 64 (Wilson, n = 64), which cost 316 CPU-s (4 forward passes of ~100-500 tokens per problem): about
    # as much again as the rest of a run's evaluation, so 64, not all 164 (~800 CPU-s per run).
    humaneval_choice_items: int = 64
    bootstrap_resamples: int = 4_000
    # Evaluation-only conditions scored on every trained run (`moce_model.study.conditions.CONDITIONS`), table
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
        for name in ("gsm8k_items", "humaneval_choice_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"study {name} must be >= 0, got {getattr(self, name)}")

        unknown = [condition for condition in self.conditions if condition not in CONDITION_NAMES]
        if unknown:
            raise ValueError(f"study conditions {unknown} are not among {list(CONDITION_NAMES)}")
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"study conditions must be distinct, got {self.conditions}")

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
        layout = ExpertLayout(
            experts_per_group=experts, router_top_k=config.router_top_k, adapter_dim=config.adapter_dim,
            single_group_experts=None if self.pesc_matched_groups else experts, token_router=self.token_router,
        )
        return MoCEConfig.for_variant(self.variant, layout, num_clusters=num_clusters, embedder=embedder)


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


