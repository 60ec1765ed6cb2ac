"""What each variant means, decided once in moce_model.variants, and how the number of groups follows k."""

import pytest

from moce_model.model.config import ExpertLayout, MoCEConfig
from moce_model.variants import (
    VARIANTS,
    GroupChoice,
    check_clusters_match_groups,
    variant_semantics,
)

# (group choice, token routing, needs centroids, one group per cluster)
EXPECTED = {
    "moce": (GroupChoice.CLUSTER, True, True, True),
    "pesc": (GroupChoice.SINGLE, True, False, False),
    "dense_adapter": (GroupChoice.SINGLE, False, False, False),
    "random_group": (GroupChoice.HASH, True, False, True),
    "cluster_only": (GroupChoice.CLUSTER, False, True, True),
}


def test_every_variant_has_its_semantics():
    assert set(VARIANTS) == set(EXPECTED)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_variant_semantics(variant):
    group_choice, token_routing, needs_centroids, per_cluster = EXPECTED[variant]
    semantics = variant_semantics(variant)
    assert semantics.group_choice is group_choice
    assert semantics.token_routing is token_routing
    assert semantics.needs_centroids is needs_centroids
    assert semantics.needs_num_clusters is per_cluster
    config = MoCEConfig(variant=variant, num_clusters=5, experts_per_group=4, top_k=2, adapter_dim=4)
    assert (config.group_choice, config.token_routing, config.needs_centroids, config.needs_num_clusters) == (
        group_choice, token_routing, needs_centroids, per_cluster
    )
    assert config.num_groups == (5 if per_cluster else 1)
    # Without token routing each group is one adapter that every token goes through.
    assert (config.experts_per_group, config.router_top_k) == ((4, 2) if token_routing else (1, 1))
    assert config.has_router is token_routing


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"variant 'mixture' is not one of \('moce', 'pesc'"):
        variant_semantics("mixture")
    with pytest.raises(ValueError, match="variant 'mixture'"):
        MoCEConfig(variant="mixture")


@pytest.mark.parametrize("variant", ["moce", "random_group", "cluster_only"])
def test_per_cluster_variants_need_k(variant):
    with pytest.raises(ValueError, match=rf"variant {variant!r} has one expert group per cluster .*num_clusters"):
        MoCEConfig(variant=variant, num_clusters=None)
    with pytest.raises(ValueError, match="num_clusters must be a positive int, got 0"):
        MoCEConfig(variant=variant, num_clusters=0)


def test_num_clusters_may_be_a_numpy_integer():
    import numpy as np

    config = MoCEConfig(variant="moce", num_clusters=np.int64(4))
    assert config.num_groups == 4 and type(config.num_groups) is int
    with pytest.raises(ValueError, match="num_clusters must be a positive int, got 2.5"):
        MoCEConfig(variant="moce", num_clusters=2.5)


def test_single_group_variants_ignore_k():
    assert MoCEConfig(variant="pesc", num_clusters=None).num_groups == 1
    assert MoCEConfig(variant="pesc", num_clusters=9).num_groups == 1


def test_stored_num_groups_survives_a_round_trip():
    config = MoCEConfig(variant="random_group", num_clusters=6, experts_per_group=2, top_k=1, adapter_dim=4)
    stored = config.to_dict()
    assert stored["num_groups"] == 6 and "num_clusters" not in stored
    assert MoCEConfig.from_dict(stored).num_groups == 6


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_for_variant_builds_the_experiment_layout(variant):
    group_choice, token_routing, needs_centroids, per_cluster = EXPECTED[variant]
    layout = ExpertLayout(experts_per_group=4, single_group_experts=8, router_top_k=2, adapter_dim=4)
    config = MoCEConfig.for_variant(variant, layout, num_clusters=3 if per_cluster else None,
                                    embedder={"model": "encoder"})
    assert config.variant == variant
    assert config.num_groups == (3 if per_cluster else 1)
    expected_experts = 1 if not token_routing else (8 if group_choice is GroupChoice.SINGLE else 4)
    assert config.experts_per_group == expected_experts
    # Only a model that embeds its prompts keeps the embedder reference.
    assert config.embedder == ({"model": "encoder"} if needs_centroids else None)


def test_for_variant_ignores_k_where_the_variant_does_not_use_it():
    pesc = MoCEConfig.for_variant("pesc", ExpertLayout(experts_per_group=4, single_group_experts=8), num_clusters=5)
    assert (pesc.num_groups, pesc.experts_per_group) == (1, 8)


def test_a_budget_matched_single_group_holds_every_group_s_experts():
    layout = ExpertLayout(experts_per_group=4, single_group_experts=None)
    moce = MoCEConfig.for_variant("moce", layout, num_clusters=5)
    pesc = MoCEConfig.for_variant("pesc", layout, num_clusters=5)
    assert pesc.num_groups * pesc.experts_per_group == moce.num_groups * moce.experts_per_group == 20
    assert layout.needs_num_clusters("pesc") and not ExpertLayout(single_group_experts=8).needs_num_clusters("pesc")
    assert not layout.needs_num_clusters("dense_adapter")
    with pytest.raises(ValueError, match="needs the clustering's k"):
        MoCEConfig.for_variant("pesc", layout, num_clusters=None)


def test_k_is_checked_against_groups_only_where_clusters_route():
    moce = MoCEConfig(variant="moce", num_clusters=3)
    moce.check_num_clusters(3, where="here")
    with pytest.raises(ValueError, match=r"here: the clustering has k=4 clusters but the 'moce' model has num_groups=3"):
        moce.check_num_clusters(4, where="here")
    # random_group never meets the centroids: its groups are hashes, whatever a clustering says.
    MoCEConfig(variant="random_group", num_clusters=3).check_num_clusters(4, where="here")
    check_clusters_match_groups("pesc", 1, 7, where="here")
