"""Soft cluster assignment: when a prompt lies near the boundary of two clusters (a small distance margin),
its sequence mixes the two groups' experts with temperature-softmax weights instead of picking one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SoftAssignmentRule:
    """When a prompt near the boundary of two clusters gets both clusters' groups, and with which weights.

    With d1 <= d2 the distances of the prompt's embedding to its two nearest centroids, the *relative gap*
    ``g = (d2 - d1) / d1`` measures how far the prompt is from the boundary between them in units of its
    distance to the nearest centroid, so the rule does not depend on the scale of the embedding space (unit
    vectors here, but a centroid file of another embedder or of unnormalised means needs the same margin).
    A prompt with ``g < margin`` is *soft*: its groups are mixed with the weights of a softmax over the negative
    distances in the same unit, ``w_i ∝ exp(-d_i / (temperature * d1))``, i.e. the second group gets
    ``1 / (1 + exp(g / temperature))`` (0.5 exactly halfway between the centroids). Every other prompt is
    hard: weight 1 on the nearest group, exactly as without the rule.

    At the margin the second group's weight drops from ``1 / (1 + exp(margin / temperature))`` to 0; with the
    defaults (0.1, 0.025) that step is 0.018, so the output barely changes as a prompt crosses the margin.
    """

    margin: float = 0.1
    temperature: float = 0.025

    def __post_init__(self) -> None:
        for name in ("margin", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"soft assignment {name} must be a positive finite number, got {value!r}")

    def weights(self, nearest: np.ndarray, second: np.ndarray) -> np.ndarray:
        """float64 [n, 2]: the weights of the nearest and the second-nearest cluster given the distances to them
        ([n] each); (1, 0) for a hard row."""
        nearest = np.asarray(nearest, dtype=np.float64)
        second = np.asarray(second, dtype=np.float64)
        # Signed: the nearest cluster is the one the hard rule picks (float32 scores), and in a near tie float64
        # distances may rank the two the other way; the weights then follow the distances.
        closest = np.minimum(nearest, second)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.where(second == nearest, 0.0, (second - nearest) / closest)  # inf when closest == 0 < other
        soft = np.abs(gap) < self.margin
        second_weight = np.zeros_like(gap)
        with np.errstate(over="ignore"):
            second_weight[soft] = 1.0 / (1.0 + np.exp(gap[soft] / self.temperature))
        return np.stack([1.0 - second_weight, second_weight], axis=1)


@dataclass(frozen=True)
class SoftClusters:
    """A soft assignment of n texts: `clusters` int64 [n, 2] (nearest, second-nearest centroid; twice the
    nearest with a single centroid) and `weights` float64 [n, 2] ((1, 0) for the hard rows)."""

    clusters: np.ndarray
    weights: np.ndarray

    @property
    def nearest(self) -> np.ndarray:
        """The cluster the hard rule picks for each text."""
        return self.clusters[:, 0]

    @property
    def soft(self) -> np.ndarray:
        """bool [n]: the texts that get a second group."""
        return self.weights[:, 1] > 0
