"""Instruction sources: where raw rows come from, and how their fields map onto the raw shape.

Every loader returns a polars frame in the *raw* shape::

    system, instruction, input, response (String, never null), domain (String, nullable), source (String),
    problem (String, nullable)

(the synthetic source also carries its eval-only ``answer`` and ``test_code`` columns). Specs are plain data
(``SourceSpec.from_dict``) and are validated, and their files' schemas checked, before any row is loaded,
so a bad spec fails with a message naming the file, field and value, before anything is written.

A mapped field must hold text. A row whose mapped value is a number, list, object or boolean is kept (with the
value's JSON spelling, so nothing is lost) and ``problem`` says where and what; `normalise_instructions`
rejects such rows as ``wrong_type`` instead of training on stringified values. Local files are read by
content: Parquet by its magic bytes; JSON as an array of objects or as JSON Lines, told apart by the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from moce_model.data.synthetic import generate_synthetic

SourceKind = Literal["hf", "local", "synthetic"]
SOURCE_KINDS: tuple[str, ...] = ("hf", "local", "synthetic")
# `problem`: why a row cannot be used as read (a mapped value that is not text), null when it can.
PROBLEM_COLUMN = "problem"
# The JSON reader's problems travel under a name no dataset uses until the raw shape is built: `problem` is a
# data column of real datasets (Magicoder-OSS-Instruct's instruction).
_READ_PROBLEMS = "__moce_read_problems__"
RAW_COLUMNS: tuple[str, ...] = ("system", "instruction", "input", "response", "domain", "source", PROBLEM_COLUMN)
MAPPABLE_FIELDS: tuple[str, ...] = ("system", "instruction", "input", "response", "domain")
REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "response")
LOCAL_FORMATS: tuple[str, ...] = ("json", "jsonl", "parquet")

# Field mappings of the paper's datasets. ``conversations`` names a ShareGPT-style column
# (a list of {from: system|human|gpt, value}) instead of a plain mapping.
HF_PRESETS: dict[str, dict[str, Any]] = {
    "Open-Orca/SlimOrca": {"conversations": "conversations", "domain": "general"},
    "meta-math/MetaMathQA": {"mapping": {"instruction": "query", "response": "response"}, "domain": "math"},
    "ise-uiuc/Magicoder-OSS-Instruct-75K": {"mapping": {"instruction": "problem", "response": "solution"}, "domain": "code"},
    "ise-uiuc/Magicoder-Evol-Instruct-110K": {"mapping": {"instruction": "instruction", "response": "response"}, "domain": "code"},
}

# Accepted spellings of spec keys (``fields`` reads better in a profile, ``dataset`` for HF ids).
_KEY_ALIASES = {"fields": "mapping", "dataset": "path"}
# For hf sources, these ``format`` values mean: a ShareGPT ``conversations`` column.
_CONVERSATION_FORMATS = ("slimorca", "sharegpt", "conversations")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class SourceSpec:
    """One instruction source.

    ``path`` is a dataset id or builder name for ``hf`` (e.g. ``"meta-math/MetaMathQA"`` or ``"json"`` with
    ``data_files``), a file for ``local``, unused for ``synthetic``. ``mapping`` maps raw fields
    (system/instruction/input/response/domain) to the source's column names. ``domain`` is a fixed label
    for every row (a mapped ``domain`` column wins where it is not null).

    ``mirror`` (hf only): a local copy of the dataset ``path`` names, read by ``datasets`` instead of the Hub
    with ``path``'s built-in mapping: a directory as ``huggingface-cli download --repo-type dataset`` leaves
    it (its data files, or the configs its README declares), or one JSON/JSONL/Parquet file.
    """

    name: str
    kind: SourceKind
    path: str = ""
    split: str = "train"
    mapping: dict[str, str] = field(default_factory=dict)
    conversations: str | None = None
    max_rows: int | None = None
    seed: int = 0
    domain: str | None = None
    format: str | None = None
    data_files: str | list[str] | None = None
    config_name: str | None = None
    streaming: bool = False
    n_per_domain: int = 150
    mirror: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SourceSpec:
        spec = cls(**cls.normalised(raw))
        spec.validate()
        return spec

    @classmethod
    def normalised(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The spec's keys with aliases replaced and an HF dataset's built-in mapping filled in; unknown keys,
        a bad name or kind are errors. The values' types are checked where the spec is built."""
        raw = dict(raw)
        for alias, key in _KEY_ALIASES.items():
            if alias in raw:
                if key in raw and raw[key] != raw[alias]:
                    raise ValueError(f"source {raw.get('name')!r}: both {alias!r} and {key!r} given; use {key!r}")
                raw[key] = raw.pop(alias)
        if raw.get("kind") == "hf" and raw.get("format") in _CONVERSATION_FORMATS:
            raw.pop("format")
            raw.setdefault("conversations", "conversations")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"source spec {raw!r}: 'name' must be a non-empty string")
        if not _NAME_PATTERN.fullmatch(name):
            raise ValueError(f"source {name!r}: name must match {_NAME_PATTERN.pattern} (it becomes an asset name)")
        unknown_keys = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown_keys:
            raise ValueError(
                f"source {name!r}: unknown key(s) {unknown_keys}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        kind = raw.get("kind")
        if kind not in SOURCE_KINDS:
            raise ValueError(f"source {name!r}: unknown kind {kind!r}; expected one of {list(SOURCE_KINDS)}")
        if kind == "hf" and not raw.get("mapping") and not raw.get("conversations"):
            preset = HF_PRESETS.get(str(raw.get("path", "")))
            if preset is None:
                raise ValueError(
                    f"source {name!r}: hf dataset {raw.get('path')!r} has no built-in field mapping; give "
                    f"'mapping' (or 'conversations'). Built-in: {sorted(HF_PRESETS)}"
                )
            raw = {**preset, **raw}
        elif kind == "hf" and raw.get("domain") is None and str(raw.get("path", "")) in HF_PRESETS:
            raw["domain"] = HF_PRESETS[str(raw["path"])]["domain"]
        return raw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, check_files: bool = True) -> None:
        """`check_files=False` leaves a local file's existence to loading time (an experiment file may name
        data that only the machine running it has)."""
        where = f"source {self.name!r}"
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; expected one of {list(SOURCE_KINDS)}")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise ValueError(f"{where}: max_rows must be a positive integer or None, got {self.max_rows!r}")
        bad_fields = sorted(set(self.mapping) - set(MAPPABLE_FIELDS))
        if bad_fields:
            raise ValueError(f"{where}: mapping has unknown field(s) {bad_fields}; allowed: {list(MAPPABLE_FIELDS)}")
        for target, column in self.mapping.items():
            if not isinstance(column, str) or not column:
                raise ValueError(f"{where}: mapping[{target!r}] must be a column name, got {column!r}")
        if self.kind == "synthetic":
            if self.n_per_domain < 1:
                raise ValueError(f"{where}: n_per_domain must be >= 1, got {self.n_per_domain}")
            return
        if not self.path:
            raise ValueError(f"{where}: 'path' is required for kind {self.kind!r}")
        if self.conversations is None:
            missing = [f for f in REQUIRED_FIELDS if f not in self.mapping]
            if missing:
                raise ValueError(
                    f"{where}: mapping lacks required field(s) {missing} (file/dataset {self.path!r}); "
                    f"mapping given: {self.mapping}"
                )
        if self.mirror is not None:
            if self.kind != "hf":
                raise ValueError(f"{where}: 'mirror' is a local copy of an hf dataset; kind {self.kind!r} has none")
            if check_files and not Path(self.mirror).exists():
                raise ValueError(f"{where}: mirror of {self.path!r} not found: {self.mirror}")
            if check_files and Path(self.mirror).is_file() and _mirror_builder(self.mirror) is None:
                raise ValueError(
                    f"{where}: mirror file {self.mirror} is not .json, .jsonl or .parquet; "
                    f"give one of those or the dataset's directory"
                )
        if self.kind == "hf" and self.format is not None:
            raise ValueError(
                f"{where}: 'format' {self.format!r} is not used by hf sources (only {list(_CONVERSATION_FORMATS)} "
                f"meaning a conversations column)"
            )
        if self.kind == "local":
            if self.format is not None and self.format not in LOCAL_FORMATS:
                raise ValueError(f"{where}: unknown format {self.format!r}; expected one of {list(LOCAL_FORMATS)}")
            if check_files and not Path(self.path).is_file():
                raise ValueError(f"{where}: file not found: {self.path}")


