"""Configuration of a MoCE model: a wrapped causal LM plus routed adapter experts in every MLP block.

The variant's meaning comes from `moce_model.variants`; the config answers the questions derived from it
(`config.needs_centroids`, `config.token_routing`, ...) so no other module compares variant names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from transformers import AutoConfig, PreTrainedConfig

from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.variants import (
    MOCE_MODEL_TYPE,
    TOKEN_ROUTERS,
    GroupChoice,
    VariantSemantics,
    check_clusters_match_groups,
    cluster_routed_variants,
    variant_semantics,
)

# The MoCEConfig fields of the soft assignment of boundary prompts (`moce_model.clustering.soft.SoftAssignmentRule`).
SOFT_ASSIGNMENT_KEYS: tuple[str, ...] = ("soft_assignment", "soft_assignment_margin", "soft_assignment_temperature")
# Over which tokens the load-balancing loss balances a block's routers: within each group (`group`), or the
# expert slots of all groups pooled over every sequence of the batch (`all`, what the reference code's formula
# computes: it concatenates every token's E logits whatever its cluster).
BALANCE_LOSS_SCOPES: tuple[str, ...] = ("group", "all")
# The AC router's statistics (`moce_model.model.ac_router`): per sequence, or per micro-batch as in the reference.
AC_STATISTICS: tuple[str, ...] = ("sequence", "batch")
# How the AC router scores x M: through the group's router (`router`), or against the router's rows scaled to
# unit norm (`normalised_experts`, the reference scripts' expert embeddings).
AC_SCORINGS: tuple[str, ...] = ("router", "normalised_experts")




@dataclass(frozen=True)
class ExpertLayout:
    """An experiment's expert layout under the names it keeps from the experiment file (`experts:`) down to the
    experts layer; `MoCEConfig.for_variant` turns it into one variant's config."""

    experts_per_group: int = 4
    router_top_k: int = 2
    adapter_dim: int = 16
    # Experts of the single routed group (`pesc`). None: the clustering's k x experts_per_group, so that pesc has
    # as many experts as moce has in all its groups (the paper's budget-matched comparison).
    single_group_experts: int | None = None
    token_router: str = "linear"
    adapter_dropout: float = 0.0
    soft_assignment: SoftAssignmentRule | None = None
    # The load-balancing loss: its weight (0: none) and scope (BALANCE_LOSS_SCOPES).
    aux_loss_coef: float = 0.01
    balance_loss_scope: str = "group"
    # AC router only: the first MoE block (0-based) that scores with AC weights, and the statistics and scoring.
    ac_start_layer: int = 1
    ac_statistics: str = "sequence"
    ac_scoring: str = "router"

    def single_group_size(self, num_clusters: int | None) -> int:
        if self.single_group_experts is not None:
            return self.single_group_experts
        if num_clusters is None:
            raise ValueError("single_group_experts is null (k x experts_per_group, budget-matched): the single-group "
                             "variant needs the clustering's k")
        return num_clusters * self.experts_per_group

    def needs_num_clusters(self, variant: str) -> bool:
        """Whether `variant`'s model depends on k under this layout (a budget-matched single group does)."""
        semantics = variant_semantics(variant)
        matched_single_group = (semantics.group_choice is GroupChoice.SINGLE and semantics.token_routing
                                and self.single_group_experts is None)
        return semantics.needs_num_clusters or matched_single_group


