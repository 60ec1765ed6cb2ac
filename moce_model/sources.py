"""Instruction sources: where raw rows come from, and how their fields map onto the raw shape.

Every loader returns a polars frame in the *raw* shape::

    system, instruction, input, response (String, never null), domain (String, nullable), source (String)

(the synthetic source also carries its eval-only ``answer`` and ``test_code`` columns). Specs are plain data
(``SourceSpec.from_dict``) and are validated, and their files' schemas checked, before any row is loaded,
so a bad spec fails with a message naming the file, field and value, before anything is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

SourceKind = Literal["hf", "local", "synthetic"]
SOURCE_KINDS: tuple[str, ...] = ("hf", "local", "synthetic")
RAW_COLUMNS: tuple[str, ...] = ("system", "instruction", "input", "response", "domain", "source")
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

REALMIX_DIR_ENV = "MOCE_REALMIX_DIR"
DEFAULT_REALMIX_DIR = Path("/work/shared/data/realmix")


@dataclass(frozen=True)
class SourceSpec:
    """One instruction source.

    ``path`` is a dataset id or builder name for ``hf`` (e.g. ``"meta-math/MetaMathQA"`` or ``"json"`` with
    ``data_files``), a file for ``local``, unused for ``synthetic``. ``mapping`` maps raw fields
    (system/instruction/input/response/domain) to the source's column names. ``domain`` is a fixed label
    for every row (a mapped ``domain`` column wins where it is not null).
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

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SourceSpec:
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
        spec = cls(**raw)
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
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
        if self.kind == "hf" and self.format is not None:
            raise ValueError(
                f"{where}: 'format' {self.format!r} is not used by hf sources (only {list(_CONVERSATION_FORMATS)} "
                f"meaning a conversations column)"
            )
        if self.kind == "local":
            if self.format is not None and self.format not in LOCAL_FORMATS:
                raise ValueError(f"{where}: unknown format {self.format!r}; expected one of {list(LOCAL_FORMATS)}")
            if not Path(self.path).is_file():
                raise ValueError(f"{where}: file not found: {self.path}")


# ---------------------------------------------------------------------------------------------- local files


def _local_format(spec: SourceSpec) -> str:
    if spec.format:
        return spec.format
    suffix = Path(spec.path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        with open(spec.path, "rb") as fh:
            head = fh.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    raise ValueError(
        f"source {spec.name!r}: cannot tell the format of {spec.path} from its suffix {suffix!r}; "
        f"set 'format' to one of {list(LOCAL_FORMATS)}"
    )


def _first_bad_json_line(path: str) -> str:
    """Locate a syntax error in a JSONL file: only called once polars has refused the file."""
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number}: invalid JSON ({err.msg} at column {err.colno})"
                if not isinstance(value, dict):
                    return f"line {number}: expected a JSON object, got {type(value).__name__}"
        except UnicodeDecodeError as err:
            return f"not valid UTF-8 ({err})"
    return "could not be parsed"


