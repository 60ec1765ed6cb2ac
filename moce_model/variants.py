"""What each variant means, decided here and nowhere else: how a variant picks a sequence's expert group
(cluster, hash, single) and whether a router picks experts per token. Every other module asks these
questions (`variant_semantics(name)`) instead of comparing variant names; the experiment schema's literals are
derived from `VARIANTS` and `TOKEN_ROUTERS`."""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

# The untrained base model: a model name beside the variants, never a variant itself.
BASE = "base"
# `model_type` of a MoCE model's config.json.
MOCE_MODEL_TYPE = "moce"


class GroupChoice(str, enum.Enum):
    """How a sequence's expert group is chosen (stage 1)."""

    CLUSTER = "cluster"  # the k-means cluster of its routing text: the caller or the directory's router gives it
    HASH = "hash"  # a seeded hash of its prompt tokens (the random-group ablation): no clustering needed
    SINGLE = "single"  # there is one group, every sequence uses it


@dataclass(frozen=True)
class VariantSemantics:
    name: str
    group_choice: GroupChoice
    # Whether a router picks the top-k experts of the group for each token (stage 2); without it each group
    # holds one adapter that every token of the sequence goes through.
    token_routing: bool
    description: str

    @property
    def needs_centroids(self) -> bool:
        """Trained on cluster assignments and routed by the centroids (+ embedder) at inference."""
        return self.group_choice is GroupChoice.CLUSTER

    @property
    def needs_num_clusters(self) -> bool:
        """Has one expert group per cluster, so its size depends on k (but not necessarily on the centroids)."""
        return self.group_choice is not GroupChoice.SINGLE

    def num_groups(self, num_clusters: int | None) -> int:
        """Expert groups of this variant for a clustering into `num_clusters` clusters: one per cluster, or one."""
        if not self.needs_num_clusters:
            return 1
        if num_clusters is None:
            raise ValueError(
                f"variant {self.name!r} has one expert group per cluster ({self.group_choice.value} routing): "
                "it needs num_clusters (the selected k)"
            )
        try:
            count = operator.index(num_clusters)  # numpy integers too
        except TypeError:
            count = None
        if isinstance(num_clusters, bool) or count is None or count < 1:
            raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
        return count


_SEMANTICS = (
    VariantSemantics("moce", GroupChoice.CLUSTER, True,
                     "the prompt's nearest k-means centroid picks the group, its router the experts of each token"),
    VariantSemantics("pesc", GroupChoice.SINGLE, True,
                     "one group for every prompt, its router picks the experts of each token"),
    VariantSemantics("dense_adapter", GroupChoice.SINGLE, False,
                     "one adapter for every prompt and token (no routing)"),
    VariantSemantics("random_group", GroupChoice.HASH, True,
                     "a hash of the prompt tokens picks the group (ablation), its router the experts of each token"),
    VariantSemantics("cluster_only", GroupChoice.CLUSTER, False,
                     "the prompt's nearest k-means centroid picks the group, which holds one adapter (ablation)"),
)
VARIANT_SEMANTICS: dict[str, VariantSemantics] = {semantics.name: semantics for semantics in _SEMANTICS}
VARIANTS: tuple[str, ...] = tuple(VARIANT_SEMANTICS)

# How a group's router scores a token against the group's experts (stage 2):
#   - `linear`: logits = x W_g^T (PESC's router);
#   - `ac`: the Adaptive Clustering router of Nielsen et al., "Tight Clusters Make Specialized Experts" (ICLR
#     2025): the token is scaled feature by feature by the weights of the expert the previous MoE layer sent
#     it to, weights that grow as that expert's tokens cluster more tightly along the feature, and then scored
#     by the same linear router (see `moce_model.model.ac_router.adaptive_clustering_feature_weights`).
TOKEN_ROUTERS: tuple[str, ...] = ("linear", "ac")


def variant_semantics(variant: str) -> VariantSemantics:
    try:
        return VARIANT_SEMANTICS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}") from None


def cluster_routed_variants() -> tuple[str, ...]:
    """The variants whose groups are the clusters of the prompt's embedding (the only ones a soft assignment
    can mix: the others have no clusters, or one group)."""
    return tuple(name for name, semantics in VARIANT_SEMANTICS.items() if semantics.needs_centroids)


def check_clusters_match_groups(variant: str, num_groups: int, num_clusters: int, where: str) -> None:
    """A clustering into `num_clusters` clusters routes a `variant` model with `num_groups` groups only when
    every cluster is one trained group. The one check of k against a model, wherever the two meet (training
    rows, merge, a router attached to a model); `where` names what was being put together."""
    if variant_semantics(variant).needs_centroids and num_clusters != num_groups:
        raise ValueError(
            f"{where}: the clustering has k={num_clusters} clusters but the {variant!r} model has "
            f"num_groups={num_groups}: every cluster must be one trained expert group; train (or merge) with "
            "the centroids of the same clustering"
        )