class MoCEConfig(PreTrainedConfig):
    """Wrapped model config (`base_config`, a dict with its `model_type`) plus the expert layout.

    Variants, all from this one config (`VARIANT_SEMANTICS` above):
      - `moce`: one group per cluster x `experts_per_group` experts; the cluster id picks the group, the
        group's router picks the `router_top_k` experts per token (`top_k=` is accepted as an alias).
      - `pesc`: one group of `experts_per_group` experts with token top-k routing; it never depends on the
        number of clusters.
      - `dense_adapter`: one adapter, no router (1 group x 1 expert).
      - `cluster_only`: the cluster id picks the group, which holds a single adapter (no token routing).
      - `random_group`: like `moce`, but the group is a deterministic pseudo-random function of the
        sequence's prompt tokens (seeded by `random_group_seed`); `cluster_ids` are ignored.

    `token_router` (one of `TOKEN_ROUTERS`) picks how a group's router scores tokens in every variant with
    token routing: `linear` (default) or `ac` (adaptive clustering, `adaptive_clustering_router`).

    `soft_assignment` (off by default; variants that route by cluster only): a prompt near the boundary of two
    clusters is answered by both clusters' groups, the block outputs mixed by distance; the rule and its
    `soft_assignment_margin` and `soft_assignment_temperature` are `moce_model.clustering.soft.SoftAssignmentRule`'s.
    It decides how the model routes a prompt by itself (a merged directory's router, `generate`, evaluation);
    cluster ids given by the caller are used as given (training passes the clustering's hard assignments).

    The number of groups is derived from the variant and the clustering: pass `num_clusters=k` (the selected
    k) and `num_groups` becomes k for the variants with one group per cluster and 1 for the others. A stored
    config (config.json) carries `num_groups`, which is then the k it was trained with.
    """

    model_type = MOCE_MODEL_TYPE

    base_config: dict | None = None
    variant: str = "moce"
    num_groups: int = 4
    experts_per_group: int = 4
    # Not `top_k`: that name is a generation parameter, which generate() would read as sampling top-k.
    router_top_k: int = 2
    adapter_dim: int = 64
    adapter_scaling: float = 1.0
    adapter_dropout: float = 0.0
    aux_loss_coef: float = 0.01
    balance_loss_scope: str = "group"
    ac_start_layer: int = 1
    ac_statistics: str = "sequence"
    ac_scoring: str = "router"
    random_group_seed: int = 0
    token_router: str = "linear"
    soft_assignment: bool = False
    soft_assignment_margin: float = SoftAssignmentRule.margin
    soft_assignment_temperature: float = SoftAssignmentRule.temperature
    embedder: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if "top_k" in kwargs:
            self.router_top_k = kwargs.pop("top_k")
        semantics = variant_semantics(self.variant)
        self.num_groups = semantics.num_groups(kwargs.pop("num_clusters", self.num_groups))
        if not semantics.token_routing:
            self.experts_per_group = 1
            self.router_top_k = 1
        for field_name in ("num_groups", "experts_per_group", "router_top_k", "adapter_dim"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoCEConfig.{field_name} must be a positive int, got {value!r}")
        if self.router_top_k > self.experts_per_group:
            raise ValueError(
                f"MoCEConfig.router_top_k={self.router_top_k} exceeds experts_per_group={self.experts_per_group}"
            )
        if self.token_router not in TOKEN_ROUTERS:
            raise ValueError(f"MoCEConfig.token_router must be one of {TOKEN_ROUTERS}, got {self.token_router!r}")
        if self.token_router != "linear" and self.experts_per_group < 2:
            raise ValueError(
                f"MoCEConfig.token_router={self.token_router!r} scores tokens against the experts of a group, but "
                f"variant {self.variant!r} with experts_per_group={self.experts_per_group} has no token router: "
                "use it with a token-routing variant (moce, pesc, random_group) and experts_per_group >= 2"
            )
        if not isinstance(self.soft_assignment, bool):
            raise ValueError(f"MoCEConfig.soft_assignment must be true or false, got {self.soft_assignment!r}")
        for field_name in ("soft_assignment_margin", "soft_assignment_temperature"):
            try:
                SoftAssignmentRule(**{field_name.removeprefix("soft_assignment_"): getattr(self, field_name)})
            except ValueError:
                raise ValueError(
                    f"MoCEConfig.{field_name} must be a positive finite number, got {getattr(self, field_name)!r}"
                ) from None
        if self.soft_assignment and not semantics.needs_centroids:
            raise ValueError(
                f"MoCEConfig.soft_assignment=True mixes the groups of a prompt's two nearest clusters, but variant "
                f"{self.variant!r} does not route by cluster (its group: {semantics.group_choice.value}); use it "
                f"with {' or '.join(cluster_routed_variants())}"
            )
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"MoCEConfig.adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        self._check_balance_and_ac()
        if self.base_config is not None:
            if not isinstance(self.base_config, dict):
                self.base_config = self.base_config.to_dict()
            if "model_type" not in self.base_config:
                raise ValueError("MoCEConfig.base_config needs a 'model_type' key (the wrapped model's config dict)")
            # Read by generation, DeepSpeed "auto" values and the Trainer; mirrored from the wrapped model.
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
                if key in self.base_config:
                    kwargs.setdefault(key, self.base_config[key])
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(key, self.base_config.get(key))
        super().__post_init__(**kwargs)

    def _check_balance_and_ac(self) -> None:
        coef = self.aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0.0 <= coef < float("inf"):
            raise ValueError(f"MoCEConfig.aux_loss_coef must be a finite number >= 0 (0: no balance loss), got {coef!r}")
        choices = (("balance_loss_scope", BALANCE_LOSS_SCOPES), ("ac_statistics", AC_STATISTICS),
                   ("ac_scoring", AC_SCORINGS))
        for field_name, allowed in choices:
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"MoCEConfig.{field_name} must be one of {allowed}, got {getattr(self, field_name)!r}")
        start = self.ac_start_layer
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ValueError(f"MoCEConfig.ac_start_layer must be an int >= 1 (block 0 has no previous block's "
                             f"assignments), got {start!r}")
        if self.ac_statistics == "batch" and self.soft_assignment:
            raise ValueError("MoCEConfig.ac_statistics='batch' with soft_assignment: a mixed row's second group would "
                             "take statistics from the other mixed rows only; use ac_statistics='sequence'")

    @property
    def balance_loss_enabled(self) -> bool:
        """Whether training adds the load-balancing loss: a router to balance and a weight above 0."""
        return self.has_router and self.aux_loss_coef > 0

    @classmethod
    def for_variant(cls, variant: str, layout: ExpertLayout, *, num_clusters: int | None,
                    embedder: dict | None = None) -> MoCEConfig:
        """The config of `variant` with the experiment's expert `layout`, in an experiment whose clustering has
        `num_clusters` clusters (None where nothing depends on k). The one place a layout is normalised per
        variant: a single routed group (`pesc`) holds `layout.single_group_experts(num_clusters)` experts; the
        embedder reference and the soft-assignment settings are kept only by variants that route by cluster (the
        others never embed a prompt), and a `token_router` only by variants that route tokens."""
        semantics = variant_semantics(variant)
        experts = layout.experts_per_group
        if semantics.group_choice is GroupChoice.SINGLE and semantics.token_routing:
            experts = layout.single_group_size(num_clusters)
        values = {"router_top_k": min(layout.router_top_k, experts), "adapter_dim": layout.adapter_dim,
                  "adapter_dropout": layout.adapter_dropout, "aux_loss_coef": layout.aux_loss_coef,
                  "balance_loss_scope": layout.balance_loss_scope}
        if semantics.token_routing:
            values["token_router"] = layout.token_router
            if layout.token_router == "ac":
                values.update(ac_start_layer=layout.ac_start_layer, ac_statistics=layout.ac_statistics,
                              ac_scoring=layout.ac_scoring)
        if semantics.needs_centroids and layout.soft_assignment is not None:
            values.update(soft_assignment=True, soft_assignment_margin=layout.soft_assignment.margin,
                          soft_assignment_temperature=layout.soft_assignment.temperature)
        return cls(
            variant=variant,
            num_clusters=num_clusters if semantics.needs_num_clusters else None,
            experts_per_group=experts,
            embedder=dict(embedder) if embedder is not None and semantics.needs_centroids else None,
            **values,
        )

    @property
    def semantics(self) -> VariantSemantics:
        return variant_semantics(self.variant)

    @property
    def group_choice(self) -> GroupChoice:
        return self.semantics.group_choice

    @property
    def token_routing(self) -> bool:
        return self.semantics.token_routing

    @property
    def needs_centroids(self) -> bool:
        return self.semantics.needs_centroids

    @property
    def needs_num_clusters(self) -> bool:
        return self.semantics.needs_num_clusters

    @property
    def has_router(self) -> bool:
        """Whether the layers hold routers (and the load-balancing loss applies): more than one expert per group."""
        return self.experts_per_group > 1

    @property
    def adaptive_clustering_router(self) -> bool:
        """Whether the routers score tokens in the adaptive-clustering space (`token_router: ac`): each MoE block
        then needs the previous block's top-1 expert of every token."""
        return self.token_router == "ac"

    @property
    def soft_assignment_rule(self) -> SoftAssignmentRule | None:
        """The rule the model routes its own prompts by when `soft_assignment` is on, else None (hard)."""
        if not self.soft_assignment:
            return None
        return self.soft_assignment_settings

    @property
    def soft_assignment_settings(self) -> SoftAssignmentRule:
        """The margin and temperature of this config, whether `soft_assignment` is on or not."""
        return SoftAssignmentRule(margin=self.soft_assignment_margin, temperature=self.soft_assignment_temperature)

    def check_num_clusters(self, num_clusters: int, where: str) -> None:
        check_clusters_match_groups(self.variant, self.num_groups, num_clusters, where)

    @cached_property
    def wrapped_config(self) -> PreTrainedConfig:
        """The wrapped model's config object, built from `base_config`."""
        if self.base_config is None:
            raise ValueError("MoCEConfig.base_config is not set: build the config from a base model config")
        kwargs = dict(self.base_config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # Cache and generation code read layer counts and head sizes from the text config.
        if self.base_config is None:
            return self
        return self.wrapped_config

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("wrapped_config", None)
        return output
