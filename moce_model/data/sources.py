"""Instruction sources: where raw rows come from, and how their fields map onto the raw shape.

Every loader returns a polars frame in the *raw* shape (`RAW_COLUMNS`)::

    system, instruction, input, response (String, never null), domain (String, nullable), source (String),
    problem, origin, malformed (String, nullable; origin set for every row this module reads)

(the synthetic source also carries its eval-only ``answer`` and ``test_code`` columns). Specs are plain data
(``SourceSpec.from_dict``, `moce_model.data.source_spec`) and are validated, and their files' schemas checked,
before any row is loaded, so a bad spec fails with a message naming the file, field and value, before anything
is written.

A mapped field must hold text. A row whose mapped value is a number, list, object or boolean is kept (with the
value's JSON spelling, so nothing is lost) and ``problem`` says where and what; `normalise_instructions`
rejects such rows as ``wrong_type`` instead of training on stringified values. Local files are read by
content (`moce_model.data.local_files`): Parquet by its magic bytes; JSON as an array of objects or as JSON
Lines, told apart by the text. A JSON line that cannot be read as a row at all is kept as a row with empty
fields and ``malformed`` saying why (``on_bad_rows``); `normalise_instructions` rejects it as ``malformed_line``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from moce_model.data.hub import scan_hf
from moce_model.data.local_files import (
    READ_COLUMNS,
    READ_LOCATION,
    READ_MALFORMED,
    READ_PROBLEMS,
    a,
    empty_dataset,
    scan_local,
)
from moce_model.data.source_spec import (
    BAD_ROW_POLICIES,
    DEFAULT_MAX_BAD_ROW_SHARE,
    HF_PRESETS,
    LOCAL_FORMATS,
    MALFORMED_COLUMN,
    MAPPABLE_FIELDS,
    ORIGIN_COLUMN,
    PROBLEM_COLUMN,
    RAW_COLUMNS,
    REQUIRED_FIELDS,
    SOURCE_KINDS,
    SourceKind,
    SourceSpec,
)
from moce_model.data.synthetic import generate_synthetic

# The spec and the raw shape are defined in `source_spec`; callers import them from here as before.
__all__ = [
    "BAD_ROW_POLICIES", "DEFAULT_MAX_BAD_ROW_SHARE", "HF_PRESETS", "LOCAL_FORMATS", "MALFORMED_COLUMN",
    "MAPPABLE_FIELDS", "ORIGIN_COLUMN", "PROBLEM_COLUMN", "RAW_COLUMNS", "REQUIRED_FIELDS", "SOURCE_KINDS",
    "SourceKind", "SourceSpec", "load_source", "scan_source",
]


# ------------------------------------------------------------------------------------------------- mapping


def _turn_value(column: str, role: str) -> pl.Expr:
    return (
        pl.col(column)
        .list.eval(pl.element().filter(pl.element().struct.field("from") == role).struct.field("value"))
        .list.first()
    )


_TEXT_DTYPES = (pl.String, pl.Null, pl.Categorical, pl.Enum)


def _describe_dtype(dtype: pl.DataType) -> str:
    if dtype.is_numeric():
        return f"number ({dtype})"
    if dtype == pl.Boolean:
        return "boolean"
    if isinstance(dtype, (pl.List, pl.Array)):
        return f"list ({dtype})"
    if isinstance(dtype, pl.Struct):
        return f"object ({dtype})"
    return str(dtype)


def _as_checked_text(
    spec: SourceSpec, target: str, column: str, expr: pl.Expr, dtype: pl.DataType
) -> tuple[pl.Expr, pl.Expr | None]:
    """The field as text, and (for a column that is not text) the per-row problem of a non-null value.

    A typed column (Parquet, an HF dataset) has one type for every row; where that is not text, each row that
    holds a value is flagged, with the value's JSON spelling kept in the field for the rejected table.
    """
    if isinstance(dtype, _TEXT_DTYPES):
        return expr.cast(pl.String), None
    encoded = (
        pl.struct(expr.alias("v")).struct.json_encode().str.strip_prefix('{"v":').str.strip_suffix("}")
    )
    where = _where(spec)
    problem = pl.when(expr.is_not_null()).then(
        pl.format(
            f"{where} row {{}}: column {column!r} (mapped to {target!r}) holds {a(_describe_dtype(dtype))}, "
            f"expected text",
            pl.int_range(pl.len()),
        )
    )
    return pl.when(expr.is_not_null()).then(encoded).otherwise(pl.lit(None, dtype=pl.String)), problem


def _where(spec: SourceSpec) -> str:
    return spec.path or spec.name


def _to_raw_shape(spec: SourceSpec, frame: pl.LazyFrame) -> pl.LazyFrame:
    schema = frame.collect_schema()
    available = [name for name in schema.names() if name not in READ_COLUMNS]
    where = _where(spec)
    exprs: dict[str, tuple[str, pl.Expr]] = {}
    if spec.conversations is not None:
        if spec.conversations not in schema:
            raise ValueError(
                f"source {spec.name!r}: conversations column {spec.conversations!r} not found in {where}; "
                f"available columns: {available}"
            )
        for target, role in (("system", "system"), ("instruction", "human"), ("response", "gpt")):
            exprs[target] = (spec.conversations, _turn_value(spec.conversations, role))
    for target, column in spec.mapping.items():
        if column not in schema:
            raise ValueError(
                f"source {spec.name!r}: mapped field {target!r} -> column {column!r} not found in {where}; "
                f"available columns: {available}"
            )
        exprs[target] = (column, pl.col(column))
    dtypes = frame.select([expr.alias(target) for target, (_, expr) in exprs.items()]).collect_schema()
    texts: dict[str, pl.Expr] = {}
    problems: list[pl.Expr] = [pl.col(READ_PROBLEMS)] if READ_PROBLEMS in schema else []
    for target, (column, expr) in exprs.items():
        texts[target], problem = _as_checked_text(spec, target, column, expr, dtypes[target])
        if problem is not None:
            problems.append(problem)
    columns = [
        (texts[f] if f in texts else pl.lit(None, dtype=pl.String)).fill_null("").alias(f)
        for f in MAPPABLE_FIELDS if f != "domain"
    ]
    domain_label = pl.lit(spec.domain, dtype=pl.String)
    domain = texts["domain"].fill_null(domain_label) if "domain" in texts else domain_label
    columns.append(domain.alias("domain"))
    columns.append(pl.lit(spec.name, dtype=pl.String).alias("source"))
    problem = pl.concat_str(problems, separator="; ", ignore_nulls=True) if problems else pl.lit(None, dtype=pl.String)
    # concat_str of all-null parts gives "" with ignore_nulls: keep null for rows without a problem.
    columns.append(pl.when(problem == "").then(None).otherwise(problem).cast(pl.String).alias(PROBLEM_COLUMN))
    if READ_LOCATION in schema:
        origin = pl.concat_str(pl.lit(f"{where} "), pl.col(READ_LOCATION))
    else:
        origin = pl.format(f"{where} row {{}}", pl.int_range(pl.len()))
    columns.append(origin.cast(pl.String).alias(ORIGIN_COLUMN))
    malformed = pl.col(READ_MALFORMED) if READ_MALFORMED in schema else pl.lit(None, dtype=pl.String)
    columns.append(malformed.cast(pl.String).alias(MALFORMED_COLUMN))
    return frame.select(columns)


# --------------------------------------------------------------------------------------------------- public


def scan_source(spec: SourceSpec | Mapping[str, Any]) -> pl.LazyFrame:
    """Lazy frame of one source in the raw shape; the file schema is checked here, rows load on collect."""
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec.from_dict(spec)
    spec.validate()
    if spec.kind == "synthetic":
        frame = generate_synthetic(spec.n_per_domain, seed=spec.seed, split="train")
        if spec.max_rows is not None:
            frame = frame.head(spec.max_rows)
        return frame.with_columns(
            pl.lit(spec.name, dtype=pl.String).alias("source"),
            pl.lit(None, dtype=pl.String).alias(PROBLEM_COLUMN),
            pl.format(f"{spec.name} row {{}}", pl.int_range(pl.len())).alias(ORIGIN_COLUMN),
            pl.lit(None, dtype=pl.String).alias(MALFORMED_COLUMN),
        ).select(*RAW_COLUMNS, "answer", "test_code").lazy()
    frame = scan_local(spec) if spec.kind == "local" else scan_hf(spec)
    return _to_raw_shape(spec, frame)


def load_source(spec: SourceSpec | Mapping[str, Any]) -> pl.DataFrame:
    """Load one source in the raw shape; an empty result is an error, not an empty artifact."""
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec.from_dict(spec)
    try:
        frame = scan_source(spec).collect()
    except pl.exceptions.PolarsError as err:
        raise ValueError(f"source {spec.name!r}: cannot read {spec.path or spec.name}: {err}") from err
    if frame.height == 0:
        raise empty_dataset(spec)
    return frame


