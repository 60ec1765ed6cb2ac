"""Names of the metrics that the benchmarks write and the report and the study read, and which way each is good.
A module of its own so that the study's table can use them without importing the evaluation stack."""

from __future__ import annotations

HELDOUT_LOSS = "heldout_loss"
# The mean held-out loss of a blended prompt's two parts, each asked alone.
PARTS_LOSS = "heldout_loss_of_parts"
ROUTED_AS_FIRST_PART = "routed_as_first_part"
ROUTED_AS_SECOND_PART = "routed_as_second_part"

LOWER_IS_BETTER: frozenset[str] = frozenset({HELDOUT_LOSS, PARTS_LOSS})
# Metrics that describe where prompts went rather than how well they were answered: no "better" or "worse".
ROUTING_METRICS: frozenset[str] = frozenset({ROUTED_AS_FIRST_PART, ROUTED_AS_SECOND_PART})
