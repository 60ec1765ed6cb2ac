"""Local source files: Parquet, a JSON array of objects, or JSON Lines, told apart by their content.

The JSON readers return every row with where it came from; a line (or array element) that cannot be read as a
row (invalid JSON, not an object, not UTF-8) is quarantined or refused as the spec's ``on_bad_rows`` says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from moce_model.data.source_spec import LOCAL_FORMATS, SourceSpec

# The JSON reader's per-row columns travel under names no dataset uses until the raw shape is built: `problem`
# is a data column of real datasets (Magicoder-OSS-Instruct's instruction).
READ_PROBLEMS = "__moce_read_problems__"
READ_LOCATION = "__moce_read_location__"
READ_MALFORMED = "__moce_read_malformed__"
READ_COLUMNS: tuple[str, ...] = (READ_PROBLEMS, READ_LOCATION, READ_MALFORMED)

_PARQUET_MAGIC = b"PAR1"
_UTF8_BOM = b"\xef\xbb\xbf"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_LINES = "JSON Lines (one object per line)"
_JSON_ARRAY = "a JSON array"
# How many bad lines an error over the cap lists.
_BAD_ROWS_SHOWN = 5


@dataclass
class _Rows:
    """The lines (or array elements) read, column by column: an object per row would cost a third of the time
    spent parsing the JSON. A row that could not be read has no value and says why in ``malformed``."""

    locations: list[str] = field(default_factory=list)
    values: list[dict[str, Any] | None] = field(default_factory=list)
    malformed: list[str | None] = field(default_factory=list)

    def add(self, location: str, value: dict[str, Any] | None, malformed: str | None = None) -> None:
        self.locations.append(location)
        self.values.append(value)
        self.malformed.append(malformed)

    def __len__(self) -> int:
        return len(self.locations)

    def bad(self) -> list[tuple[str, str]]:
        return [(where, why) for where, why in zip(self.locations, self.malformed, strict=True) if why is not None]


def empty_dataset(spec: SourceSpec) -> ValueError:
    return ValueError(f"source {spec.name!r}: {spec.path or spec.kind} yielded no rows (empty dataset)")


def _local_format(spec: SourceSpec) -> str:
    """``parquet`` or ``json`` (a JSON array, JSON Lines or one object: told apart by `_json_rows`).

    Decided by the content, not the suffix: a Parquet file starts with its magic bytes, JSON with ``[`` or ``{``.
    An explicit ``format`` wins; ``json`` and ``jsonl`` both mean "JSON text, layout read from the content".
    """
    if spec.format:
        return "parquet" if spec.format == "parquet" else "json"
    with open(spec.path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    first = head.removeprefix(_UTF8_BOM).lstrip()[:1]
    if first in (b"[", b"{"):
        return "json"
    raise ValueError(
        f"source {spec.name!r}: cannot tell the format of {spec.path}: it is not Parquet (no PAR1 magic) and not "
        f"JSON (it starts with {first.decode('latin-1')!r}, not '[' or '{{'); set 'format' to one of "
        f"{list(LOCAL_FORMATS)}"
    )


def json_kind(value: Any) -> str:
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


def a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _lists_of_objects(document: dict[str, Any]) -> str:
    keys = [key for key, value in document.items()
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)]
    if not keys:
        return ""
    return "; the rows may be the list in " + ", ".join(f"{key!r} ({len(document[key])} object(s))" for key in keys)


def _array_rows(spec: SourceSpec, data: bytes, where: str) -> _Rows:
    # A JSON array is one document: a syntax or encoding error anywhere leaves no row boundaries to keep the
    # other rows by, so it refuses the file; an element that is not an object is one bad row.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{where} is not valid UTF-8: line {line}, byte offset {err.start} ({err.reason})"
        ) from err
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: detected a JSON array (it starts with '['), but it is not valid JSON: "
            f"line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if spec.max_rows is not None:
        document = document[: spec.max_rows]
    rows = _Rows()
    for index, row in enumerate(document):
        if isinstance(row, dict):
            rows.add(f"element {index}", row)
        else:
            rows.add(f"element {index}", None, f"{a(json_kind(row))}, expected an object")
    return rows


def _lines(data: bytes) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, why it is not text) of every line.

    Split on "\\n" only: str.splitlines would also split inside strings holding U+2028 and the like. A file
    that is not UTF-8 is decoded line by line, so that one bad line costs only itself: b"\\n" never occurs
    inside a UTF-8 character.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        for number, line in enumerate(data.split(b"\n"), start=1):
            try:
                yield number, line.decode("utf-8"), None
            except UnicodeDecodeError as err:
                yield number, None, f"not valid UTF-8 (byte offset {err.start} of the line: {err.reason})"
        return
    yield from ((number, line, None) for number, line in enumerate(text.split("\n"), start=1))


def _line_rows(spec: SourceSpec, data: bytes, where: str) -> _Rows:
    """Every non-empty line of a JSON Lines file (up to ``max_rows``), read or marked malformed."""
    rows = _Rows()
    first_invalid: tuple[int, json.JSONDecodeError, str] | None = None
    for number, text, not_text in _lines(data):
        if text is not None and not text.strip():
            continue
        if spec.max_rows is not None and len(rows) >= spec.max_rows:
            break
        location = f"line {number}"
        if text is None:
            rows.add(location, None, not_text)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if not rows:
                first_invalid = (number, err, _refuse_one_document(where, data, number, err))
            rows.add(location, None, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        if isinstance(value, dict):
            rows.add(location, value)
        else:
            rows.add(location, None, f"{a(json_kind(value))}, expected an object")
    if first_invalid is not None and all(value is None for value in rows.values):
        number, err, document_error = first_invalid
        raise ValueError(
            f"{where}: neither JSON Lines (line {number}: {err.msg} at column {err.colno}; no line is a JSON object) "
            f"nor one JSON document ({document_error})"
        )
    return rows


def _refuse_one_document(where: str, data: bytes, number: int, line_error: json.JSONDecodeError) -> str:
    """The first line is not valid JSON: refuse a file that is one multi-line JSON document instead (a
    pretty-printed object, often ``{"data": [...]}``), which is not a list of rows and not a bad line.
    Returns why the file is not one document."""
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 at byte offset {err.start}"
    except json.JSONDecodeError as err:
        return f"line {err.lineno}, column {err.colno}: {err.msg}"
    keys = list(document)[:10] if isinstance(document, dict) else []
    raise ValueError(
        f"{where}: detected a single JSON {json_kind(document)} spread over several lines (keys {keys}), not rows "
        f"(line {number}: {line_error.msg}): expected a JSON array of objects or JSON Lines (one object per line)"
        f"{_lists_of_objects(document) if isinstance(document, dict) else ''}"
    )


def _check_bad_rows(spec: SourceSpec, rows: _Rows, layout: str, where: str) -> None:
    """Apply ``on_bad_rows``: refuse at the first bad row, or quarantine unless they are more than the cap."""
    bad = rows.bad()
    if not bad:
        return
    if spec.on_bad_rows == "refuse":
        raise ValueError(
            f"{where}: detected {layout}; {bad[0][0]}: {bad[0][1]} (on_bad_rows: refuse; "
            f"'quarantine' keeps the other rows and puts such ones in rejected_instructions)"
        )
    share = len(bad) / len(rows)
    if share <= spec.max_bad_row_share and len(bad) < len(rows):
        return
    unit = "elements" if layout == _JSON_ARRAY else "lines"
    shown = "; ".join(f"{location}: {why}" for location, why in bad[:_BAD_ROWS_SHOWN])
    if len(bad) == len(rows):
        verdict = f"none of its {len(rows)} {unit} can be read as a row"
    else:
        verdict = (f"{len(bad)} of {len(rows)} {unit} read cannot be read as rows ({share:.2%}, more than "
                   f"max_bad_row_share {spec.max_bad_row_share:g})")
    raise ValueError(
        f"{where}: detected {layout}; {verdict}; first {min(len(bad), _BAD_ROWS_SHOWN)}: {shown}. Repair the "
        f"file, or raise max_bad_row_share to set such rows aside in rejected_instructions"
    )


def _as_text(value: str) -> str:
    # JSON may escape lone surrogates, which UTF-8 cannot hold: mark them with U+FFFD so that the row is
    # rejected as bad_encoding later instead of failing the whole file here.
    return _LONE_SURROGATE.sub("\ufffd", value)


def _read_json_rows(spec: SourceSpec) -> pl.DataFrame:
    """The columns the spec maps, as text, plus per row: where it was (``READ_LOCATION``), where a mapped
    value was not text (``READ_PROBLEMS``) and, for a row that could not be read at all, why (``READ_MALFORMED``).

    A value that is not a string (a number, list, object or boolean) is never turned into training text: the
    row keeps its JSON spelling, so the rejected row shows what was there, and the problem names the file,
    line (or array element), column and type; `normalise_instructions` rejects it as ``wrong_type``.
    """
    data = Path(spec.path).read_bytes().removeprefix(_UTF8_BOM)
    where = f"source {spec.name!r}: {spec.path}"
    if data.lstrip().startswith(b"["):
        rows, layout = _array_rows(spec, data, where), _JSON_ARRAY
    else:
        rows, layout = _line_rows(spec, data, where), _JSON_LINES
    if not rows:
        raise empty_dataset(spec)
    _check_bad_rows(spec, rows, layout, where)
    objects = [value for value in rows.values if value is not None]
    available = list(dict.fromkeys(key for row in objects for key in row))
    wanted = {column: target for target, column in spec.mapping.items()}
    for target, column in spec.mapping.items():
        if column not in available:
            if len(objects) == 1 and _lists_of_objects(objects[0]):
                # One line, one object, without the mapped columns but holding a list of objects: a JSON
                # document wrapping the rows (``{"data": [...]}``), not a one-row JSON Lines file.
                raise ValueError(
                    f"{where}: detected a single JSON object (keys {available[:10]}) without the mapped column "
                    f"{column!r}, not rows: expected a JSON array of objects or JSON Lines (one object per line)"
                    f"{_lists_of_objects(objects[0])}"
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
    for location, row in zip(rows.locations, rows.values, strict=True):
        found = []
        for column, target in wanted.items():
            value = None if row is None else row.get(column)
            if value is None or isinstance(value, str):
                texts[column].append(None if value is None else _as_text(value))
                continue
            texts[column].append(_as_text(json.dumps(value, ensure_ascii=False)))
            found.append(
                f"{spec.path} {location}: column {column!r} (mapped to {target!r}) holds {a(json_kind(value))}, "
                f"expected text"
            )
        problems.append("; ".join(found) if found else None)
    columns = {column: pl.Series(column, values, dtype=pl.String) for column, values in texts.items()}
    if spec.conversations is not None:
        try:
            turns = [None if row is None else row.get(spec.conversations) for row in rows.values]
            columns[spec.conversations] = pl.Series(spec.conversations, turns)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as err:
            raise ValueError(
                f"source {spec.name!r}: conversations column {spec.conversations!r} in {spec.path} is not a list of "
                f"{{from, value}} objects in every row: {err}"
            ) from err
    columns[READ_PROBLEMS] = pl.Series(READ_PROBLEMS, problems, dtype=pl.String)
    columns[READ_LOCATION] = pl.Series(READ_LOCATION, rows.locations, dtype=pl.String)
    columns[READ_MALFORMED] = pl.Series(READ_MALFORMED, rows.malformed, dtype=pl.String)
    return pl.DataFrame(columns)


def scan_local(spec: SourceSpec) -> pl.LazyFrame:
    with open(spec.path, "rb") as fh:
        if not fh.read(4096).strip():
            raise empty_dataset(spec)
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
