"""instructions → instruction_embeddings (sharded Parquet, resumable)."""


import hashlib
import json
import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import HEAVY_STEP_TAG, artifact_metadata
from resources.embedder import EmbedderResource
from resources.refs import EmbeddingsRef
from resources.storage import ArtifactStorage

EMBEDDING_CODE_VERSION = "1"


def _fingerprint(ids: pl.Series, spec: dict) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for value in ids.to_list():
        digest.update(value.encode())
    return digest.hexdigest()


@dg.asset(
    group_name="embedding",
    kinds={"sentence_transformers", "parquet"},
    op_tags=HEAVY_STEP_TAG,
    code_version=EMBEDDING_CODE_VERSION,
    io_manager_key="json_io_manager",
    description=(
        "L2-normalised float32 embedding of the input side (system + instruction + input, never the response) "
        "of every instruction, written in Parquet shards; a killed run resumes from the last finished shard."
    ),
)
def instruction_embeddings(
    context: dg.AssetExecutionContext,
    instructions: pl.LazyFrame,
    embedder: EmbedderResource,
    storage: ArtifactStorage,
) -> dg.Output[EmbeddingsRef]:
    from moce_model.clustering.embedding import embed_to_parquet_shards, routing_texts

    rows = instructions.select("id", "system", "instruction", "input").collect()
    frame = rows.select("id").with_columns(routing_texts(rows))
    spec = embedder.spec()
    out_dir = storage.path_for(context.asset_key) / _fingerprint(frame["id"], spec)
    started = time.perf_counter()
    model = embedder.load()
    try:
        summary = embed_to_parquet_shards(
            ids=frame["id"],
            texts=frame["text"],
            embedder=model,
            out_dir=out_dir,
            shard_rows=embedder.shard_rows,
            batch_size=embedder.batch_size,
            log=context.log.info,
        )
    finally:
        model.close()
    seconds = time.perf_counter() - started
    return dg.Output(
        EmbeddingsRef(path=str(out_dir), rows=frame.height, dimension=model.dimension, embedder=spec),
        metadata={
            **artifact_metadata(out_dir),
            "rows": frame.height,
            "dimension": model.dimension,
            "embedder": dg.MetadataValue.json(spec),
            "shards": summary.get("shards") if isinstance(summary, dict) else None,
            "shards_reused": summary.get("shards_reused") if isinstance(summary, dict) else None,
            "shards_repaired": summary.get("shards_repaired") if isinstance(summary, dict) else None,
            "seconds": round(seconds, 2),
            "rows_per_second": round(frame.height / max(seconds, 1e-9), 1),
        },
    )


@dg.asset_check(
    asset=instruction_embeddings,
    additional_ins={"instructions": dg.AssetIn()},
    description="Embeddings are finite, non-zero and unit-norm; every instruction has exactly one.",
    blocking=True,
)
def embeddings_are_unit_norm_and_complete(
    instruction_embeddings: EmbeddingsRef, instructions: pl.LazyFrame
) -> dg.AssetCheckResult:
    from moce_model.clustering.embedding import UNIT_NORM_TOLERANCE
    from moce_model.clustering.kmeans import read_embeddings

    # The check reports bad values itself, so it reads them without the loader's own value check.
    ids, vectors = read_embeddings(instruction_embeddings.path, check_values=False)
    norms = np.linalg.norm(vectors, axis=1)
    finite = bool(np.isfinite(vectors).all())
    off_norm = int(np.sum(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE))
    expected = set(instructions.select("id").collect()["id"].to_list())
    present = set(ids.tolist() if hasattr(ids, "tolist") else ids)
    missing = len(expected - present)
    extra = len(present - expected)
    duplicates = len(ids) - len(present)
    return dg.AssetCheckResult(
        passed=finite and off_norm == 0 and missing == 0 and extra == 0 and duplicates == 0,
        metadata={
            "finite": finite,
            "not_unit_norm": off_norm,
            "min_norm": float(norms.min()) if len(norms) else 0.0,
            "instructions_without_embedding": missing,
            "embeddings_without_instruction": extra,
            "duplicate_ids": duplicates,
        },
    )
