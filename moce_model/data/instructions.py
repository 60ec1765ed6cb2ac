"""The normalised union of all sources, with every invalid row kept aside with its reason.

``len(input) == len(instructions) + len(rejected)`` always holds; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import polars as pl

# Defined with the prompt formats, which read a request back out of a prompt, so that the model's own code needs no
# polars; kept importable here, next to the columns it reads.
from moce_model.data.prompt_format import routing_text  # noqa: F401

INSTRUCTION_COLUMNS: tuple[str, ...] = ("id", "source", "system", "instruction", "input", "response", "domain", "n_chars")
# `detail` names where the row came from (file and line, array element or row: the raw frame's `origin`) and
# says more where the reason alone does not: why a line could not be read, the column and type of a
# `wrong_type` value, the length of a `too_long` row, where the kept copy of a `duplicate` came from.
REJECTED_COLUMNS: tuple[str, ...] = (*INSTRUCTION_COLUMNS, "reason", "detail")
REJECTION_REASONS: tuple[str, ...] = (
    "malformed_line", "wrong_type", "empty_instruction", "empty_response", "bad_encoding", "too_long", "duplicate"
)
TEXT_FIELDS: tuple[str, ...] = ("system", "instruction", "input", "response")

# U+FFFD marks text that was decoded with replacement; C0 control characters other than tab/newline/CR
# (and DEL) do not belong in instructions and usually mean a binary or mis-decoded file.
_BAD_TEXT_PATTERN = "[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_FIELD_SEPARATOR = "\x1f"
_HASH_CHUNK = 100_000
# Columns of the raw shape that frames built elsewhere (older stored tables, hand-made frames) may lack.
_OPTIONAL_MARKERS = ("problem", "origin", "malformed")


def _blake2b_hex(texts: pl.Series) -> pl.Series:
    # polars' own hash is not stable across versions; ids must be, so they are blake2b digests.
    # The loop is one hashlib call per row in C, chunked to bound memory (about 1 s per million rows).
    out: list[str] = []
    for start in range(0, len(texts), _HASH_CHUNK):
        chunk = texts.slice(start, _HASH_CHUNK).to_list()
        out.extend(hashlib.blake2b(t.encode("utf-8"), digest_size=8).hexdigest() for t in chunk)
    return pl.Series("id", out, dtype=pl.String)


def content_id(system: str, instruction: str, input: str, response: str) -> str:
    """The stable id of one instruction (same as the ``id`` column of ``normalise_instructions``)."""
    text = _FIELD_SEPARATOR.join((system, instruction, input, response))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _union(frames: Sequence[pl.DataFrame | pl.LazyFrame]) -> pl.DataFrame:
    if not frames:
        raise ValueError("normalise_instructions: no input frames")
    lazy = [f.lazy() for f in frames]
    for index, frame in enumerate(lazy):
        names = frame.collect_schema().names()
        missing = [c for c in ("instruction", "response", "source") if c not in names]
        if missing:
            raise ValueError(f"normalise_instructions: frame {index} lacks column(s) {missing}; it has {names}")
    columns = [
        *(pl.col(c).cast(pl.String).fill_null("") if c in TEXT_FIELDS else pl.col(c).cast(pl.String)
          for c in (*TEXT_FIELDS, "domain", "source", *_OPTIONAL_MARKERS)),
    ]
    selected = []
    for frame in lazy:
        names = frame.collect_schema().names()
        for optional in ("system", "input", "domain", *_OPTIONAL_MARKERS):
            if optional not in names:
                frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias(optional))
        selected.append(frame.select(columns))
    return pl.concat(selected, how="vertical").collect()


def normalise_instructions(
    frames: Sequence[pl.DataFrame | pl.LazyFrame],
    max_chars: int = 8192,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Union raw frames into ``instructions`` (``INSTRUCTION_COLUMNS``) and ``rejected`` (+ ``reason``).

    A row's reason is the first that applies, in the order of ``REJECTION_REASONS``; of several identical
    valid rows the first is kept and the others are ``duplicate``. A raw row marked ``malformed`` (a line that
    could not be read as a row) is ``malformed_line``; one with a ``problem`` (a mapped value that was not
    text, see `moce_model.data.sources`) is ``wrong_type``, with the problem as its ``detail``. Every other
    rejected row's ``detail`` starts with its ``origin`` (file and line or row) where the raw frame has one.
    Columns such as ``answer`` and ``test_code`` are eval-only and are not carried into either output.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    raw = _union(frames)
    joined = pl.concat_str([pl.col(c) for c in TEXT_FIELDS], separator=_FIELD_SEPARATOR)
    with_text = raw.with_columns(
        (pl.col("system").str.len_chars() + pl.col("instruction").str.len_chars()
         + pl.col("input").str.len_chars() + pl.col("response").str.len_chars()).cast(pl.Int64).alias("n_chars"),
    )
    ids = _blake2b_hex(with_text.select(joined).to_series())
    bad_encoding = pl.any_horizontal([pl.col(c).str.contains(_BAD_TEXT_PATTERN) for c in TEXT_FIELDS])
    reason = (
        pl.when(pl.col("malformed").is_not_null()).then(pl.lit("malformed_line"))
        .when(pl.col("problem").is_not_null()).then(pl.lit("wrong_type"))
        .when(pl.col("instruction").str.strip_chars() == "").then(pl.lit("empty_instruction"))
        .when(pl.col("response").str.strip_chars() == "").then(pl.lit("empty_response"))
        .when(bad_encoding).then(pl.lit("bad_encoding"))
        .when(pl.col("n_chars") > max_chars).then(pl.lit("too_long"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    checked = with_text.with_columns(ids, reason.alias("reason"))
    # Only rows that are otherwise valid compete for an id; the earliest one wins.
    valid = pl.col("reason").is_null()
    repeated = valid & ~pl.when(valid).then(pl.col("id")).is_first_distinct()
    checked = checked.with_columns(
        pl.when(repeated).then(pl.lit("duplicate")).otherwise(pl.col("reason")).alias("reason"),
        pl.col("origin").filter(valid).first().over("id").alias("kept_origin"),
    )
    checked = checked.with_columns(_detail(max_chars).alias("detail"))
    instructions = checked.filter(pl.col("reason").is_null()).select(INSTRUCTION_COLUMNS)
    rejected = checked.filter(pl.col("reason").is_not_null()).select(REJECTED_COLUMNS)
    assert instructions.height + rejected.height == raw.height
    return instructions, rejected


def _detail(max_chars: int) -> pl.Expr:
    reason = pl.col("reason")
    said = (
        pl.when(reason == "malformed_line").then(pl.col("malformed"))
        .when(reason == "too_long").then(pl.format(f"{{}} characters, more than max_chars {max_chars}", "n_chars"))
        .when(reason == "duplicate").then(pl.lit("duplicate of ") + pl.col("kept_origin"))
    )
    detail = pl.concat_str([pl.col("origin"), said], separator=": ", ignore_nulls=True)
    return (
        pl.when(reason == "wrong_type").then(pl.col("problem"))  # already names the file, row and column
        .when(reason.is_null() | (detail == "")).then(pl.lit(None, dtype=pl.String))
        .otherwise(detail)
    )


def rejection_counts(rejected: pl.DataFrame) -> pl.DataFrame:
    """Rows per (source, reason), for metadata."""
    return rejected.group_by("source", "reason").len("n").sort("source", "reason")


def source_counts(instructions: pl.DataFrame, rejected: pl.DataFrame) -> pl.DataFrame:
    """Per source: rows kept, rows rejected and rows read."""
    kept = instructions.group_by("source").len("kept")
    dropped = rejected.group_by("source").len("rejected")
    return (
        kept.join(dropped, on="source", how="full", coalesce=True)
        .with_columns(pl.col("kept").fill_null(0), pl.col("rejected").fill_null(0))
        .with_columns((pl.col("kept") + pl.col("rejected")).alias("total"))
        .sort("source")
    )
