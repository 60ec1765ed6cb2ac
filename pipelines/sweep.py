"""`moce sweep --ks 2,3`: the k sweep, one run per partition of the `k_sweep` branch, through the run queue.

Materializes the sweep's inputs (instructions, embeddings, base model) when they are missing or stale, adds each
k as a partition, submits one Dagster run per k (clusters, `moce` trained, merged and checked against the unmerged
model, evaluated) to the instance's run queue, which runs as many side by side as its limits allow, then
`k_sweep/comparison` over every materialized k. A k that fails does not stop the others (as in a backfill); the
command then reports it and fails. In the UI the same partitions can be launched as a backfill, one run per k,
under the same limits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import dagster as dg

from assets.k_sweep import (
    COMPARISON_KEY,
    K_PARTITIONS,
    RESULTS_KEY,
    SWEEP,
    SWEEP_VARIANT,
)
from pipelines.queue import RunQueue
from pipelines.runner import materialize_unsynced


def sweep_selection() -> dg.AssetSelection:
    """The assets one k's run materializes (every per-k asset of the branch, with their checks)."""
    return dg.AssetSelection.groups(SWEEP.group_name) - dg.AssetSelection.assets(COMPARISON_KEY)


def sweep_inputs() -> dg.AssetSelection:
    """What the sweep reads from the main graph, and everything those are built from."""
    branch = dg.AssetSelection.groups(SWEEP.group_name)
    return (branch.upstream() - branch).required_multi_asset_neighbors()


def run_sweep(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    queue: RunQueue,
    ks: Sequence[int],
    *,
    max_steps: int | None = None,
    out: TextIO | None = None,
) -> bool:
    """Run the k sweep for `ks` through `queue`; returns whether every k and the comparison succeeded."""
    out = out or sys.stdout
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 2]
    if not ks or bad:
        raise ValueError(f"k sweep: every k must be an integer >= 2, got {list(ks)}")
    keys = [str(k) for k in sorted(set(ks))]

    print("the sweep's inputs:", file=out)
    if not materialize_unsynced(defs, instance, sweep_inputs(), queue=queue, out=out):
        print("the sweep's inputs FAILED; no k was run", file=sys.stderr)
        return False

    instance.add_dynamic_partitions(K_PARTITIONS.name, keys)
    training_op = defs.resolve_assets_def(dg.AssetKey(SWEEP.key("moce_adapters", SWEEP_VARIANT))).op.name
    run_config: dict = {}
    if max_steps is not None:
        run_config["ops"] = {training_op: {"config": {"max_steps": max_steps}}}
    per_k = sorted(sweep_selection().resolve(defs.resolve_asset_graph()), key=lambda key: key.to_user_string())
    run_ids = [queue.submit("k_sweep", per_k, label=f"k={key}", partition=key, run_config=run_config)
               for key in keys]
    failed = [outcome.label.removeprefix("k=") for outcome in queue.wait(run_ids) if not outcome.success]

    [comparison] = queue.wait([queue.submit("k_sweep", [COMPARISON_KEY], label="k_sweep/comparison")])
    if not comparison.success:
        print("k_sweep/comparison FAILED; see the errors above", file=sys.stderr)
        return False
    materialization = instance.get_latest_materialization_event(COMPARISON_KEY).asset_materialization
    print("\n" + materialization.metadata["comparison"].value, file=out)
    print(f"the table: {materialization.metadata['path'].value} (k_sweep/comparison in `moce ui`)", file=out)
    done = instance.get_materialized_partitions(RESULTS_KEY)
    for key in failed:
        print(f"k={key} FAILED: the table " + ("shows its earlier materialization" if key in done
                                               else "leaves it out"), file=sys.stderr)
    return not failed
