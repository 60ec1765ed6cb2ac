"""What a source is: its spec (plain data, validated before any row is read), the raw shape every loader
returns, and the field mappings of the paper's datasets. Loading lives in `moce_model.data.sources`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

SourceKind = Literal["hf", "local", "synthetic"]
SOURCE_KINDS: tuple[str, ...] = ("hf", "local", "synthetic")
BadRowPolicy = Literal["quarantine", "refuse"]
BAD_ROW_POLICIES: tuple[str, ...] = ("quarantine", "refuse")
DEFAULT_MAX_BAD_ROW_SHARE = 0.01
# `problem`: why a row cannot be used as read (a mapped value that is not text), null when it can.
PROBLEM_COLUMN = "problem"
# `origin`: where the row came from, e.g. "data/qa.jsonl line 12" (lines count from 1, array elements and rows
# of typed files from 0), so that a rejected row can be found in its file.
ORIGIN_COLUMN = "origin"
# `malformed`: why a line or element could not be read as a row at all (invalid JSON, not an object, not
# UTF-8), null for a row that was read; such a row has empty fields and is rejected as `malformed_line`.
MALFORMED_COLUMN = "malformed"
RAW_COLUMNS: tuple[str, ...] = (
    "system", "instruction", "input", "response", "domain", "source", PROBLEM_COLUMN, ORIGIN_COLUMN, MALFORMED_COLUMN
)
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
CONVERSATION_FORMATS = ("slimorca", "sharegpt", "conversations")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_]+")


def mirror_builder(path: str) -> str | None:
    """The `datasets` builder of one mirrored data file, by its suffix (None: not a data file)."""
    suffix = Path(path).suffix.lower()
    return {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)


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

    ``on_bad_rows`` (local JSON and JSON Lines files): what a line (or array element) that cannot be read as
    a row does: invalid JSON, not an object, not UTF-8. ``quarantine`` keeps the other rows and sends it to
    the rejected table as ``malformed_line``, unless more than ``max_bad_row_share`` of the rows read are bad
    (then the file is refused, naming the first bad lines); ``refuse`` refuses the file at the first one.
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
    on_bad_rows: BadRowPolicy = "quarantine"
    max_bad_row_share: float = DEFAULT_MAX_BAD_ROW_SHARE

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
        if raw.get("kind") == "hf" and raw.get("format") in CONVERSATION_FORMATS:
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
        self._validate_bad_rows(where)
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
            if check_files and Path(self.mirror).is_file() and mirror_builder(self.mirror) is None:
                raise ValueError(
                    f"{where}: mirror file {self.mirror} is not .json, .jsonl or .parquet; "
                    f"give one of those or the dataset's directory"
                )
        if self.kind == "hf" and self.format is not None:
            raise ValueError(
                f"{where}: 'format' {self.format!r} is not used by hf sources (only {list(CONVERSATION_FORMATS)} "
                f"meaning a conversations column)"
            )
        if self.kind == "local":
            if self.format is not None and self.format not in LOCAL_FORMATS:
                raise ValueError(f"{where}: unknown format {self.format!r}; expected one of {list(LOCAL_FORMATS)}")
            if check_files and not Path(self.path).is_file():
                raise ValueError(f"{where}: file not found: {self.path}")

    def _validate_bad_rows(self, where: str) -> None:
        if self.on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(
                f"{where}: on_bad_rows must be one of {list(BAD_ROW_POLICIES)}, got {self.on_bad_rows!r}"
            )
        share = self.max_bad_row_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"{where}: max_bad_row_share must be a number from 0 to 1, got {share!r}")
        if self.kind != "local" and (self.on_bad_rows, share) != ("quarantine", DEFAULT_MAX_BAD_ROW_SHARE):
            # Only text files have lines that can fail on their own; saying so beats ignoring the setting.
            raise ValueError(
                f"{where}: on_bad_rows and max_bad_row_share apply to local JSON and JSON Lines files; "
                f"a {self.kind!r} source has no lines to quarantine"
            )
