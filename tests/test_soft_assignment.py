"""Soft assignment of boundary prompts: the rule (distances -> two clusters and weights), the config option, the
experts layer (weighted sum of the block under both groups, balance loss weighted the same way), the model (mixed
batches, activation checkpointing, generation), a merged directory that routes softly by itself, and evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from moce_model.config import MoCEConfig
from moce_model.routing import ClusterRouter, SoftAssignmentRule

RULE = SoftAssignmentRule(margin=0.1, temperature=0.025)


class FixedEncoder:
    """Encodes each known text to a given vector (the rule is tested on constructed geometry)."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[text] for text in texts]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the rule


def square_centroids() -> np.ndarray:
    return np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)


def test_a_point_exactly_halfway_gets_both_groups_at_one_half() -> None:
    router = ClusterRouter(FixedEncoder({}), square_centroids())
    halfway = np.array([[1.0, 1.0]], dtype=np.float32) / np.sqrt(2.0)
    soft = router.assign_soft_embeddings(halfway, RULE)
    assert soft.clusters.tolist() == [[0, 1]]
    assert soft.weights.tolist() == [[0.5, 0.5]]
    assert soft.soft.tolist() == [True]


def test_a_far_point_is_hard_and_goes_where_the_hard_rule_sends_it() -> None:
    router = ClusterRouter(FixedEncoder({}), square_centroids())
    points = np.array([[0.9, 0.1], [0.1, -0.2], [-1.0, 0.3]], dtype=np.float32)
    soft = router.assign_soft_embeddings(points, RULE)
    assert soft.nearest.tolist() == router.assign_embeddings(points).tolist()
    assert soft.weights.tolist() == [[1.0, 0.0]] * 3
    assert not soft.soft.any()


def test_the_margin_is_a_relative_gap_and_the_weights_a_softmax_over_negative_distances() -> None:
    router = ClusterRouter(FixedEncoder({}), np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32))
    for x in (0.45, 0.475, 0.49):
        d1, d2 = x, 1.0 - x
        gap = (d2 - d1) / d1
        soft = router.assign_soft_embeddings(np.array([[x, 0.0]], dtype=np.float32), RULE)
        if gap < RULE.margin:
            logits = -np.array([d1, d2]) / (RULE.temperature * d1)
            expected = np.exp(logits) / np.exp(logits).sum()
            np.testing.assert_allclose(soft.weights[0], expected, rtol=1e-5)
        else:
            assert soft.weights[0].tolist() == [1.0, 0.0]
    assert router.assign_soft_embeddings(np.array([[0.45, 0.0]], dtype=np.float32), RULE).weights[0, 1] == 0.0
    assert router.assign_soft_embeddings(np.array([[0.49, 0.0]], dtype=np.float32), RULE).weights[0, 1] > 0.0


def test_the_rule_does_not_depend_on_the_scale_of_the_space() -> None:
    centroids = square_centroids()
    points = np.array([[0.6, 0.58], [0.2, 0.21], [0.9, 0.1]], dtype=np.float32)
    unit = ClusterRouter(FixedEncoder({}), centroids).assign_soft_embeddings(points, RULE)
    scaled = ClusterRouter(FixedEncoder({}), 8 * centroids).assign_soft_embeddings(8 * points, RULE)
    assert unit.clusters.tolist() == scaled.clusters.tolist()
    np.testing.assert_allclose(unit.weights, scaled.weights, rtol=1e-6)
    assert unit.soft.tolist() == [True, True, False]


def test_a_single_centroid_routes_every_text_hard() -> None:
    router = ClusterRouter(FixedEncoder({"a": np.array([0.5, 0.5])}), np.array([[1.0, 0.0]], dtype=np.float32))
    soft = router.assign_soft(["a"], RULE)
    assert soft.clusters.tolist() == [[0, 0]] and soft.weights.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(("key", "value"), [("margin", 0), ("margin", -0.1), ("temperature", float("nan")),
                                            ("temperature", "warm"), ("margin", True)])
def test_rule_errors_name_the_setting_and_the_value(key: str, value) -> None:
    with pytest.raises(ValueError, match=rf"soft assignment {key} must be a positive finite number, got {value!r}"):
        SoftAssignmentRule(**{key: value})


# ------------------------------------------------------------------------------------------------ config


def test_soft_assignment_is_off_by_default_and_survives_a_round_trip() -> None:
    config = MoCEConfig(variant="moce", num_clusters=3)
    assert config.soft_assignment is False and config.soft_assignment_rule is None
    on = MoCEConfig(variant="cluster_only", num_clusters=3, soft_assignment=True, soft_assignment_margin=0.2,
                    soft_assignment_temperature=0.05)
    reloaded = MoCEConfig.from_dict(on.to_dict())
    assert reloaded.soft_assignment_rule == SoftAssignmentRule(margin=0.2, temperature=0.05)


@pytest.mark.parametrize("variant", ["pesc", "dense_adapter", "random_group"])
def test_variants_without_cluster_groups_reject_soft_assignment(variant: str) -> None:
    with pytest.raises(ValueError, match=rf"MoCEConfig.soft_assignment=True .* variant '{variant}' does not route "
                                         r"by cluster .* use it with moce or cluster_only"):
        MoCEConfig(variant=variant, num_clusters=3, soft_assignment=True)
    # One experiment-wide setting: the variants it does not apply to are built without it.
    config = MoCEConfig.for_variant(variant, num_clusters=3, experts_per_group=4, soft_assignment=True,
                                    soft_assignment_margin=0.3)
    assert config.soft_assignment is False and config.soft_assignment_margin == SoftAssignmentRule.margin
    assert MoCEConfig.for_variant("moce", num_clusters=3, experts_per_group=4, soft_assignment=True,
                                  soft_assignment_margin=0.3).soft_assignment_rule.margin == 0.3


@pytest.mark.parametrize(("key", "value", "message"), [
    ("soft_assignment", "yes", "must be true or false"),
    ("soft_assignment_margin", 0.0, "must be a positive finite number"),
    ("soft_assignment_temperature", -1, "must be a positive finite number"),
])
def test_config_errors_name_the_key_and_the_value(key: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=rf"MoCEConfig.{key} {message}, got {value!r}"):
        MoCEConfig(variant="moce", num_clusters=2, **{key: value})
