"""Standalone training entry point, for in-process use, `torchrun` and `deepspeed` launches.

    python -m moce_model.training.entry --spec run.json
    torchrun --nproc_per_node 2 -m moce_model.training.entry --spec run.json
    deepspeed --num_gpus 8 --module moce_model.training.entry --spec run.json   # with training.deepspeed set

run.json:
    {"base_model_dir": ..., "train_data": "train.parquet", "cluster_assignments": "assign.parquet" | null,
     "moce_config": {...} | null, "training_config": {...}, "output_dir": ..., "resume": true,
     "num_clusters": 4 | null}

Rank 0 writes output_dir/result.json (atomically). Nothing here needs Dagster; the pipeline launches
`resources.pipes_train_entry`, which wraps `run` to report logs and metrics back through Dagster Pipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moce_model.common.io import atomic_write_json
from moce_model.model.config import MoCEConfig
from moce_model.training import TrainingConfig, train

RESULT_NAME = "result.json"
@dataclass(frozen=True)
class TrainSpec:
    """One training run as a launcher hands it to this entry point (written as run.json by `write`)."""

    base_model_dir: str
    train_data: str
    training_config: dict[str, Any]
    output_dir: str
    cluster_assignments: str | None = None
    moce_config: dict[str, Any] | None = None
    resume: bool = True
    num_clusters: int | None = None

    def write(self, path: str | os.PathLike) -> Path:
        atomic_write_json(dataclasses.asdict(self), Path(path))
        return Path(path)


def load_spec(spec_path: str | os.PathLike) -> TrainSpec:
    spec_path = Path(spec_path)
    try:
        values = json.loads(spec_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"run spec not found: {spec_path}") from None
    except ValueError as error:
        raise ValueError(f"run spec {spec_path} is not valid JSON: {error}") from None
    known = {field.name for field in dataclasses.fields(TrainSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"run spec {spec_path}: unknown field(s) {unknown}; known: {sorted(known)}")
    for required in ("base_model_dir", "train_data", "training_config", "output_dir"):
        if values.get(required) in (None, ""):
            raise ValueError(f"run spec {spec_path}: field {required!r} is required")
    return TrainSpec(**values)


def read_cluster_assignments(path: str | os.PathLike) -> tuple[dict[str, int], int]:
    """id → cluster from a cluster_assignments parquet, and the number of distinct clusters."""
    import polars as pl

    try:
        frame = pl.read_parquet(path, columns=["id", "cluster"])
    except (pl.exceptions.PolarsError, OSError) as error:
        raise ValueError(
            f"{path}: cluster assignments unreadable ({type(error).__name__}: {error}); re-materialize "
            f"cluster_assignments"
        ) from error
    if frame["id"].is_duplicated().any():
        raise ValueError(f"{path}: duplicate ids in cluster assignments")
    mapping = dict(zip(frame["id"].to_list(), (int(c) for c in frame["cluster"].to_list())))
    return mapping, int(frame["cluster"].max()) + 1 if frame.height else 0


def build_moce_config(values: dict[str, Any] | None, base_model_dir: str) -> Any:
    if values is None:
        return None
    from transformers import AutoConfig

    values = dict(values)
    if values.get("base_config") is None:
        values["base_config"] = AutoConfig.from_pretrained(base_model_dir).to_dict()
    return MoCEConfig.from_dict(values)


def run(spec: TrainSpec, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train as the spec says; every rank returns the result, rank 0 also writes result.json."""
    import polars as pl

    rank = int(os.environ.get("RANK", "0"))
    output_dir = Path(spec.output_dir)
    train_rows = pl.read_parquet(spec.train_data)
    cluster_ids, found_clusters = (None, None)
    if spec.cluster_assignments:
        cluster_ids, found_clusters = read_cluster_assignments(spec.cluster_assignments)
    num_clusters = spec.num_clusters if spec.num_clusters is not None else found_clusters
    moce_config = build_moce_config(spec.moce_config, spec.base_model_dir)
    training_config = TrainingConfig.from_dict(spec.training_config)

    result = train(
        spec.base_model_dir,
        train_rows,
        cluster_ids,
        moce_config,
        training_config,
        output_dir,
        resume=spec.resume,
        on_log=on_log if rank == 0 else None,
        num_clusters=num_clusters,
    )
    payload = result.to_json_dict()
    payload["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        atomic_write_json(payload, output_dir / RESULT_NAME)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="path of the run spec JSON")
    # deepspeed's launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    run(load_spec(args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
