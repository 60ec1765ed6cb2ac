"""Sentence embeddings of the *input side* of instructions, written as resumable Parquet shards.

Only system + instruction + input are embedded (`moce_model.data.instructions.routing_text`), never the response: at
inference time the router sees only the prompt, so the clusters must be defined on what the prompt looks like.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from moce_model.clustering.encoder import (  # noqa: F401  the encoder's names, re-exported for this module's callers
    DEFAULT_INSTRUCTOR_INSTRUCTION,
    E5_QUERY_PREFIX,
    EMBEDDER_KINDS,
    Embedder,
    EmbedderKind,
    EmbedderSpec,
    l2_normalise,
    load_embedder,
    resolve_model_path,
)
from moce_model.common.io import (
    atomic_write_arrow_parquet,
    atomic_write_json,
    read_json,
)
from moce_model.data.instructions import routing_text

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.parquet"


# ------------------------------------------------------------------------------------------- input side text


def routing_texts(instructions: pl.DataFrame) -> pl.Series:
    """`routing_text` of every row of a frame with `system`, `instruction` and `input` columns (nulls allowed).

    Each row goes through the one Python function that also builds the routing text of training rows,
    prompts and benchmark items (about a second per million rows), so the texts cannot drift apart.
    """
    missing = [c for c in ("system", "instruction", "input") if c not in instructions.columns]
    if missing:
        raise ValueError(f"routing_texts: the frame lacks column(s) {missing}; it has {instructions.columns}")
    rows = instructions.select("system", "instruction", "input").iter_rows()
    return pl.Series("text", [routing_text(*row) for row in rows], dtype=pl.String)


# ------------------------------------------------------------------------------------------- sharded output


def _ids_digest(ids: Sequence[str]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for value in ids:
        digest.update(value.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


UNIT_NORM_TOLERANCE = 1e-3


def bad_embedding_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the rows of (n, d) embeddings that are not finite, and of the finite rows that are not
    unit norm within `UNIT_NORM_TOLERANCE`."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    return ~finite, finite & (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)


def embedding_value_problem(vectors: np.ndarray, ids: Sequence[str] | None = None) -> str | None:
    """Why (n, d) embeddings are unusable: rows not finite, or not unit norm within `UNIT_NORM_TOLERANCE`.

    None when every row is fine; otherwise the count and the first few offending rows (by id where given).
    """
    not_finite, off_norm = bad_embedding_rows(vectors)
    problems = []
    kinds = ((not_finite, "not finite (NaN or inf)"), (off_norm, f"not unit norm (|norm - 1| > {UNIT_NORM_TOLERANCE})"))
    for mask, what in kinds:
        rows = np.flatnonzero(mask)
        if len(rows):
            named = [ids[i] for i in rows[:5]] if ids is not None else rows[:5].tolist()
            label = "ids" if ids is not None else "rows"
            problems.append(f"{len(rows)} row(s) {what}, {label} {named}{' ...' if len(rows) > 5 else ''}")
    return "; ".join(problems) or None


def _shard_problem(path: Path, expected_ids: list[str], dimension: int) -> str | None:
    """Why a finished shard cannot be reused, or None. Checks the ids, the type and the values themselves."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        return "missing"
    try:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows != len(expected_ids):
            return f"{parquet.metadata.num_rows} rows, expected {len(expected_ids)}"
        embedding_type = parquet.schema_arrow.field("embedding").type
        if not (pa.types.is_fixed_size_list(embedding_type) and embedding_type.list_size == dimension):
            return f"embedding type {embedding_type}, expected fixed_size_list<float>[{dimension}]"
        table = parquet.read(columns=["id", "embedding"])
        if table.column("id").to_pylist() != expected_ids:
            return "ids differ from this shard's instructions"
        values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    except Exception as error:  # pyarrow raises several error types for unreadable files
        return f"unreadable ({type(error).__name__}: {error})"
    return embedding_value_problem(np.asarray(values, dtype=np.float32).reshape(-1, dimension), expected_ids)


def _texts_slice(texts: pl.Series | pl.LazyFrame | Sequence[str], start: int, stop: int) -> list[str]:
    if isinstance(texts, pl.LazyFrame):
        return texts.slice(start, stop - start).collect().to_series(0).to_list()
    if isinstance(texts, pl.Series):
        return texts.slice(start, stop - start).to_list()
    return list(texts[start:stop])


