"""The long-running stages that `tests/pipeline/test_faults.py` kills and re-runs, each a function of a JSON spec so
that the same call runs in the test process and in a child process (`tests.fault_injection`).

Imports are inside the functions: the child process loads only what its stage needs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np


class HashEncoder:
    """A deterministic encoder with the `Embedder` interface (unit vectors from a hash of each text).

    The embedding stage is killed for its sharding and resume logic, which does not depend on the model; this
    keeps the child process free of the sentence-transformers import.
    """

    def __init__(self, dimension: int = 16) -> None:
        from moce_model.clustering.embedding import EmbedderSpec

        self.spec = EmbedderSpec(model="hash-test-encoder")
        self.dimension = dimension
        self.name = self.spec.model

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        rows = []
        for text in texts:
            digest = hashlib.sha256(text.encode()).digest()
            rows.append(np.frombuffer(digest[: self.dimension], dtype=np.uint8).astype(np.float32) + 1.0)
        vectors = np.stack(rows)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def stage_texts(rows: int) -> tuple[list[str], list[str]]:
    texts = [f"Instruction number {i}: add {i} and {2 * i}." for i in range(rows)]
    return [f"id{i:04d}" for i in range(rows)], texts


def embed(spec: dict[str, Any]) -> dict[str, Any]:
    from moce_model.clustering.embedding import embed_to_parquet_shards

    ids, texts = stage_texts(spec["rows"])
    encoder = HashEncoder(spec["dimension"])
    return embed_to_parquet_shards(ids, texts, encoder, spec["out"], shard_rows=spec["shard_rows"])


def train(spec: dict[str, Any]) -> dict[str, Any]:
    from moce_model.training.entry import load_spec, run

    return run(load_spec(spec["run_spec"]))


def merge(spec: dict[str, Any]) -> Path:
    from moce_model.merging import merge_to_directory
    from moce_model.model.adapters import load_trained

    return merge_to_directory(
        load_trained(spec["adapter"], spec["base"]),
        spec["out"],
        centroids=np.load(spec["centroids"], allow_pickle=False),
        embedder=spec["embedder"],
        tokenizer_dir=spec["base"],
    )


# Every call of these is a kill point of the evaluation stage: a batch of generation or of scoring, a batch of
# programs in the sandbox.
EVALUATION_CALLS = (
    "moce_model.evaluation.lm:MoCELM._model_generate",
    "moce_model.evaluation.lm:MoCELM._model_call",
    "moce_model.evaluation.benchmarks:run_sandboxed_many",
)


def evaluate(spec: dict[str, Any]) -> None:
    """What the `benchmark_results` asset does: evaluate, then write the scores and the items atomically."""
    from moce_model.common.io import atomic_write_parquet
    from moce_model.evaluation.runner import evaluate_model
    from moce_model.evaluation.suites import BenchmarkSpec

    benchmarks = [
        BenchmarkSpec(name=f"synthetic_{domain}", kind="synthetic", domain=domain, n_items=2, max_new_tokens=12)
        for domain in ("arithmetic", "python")
    ]
    result = evaluate_model(spec["model"], "moce", benchmarks, batch_size=2, seed=0, prompt_format="chat_template")
    out = Path(spec["out"])
    atomic_write_parquet(result.table.drop("seconds"), out / "results.parquet")
    atomic_write_parquet(result.items, out / "items.parquet")


def dagster_run(spec: dict[str, Any]) -> None:
    """A Dagster run, executed in this process as `make demo` does, whose one step waits to be killed."""
    import time

    import dagster as dg

    from resources.storage import JsonIOManager

    @dg.asset(io_manager_key="json_io_manager")
    def waits_to_be_killed() -> int:
        Path(spec["started"]).write_text("started")
        time.sleep(300)
        return 1

    with dg.DagsterInstance.from_config(spec["home"]) as instance:
        dg.materialize([waits_to_be_killed], instance=instance,
                       resources={"json_io_manager": JsonIOManager(base_dir=spec["refs"])})