# ---------------------------------------------------------------------------------------------- local files

_PARQUET_MAGIC = b"PAR1"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _local_format(spec: SourceSpec) -> str:
    """``parquet`` or ``json`` (a JSON array, JSON Lines or one object: told apart by `_json_records`).

    Decided by the content, not the suffix: a Parquet file starts with its magic bytes, JSON with ``[`` or ``{``.
    An explicit ``format`` wins; ``json`` and ``jsonl`` both mean "JSON text, layout read from the content".
    """
    if spec.format:
        return "parquet" if spec.format == "parquet" else "json"
    with open(spec.path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if first in (b"[", b"{"):
        return "json"
    raise ValueError(
        f"source {spec.name!r}: cannot tell the format of {spec.path}: it is not Parquet (no PAR1 magic) and not "
        f"JSON (it starts with {first.decode('latin-1')!r}, not '[' or '{{'); set 'format' to one of "
        f"{list(LOCAL_FORMATS)}"
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    return "string"


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _read_utf8(spec: SourceSpec) -> str:
    data = Path(spec.path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"source {spec.name!r}: {spec.path} is not valid UTF-8: line {line}, byte offset {err.start} ({err.reason})"
        ) from err
    return text.removeprefix("\ufeff")


def _lists_of_objects(document: dict[str, Any]) -> str:
    keys = [key for key, value in document.items()
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)]
    if not keys:
        return ""
    return "; the rows may be the list in " + ", ".join(f"{key!r} ({len(document[key])} object(s))" for key in keys)


def _json_records(spec: SourceSpec) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """Rows of a JSON file as (location, object) pairs, and the layout found: ``JSON array`` or ``JSON Lines``.

    The layout is read from the content: ``[`` starts a JSON array of objects; otherwise every non-empty line
    must be one object (JSON Lines). One object spread over several lines (a pretty-printed document, often
    ``{"data": [...]}``) is not a list of rows and is refused with its keys named, rather than read as one row.
    """
    text = _read_utf8(spec)
    where = f"source {spec.name!r}: {spec.path}"
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where}: detected a JSON array (it starts with '['), but it is not valid JSON: "
                f"line {err.lineno}, column {err.colno}: {err.msg}"
            ) from err
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(
                    f"{where}: detected a JSON array; element {index} is {_a(_json_kind(row))}, expected an object"
                )
        if spec.max_rows is not None:
            data = data[: spec.max_rows]
        return [(f"element {index}", row) for index, row in enumerate(data)], "JSON array"

    # JSON Lines. Split on "\n" only: str.splitlines would also split inside strings holding U+2028 and the like.
    lines = text.split("\n")
    records: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if not records:
                raise _not_json_lines(where, text, number, err) from err
            raise ValueError(
                f"{where}: detected JSON Lines (one object per line); line {number}: invalid JSON "
                f"({err.msg} at column {err.colno})"
            ) from err
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: detected JSON Lines (one object per line); line {number} is {_a(_json_kind(value))}, "
                f"expected an object"
            )
        records.append((f"line {number}", value))
        if spec.max_rows is not None and len(records) >= spec.max_rows:
            break
    return records, "JSON Lines"