def _texts_len(texts: pl.Series | pl.LazyFrame | Sequence[str]) -> int:
    if isinstance(texts, pl.LazyFrame):
        return int(texts.select(pl.len()).collect().item())
    return len(texts)


def embed_to_parquet_shards(
    ids: pl.Series | Sequence[str],
    texts: pl.Series | pl.LazyFrame | Sequence[str],
    embedder: Embedder,
    out_dir: str | os.PathLike[str],
    shard_rows: int = 2048,
    batch_size: int = 64,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Embed ``texts`` into ``out_dir/shard-00000.parquet ...`` (columns ``id``, ``embedding``), resumably.

    ``texts`` is a Series, a list, or a one-column LazyFrame (sliced per shard, so all texts need not be in
    memory at once). Shards are written atomically and recorded in ``manifest.json``; a re-run skips every
    shard that already holds exactly its ids with finite, unit-norm vectors of the right dimension, so a killed
    run resumes from the last finished shard, and a damaged shard is embedded again (and logged).
    Returns a summary (rows, dimension, shards, shards_reused, shards_written, seconds).

    Long: resuming, repairing and the shard loop of one long job together, so that a killed run resumes from its last complete shard.
    """
    import pyarrow as pa

    say = log or (lambda message: None)
    id_list = ids.to_list() if isinstance(ids, pl.Series) else list(ids)
    n_rows = len(id_list)
    if n_rows == 0:
        raise ValueError("embed_to_parquet_shards: no rows to embed")
    if _texts_len(texts) != n_rows:
        raise ValueError(f"embed_to_parquet_shards: {n_rows} ids but {_texts_len(texts)} texts")
    if len(set(id_list)) != n_rows:
        raise ValueError("embed_to_parquet_shards: ids are not unique")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    plan = {
        "embedder": embedder.spec.to_dict(),
        "dimension": embedder.dimension,
        "rows": n_rows,
        "shard_rows": shard_rows,
        "ids_digest": _ids_digest(id_list),
    }
    n_shards = (n_rows + shard_rows - 1) // shard_rows
    if manifest_path.exists():
        previous = read_json(manifest_path)
        if {key: previous.get(key) for key in plan} != plan:
            say(f"{out}: existing shards were made for other ids/embedder/shard size; starting over")
            for stale in out.glob("shard-*.parquet"):
                stale.unlink()
    atomic_write_json({**plan, "complete": False, "shards": []}, manifest_path)

    started = time.perf_counter()
    reused = written = repaired = 0
    embedded_rows = 0
    shards: list[dict[str, Any]] = []
    for index in range(n_shards):
        start, stop = index * shard_rows, min((index + 1) * shard_rows, n_rows)
        shard_ids = id_list[start:stop]
        path = out / SHARD_PATTERN.format(index=index)
        shards.append({"file": path.name, "rows": stop - start})
        problem = _shard_problem(path, shard_ids, embedder.dimension)
        if problem is None:
            reused += 1
            continue
        if problem != "missing":
            repaired += 1
            say(f"{path.name}: {problem}; embedding it again")
        vectors = embedder.encode(_texts_slice(texts, start, stop), batch_size=batch_size)
        if vectors.shape != (stop - start, embedder.dimension):
            raise RuntimeError(f"encoder returned shape {vectors.shape} for shard {index} ({stop - start} texts)")
        bad_values = embedding_value_problem(np.asarray(vectors, dtype=np.float32), shard_ids)
        if bad_values is not None:
            raise RuntimeError(f"encoder output for shard {index} is unusable: {bad_values}")
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        table = pa.table({
            "id": pa.array(shard_ids, type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, embedder.dimension),
        })
        atomic_write_arrow_parquet(table, path, compression="none")
        written += 1
        embedded_rows += stop - start
        elapsed = time.perf_counter() - started
        say(
            f"embedded shard {index + 1}/{n_shards} ({stop} of {n_rows} rows, "
            f"{embedded_rows / max(elapsed, 1e-9):.0f} rows/s)"
        )
    for extra in out.glob("shard-*.parquet"):
        if extra.name not in {s["file"] for s in shards}:
            extra.unlink()
    seconds = time.perf_counter() - started
    summary = {
        **plan,
        "complete": True,
        "shards": n_shards,
        "shards_reused": reused,
        "shards_written": written,
        "shards_repaired": repaired,
        "rows_embedded": embedded_rows,
        "seconds": round(seconds, 3),
    }
    atomic_write_json({**summary, "shards": shards}, manifest_path)
    if reused:
        say(f"reused {reused} finished shard(s) of {n_shards}")
    return summary