def _read_json_array(spec: SourceSpec) -> pl.DataFrame:
    try:
        with open(spec.path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"source {spec.name!r}: malformed JSON in {spec.path}: line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"source {spec.name!r}: {spec.path} is not valid UTF-8 ({err})") from err
    if not isinstance(data, list):
        raise ValueError(f"source {spec.name!r}: {spec.path} must hold a JSON array of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"source {spec.name!r}: {spec.path}: element {index} is {type(row).__name__}, expected an object")
    if not data:
        raise _empty_dataset(spec)
    if spec.max_rows is not None:
        data = data[: spec.max_rows]
    columns = sorted({key for row in data for key in row})
    # Strings are what the raw shape needs; reading every column as text avoids type inference surprises.
    return pl.DataFrame(
        {c: [_as_text(row.get(c)) for row in data] for c in columns},
        schema={c: pl.String for c in columns},
    )


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    # JSON may escape lone surrogates, which UTF-8 cannot hold: mark them with U+FFFD so that the row is
    # rejected as bad_encoding later instead of failing the whole file here.
    return _LONE_SURROGATE.sub("\ufffd", text)


def _empty_dataset(spec: SourceSpec) -> ValueError:
    return ValueError(f"source {spec.name!r}: {spec.path or spec.kind} yielded no rows (empty dataset)")


def _scan_local(spec: SourceSpec) -> pl.LazyFrame:
    with open(spec.path, "rb") as fh:
        if not fh.read(4096).strip():
            raise _empty_dataset(spec)
    fmt = _local_format(spec)
    if fmt == "json":
        return _read_json_array(spec).lazy()
    if fmt == "parquet":
        try:
            frame = pl.scan_parquet(spec.path)
            frame.collect_schema()
        except Exception as err:  # polars raises several error types for unreadable files
            raise ValueError(f"source {spec.name!r}: malformed Parquet file {spec.path}: {err}") from err
    else:
        try:
            frame = pl.scan_ndjson(spec.path, infer_schema_length=None)
            frame.collect_schema()
        except Exception as err:
            raise ValueError(
                f"source {spec.name!r}: malformed JSONL file {spec.path}: {_first_bad_json_line(spec.path)}"
            ) from err
    if spec.max_rows is not None:
        frame = frame.head(spec.max_rows)
    return frame


# ---------------------------------------------------------------------------------------------- HF datasets


def _load_hf_arrow(spec: SourceSpec):  # -> pyarrow.Table
    import datasets
    import pyarrow as pa

    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.config_name:
        kwargs["name"] = spec.config_name
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    try:
        if spec.streaming:
            stream = datasets.load_dataset(spec.path, streaming=True, **kwargs)
            if spec.max_rows is not None:
                stream = stream.take(spec.max_rows)
            batches = list(stream.with_format("arrow").iter(batch_size=10_000))
            if not batches:
                return pa.table({})
            return pa.concat_tables(batches)
        dataset = datasets.load_dataset(spec.path, **kwargs)
    except Exception as err:
        raise ValueError(
            f"source {spec.name!r}: cannot load hf dataset {spec.path!r} (split {spec.split!r}"
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


def _to_raw_shape(spec: SourceSpec, frame: pl.LazyFrame) -> pl.LazyFrame:
    schema = frame.collect_schema()
    available = list(schema.names())
    where = spec.path or spec.name
    exprs: dict[str, pl.Expr] = {}
    if spec.conversations is not None:
        if spec.conversations not in schema:
            raise ValueError(
                f"source {spec.name!r}: conversations column {spec.conversations!r} not found in {where}; "
                f"available columns: {available}"
            )
        exprs["system"] = _turn_value(spec.conversations, "system")
        exprs["instruction"] = _turn_value(spec.conversations, "human")
        exprs["response"] = _turn_value(spec.conversations, "gpt")
    for target, column in spec.mapping.items():
        if column not in schema:
            raise ValueError(
                f"source {spec.name!r}: mapped field {target!r} -> column {column!r} not found in {where}; "
                f"available columns: {available}"
            )
        exprs[target] = pl.col(column)
    text_fields = [f for f in MAPPABLE_FIELDS if f != "domain"]
    columns = [
        (exprs[f].cast(pl.String) if f in exprs else pl.lit(None, dtype=pl.String)).fill_null("").alias(f)
        for f in text_fields
    ]
    domain_label = pl.lit(spec.domain, dtype=pl.String)
    domain = exprs["domain"].cast(pl.String).fill_null(domain_label) if "domain" in exprs else domain_label
    columns.append(domain.alias("domain"))
    columns.append(pl.lit(spec.name, dtype=pl.String).alias("source"))
    return frame.select(columns)


# --------------------------------------------------------------------------------------------------- public


def scan_source(spec: SourceSpec | Mapping[str, Any]) -> pl.LazyFrame:
    """Lazy frame of one source in the raw shape; the file schema is checked here, rows load on collect."""
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec.from_dict(spec)
    spec.validate()
    if spec.kind == "synthetic":
        from moce_model.synthetic import generate_synthetic

        frame = generate_synthetic(spec.n_per_domain, seed=spec.seed, split="train")
        if spec.max_rows is not None:
            frame = frame.head(spec.max_rows)
        return frame.with_columns(pl.lit(spec.name, dtype=pl.String).alias("source")).select(
            *RAW_COLUMNS, "answer", "test_code"
        ).lazy()
    frame = _scan_local(spec) if spec.kind == "local" else _scan_hf(spec)
    return _to_raw_shape(spec, frame)


def load_source(spec: SourceSpec | Mapping[str, Any]) -> pl.DataFrame:
    """Load one source in the raw shape; an empty result is an error, not an empty artifact."""
    if not isinstance(spec, SourceSpec):
        spec = SourceSpec.from_dict(spec)
    try:
        frame = scan_source(spec).collect()
    except pl.exceptions.PolarsError as err:
        detail = _first_bad_json_line(spec.path) if spec.kind == "local" and _local_format(spec) == "jsonl" else str(err)
        raise ValueError(f"source {spec.name!r}: cannot read {spec.path or spec.name}: {detail}") from err
    if frame.height == 0:
        raise _empty_dataset(spec)
    return frame


# ------------------------------------------------------------------------------------------------ profiles


def demo_sources(n_per_domain: int = 150, seed: int = 0) -> list[SourceSpec]:
    return [SourceSpec(name="synthetic", kind="synthetic", n_per_domain=n_per_domain, seed=seed)]


def realmix_dir() -> Path:
    return Path(os.environ.get(REALMIX_DIR_ENV, DEFAULT_REALMIX_DIR))


def realmix_sources(directory: str | os.PathLike[str] | None = None) -> list[SourceSpec]:
    """The four real samples (GSM8K train sample and three GPTeacher subsets), one source each."""
    root = Path(directory) if directory is not None else realmix_dir()
    gpteacher = {"instruction": "instruction", "input": "input", "response": "response"}
    return [
        SourceSpec(name="gsm8k", kind="local", path=str(root / "gsm8k_train_sample.jsonl"),
                   mapping={"instruction": "question", "response": "answer"}, domain="math"),
        SourceSpec(name="gpteacher_codegen", kind="local", path=str(root / "gpteacher_codegen_sample.json"),
                   mapping=dict(gpteacher), domain="code"),
        SourceSpec(name="gpteacher_roleplay", kind="local", path=str(root / "gpteacher_roleplay_sample.json"),
                   mapping=dict(gpteacher), domain="roleplay"),
        SourceSpec(name="gpteacher_toolformer", kind="local", path=str(root / "gpteacher_toolformer_sample.json"),
                   mapping=dict(gpteacher), domain="toolformer"),
    ]


def paper_sources(max_rows: int | None = None) -> list[SourceSpec]:
    """The paper's four HF datasets (about 1M rows in all), with their built-in field mappings."""
    names = {
        "Open-Orca/SlimOrca": "slimorca",
        "meta-math/MetaMathQA": "metamathqa",
        "ise-uiuc/Magicoder-OSS-Instruct-75K": "magicoder_oss",
        "ise-uiuc/Magicoder-Evol-Instruct-110K": "magicoder_evol",
    }
    return [
        SourceSpec.from_dict({"name": short, "kind": "hf", "path": dataset_id, "max_rows": max_rows})
        for dataset_id, short in names.items()
    ]