def _not_json_lines(where: str, text: str, number: int, line_error: json.JSONDecodeError) -> ValueError:
    """The first line is not a JSON object: say whether the file is one multi-line JSON document instead."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        return ValueError(
            f"{where}: neither JSON Lines (line {number}: {line_error.msg} at column {line_error.colno}) nor one "
            f"JSON document (line {err.lineno}, column {err.colno}: {err.msg})"
        )
    keys = list(document)[:10] if isinstance(document, dict) else []
    return ValueError(
        f"{where}: detected a single JSON {_json_kind(document)} spread over several lines (keys {keys}), not rows: "
        f"expected a JSON array of objects or JSON Lines (one object per line)"
        f"{_lists_of_objects(document) if isinstance(document, dict) else ''}"
    )


def _as_text(value: str) -> str:
    # JSON may escape lone surrogates, which UTF-8 cannot hold: mark them with U+FFFD so that the row is
    # rejected as bad_encoding later instead of failing the whole file here.
    return _LONE_SURROGATE.sub("\ufffd", value)


def _read_json_rows(spec: SourceSpec) -> pl.DataFrame:
    """The columns the spec maps, as text, plus ``problem``: where a mapped value was not text.

    A value that is not a string (a number, list, object or boolean) is never turned into training text: the
    row keeps its JSON spelling, so the rejected row shows what was there, and ``problem`` names the file,
    line (or array element), column and type; `normalise_instructions` rejects it as ``wrong_type``.
    """
    records, layout = _json_records(spec)
    if not records:
        raise _empty_dataset(spec)
    available = list(dict.fromkeys(key for _, row in records for key in row))
    wanted = {column: target for target, column in spec.mapping.items()}
    for target, column in spec.mapping.items():
        if column not in available:
            if len(records) == 1 and _lists_of_objects(records[0][1]):
                # One line, one object, without the mapped columns but holding a list of objects: a JSON
                # document wrapping the rows (``{"data": [...]}``), not a one-row JSON Lines file.
                raise ValueError(
                    f"source {spec.name!r}: {spec.path}: detected a single JSON object (keys {available[:10]}) "
                    f"without the mapped column {column!r}, not rows: expected a JSON array of objects or JSON "
                    f"Lines (one object per line){_lists_of_objects(records[0][1])}"
                )
            raise ValueError(
                f"source {spec.name!r}: mapped field {target!r} -> column {column!r} not found in {spec.path} "
                f"({layout}); available columns: {available}"
            )
    if spec.conversations is not None and spec.conversations not in available:
        raise ValueError(
            f"source {spec.name!r}: conversations column {spec.conversations!r} not found in {spec.path} "
            f"({layout}); available columns: {available}"
        )
    texts: dict[str, list[str | None]] = {column: [] for column in wanted}
    problems: list[str | None] = []
    for location, row in records:
        found = []
        for column, target in wanted.items():
            value = row.get(column)
            if value is None or isinstance(value, str):
                texts[column].append(None if value is None else _as_text(value))
                continue
            texts[column].append(_as_text(json.dumps(value, ensure_ascii=False)))
            found.append(
                f"{spec.path} {location}: column {column!r} (mapped to {target!r}) holds {_a(_json_kind(value))}, "
                f"expected text"
            )
        problems.append("; ".join(found) if found else None)
    columns = {column: pl.Series(column, values, dtype=pl.String) for column, values in texts.items()}
    if spec.conversations is not None:
        try:
            turns = [row.get(spec.conversations) for _, row in records]
            columns[spec.conversations] = pl.Series(spec.conversations, turns)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as err:
            raise ValueError(
                f"source {spec.name!r}: conversations column {spec.conversations!r} in {spec.path} is not a list of "
                f"{{from, value}} objects in every row: {err}"
            ) from err
    columns[_READ_PROBLEMS] = pl.Series(_READ_PROBLEMS, problems, dtype=pl.String)
    return pl.DataFrame(columns)


def _empty_dataset(spec: SourceSpec) -> ValueError:
    return ValueError(f"source {spec.name!r}: {spec.path or spec.kind} yielded no rows (empty dataset)")


def _scan_local(spec: SourceSpec) -> pl.LazyFrame:
    with open(spec.path, "rb") as fh:
        if not fh.read(4096).strip():
            raise _empty_dataset(spec)
    if _local_format(spec) == "json":
        return _read_json_rows(spec).lazy()
    try:
        frame = pl.scan_parquet(spec.path)
        frame.collect_schema()
    except Exception as err:  # polars raises several error types for unreadable files
        raise ValueError(f"source {spec.name!r}: malformed Parquet file {spec.path}: {err}") from err
    if spec.max_rows is not None:
        frame = frame.head(spec.max_rows)
    return frame


# ---------------------------------------------------------------------------------------------- HF datasets


def _mirror_builder(path: str) -> str | None:
    """The `datasets` builder of one mirrored data file, by its suffix (None: not a data file)."""
    suffix = Path(path).suffix.lower()
    return {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)


def _load_hf_arrow(spec: SourceSpec):  # -> pyarrow.Table
    import datasets
    import pyarrow as pa

    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.config_name:
        kwargs["name"] = spec.config_name
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    location = spec.path
    if spec.mirror is not None:
        # The same loader as for the Hub, pointed at the local copy: a directory is read as `datasets` reads a
        # dataset repository (README configs, else its data files); a single file through its builder.
        location = spec.mirror
        if Path(spec.mirror).is_file():
            location = _mirror_builder(spec.mirror) or spec.mirror
            kwargs["data_files"] = {spec.split: spec.mirror}
    try:
        if spec.streaming:
            stream = datasets.load_dataset(location, streaming=True, **kwargs)
            if spec.max_rows is not None:
                stream = stream.take(spec.max_rows)
            batches = list(stream.with_format("arrow").iter(batch_size=10_000))
            if not batches:
                return pa.table({})
            return pa.concat_tables(batches)
        dataset = datasets.load_dataset(location, **kwargs)
    except Exception as err:
        raise ValueError(
            f"source {spec.name!r}: cannot load hf dataset {spec.path!r} (split {spec.split!r}"
            f"{', mirror ' + repr(spec.mirror) if spec.mirror else ''}"
            f"{', data_files ' + repr(spec.data_files) if spec.data_files else ''}): {type(err).__name__}: {err}"
        ) from err
    formatted = dataset.with_format("arrow")
    stop = len(dataset) if spec.max_rows is None else min(spec.max_rows, len(dataset))
    return formatted[:stop]


def _scan_hf(spec: SourceSpec) -> pl.LazyFrame:
    table = _load_hf_arrow(spec)
    table = table.replace_schema_metadata(None)
    return pl.from_arrow(table).lazy()  # type: ignore[union-attr]


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
    where = spec.path or spec.name
    problem = pl.when(expr.is_not_null()).then(
        pl.format(
            f"{where} row {{}}: column {column!r} (mapped to {target!r}) holds {_a(_describe_dtype(dtype))}, "
            f"expected text",
            pl.int_range(pl.len()),
        )
    )
    return pl.when(expr.is_not_null()).then(encoded).otherwise(pl.lit(None, dtype=pl.String)), problem


def _to_raw_shape(spec: SourceSpec, frame: pl.LazyFrame) -> pl.LazyFrame:
    schema = frame.collect_schema()
    available = [name for name in schema.names() if name != _READ_PROBLEMS]
    where = spec.path or spec.name
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
    problems: list[pl.Expr] = [pl.col(_READ_PROBLEMS)] if _READ_PROBLEMS in schema else []
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
            pl.lit(spec.name, dtype=pl.String).alias("source"), pl.lit(None, dtype=pl.String).alias(PROBLEM_COLUMN)
        ).select(*RAW_COLUMNS, "answer", "test_code").lazy()
    frame = _scan_local(spec) if spec.kind == "local" else _scan_hf(spec)
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
        raise _empty_dataset(spec)
    return frame
