"""raw/<source> → instructions (+ rejected_instructions)."""


import glob
import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl

from assets.common import md_table
from moce_model.data.sources import SourceSpec
from moce_model.experiment import Experiment

# 3: raw rows carry `origin` and `malformed` (bad JSON lines quarantined); rejected rows' `detail` names them.
DATA_CODE_VERSION = "3"


def _source_kinds(spec: SourceSpec) -> set[str]:
    return {"polars", "parquet"} | ({"huggingface"} if spec.kind == "hf" else set())


def _spec_digest(spec: SourceSpec) -> str:
    return hashlib.blake2b(json.dumps(spec.to_dict(), sort_keys=True).encode(), digest_size=6).hexdigest()


# A local file up to this size is hashed whole (0.3 s for 64 MiB, measured on 2 shared cores): any edit changes
# its version. A larger one (a multi-GB dump) is versioned by its size, modification time (ns) and a hash of its
# first and last blocks, so that `moce run` does not read it whole on every freshness check; an edit that keeps its
# size and mtime and touches only its middle goes unseen (re-materialize `raw/<source>` by hand then).
FULL_HASH_MAX_BYTES = 64 * 2**20
EDGE_BLOCK_BYTES = 2**20
SOURCE_SPEC_METADATA = "source_spec"


def file_fingerprint(path: Path) -> str:
    """The content version of one file: `size:hash` of its bytes, or, above `FULL_HASH_MAX_BYTES`, of its size,
    mtime_ns and first and last `EDGE_BLOCK_BYTES`; `missing` when it does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing"
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        if stat.st_size <= FULL_HASH_MAX_BYTES:
            for block in iter(lambda: handle.read(EDGE_BLOCK_BYTES), b""):
                digest.update(block)
            return f"{stat.st_size}:{digest.hexdigest()}"
        digest.update(handle.read(EDGE_BLOCK_BYTES))
        handle.seek(stat.st_size - EDGE_BLOCK_BYTES)
        digest.update(handle.read(EDGE_BLOCK_BYTES))
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def _files_under(location: str) -> list[Path]:
    """The files `location` names on this machine: the file, every file under the directory (hidden ones, such
    as a download's `.cache`, left out), or a glob's matches; none for a Hub id or URL."""
    path = Path(location)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(file for file in path.rglob("*") if file.is_file()
                      and not any(part.startswith(".") for part in file.relative_to(path).parts))
    if glob.has_magic(location):
        return sorted(Path(match) for match in glob.glob(location, recursive=True) if Path(match).is_file())
    return []


def source_files(spec: SourceSpec) -> list[Path]:
    """The local files a source reads: a local source's file (even when missing: its absence is a change), an hf
    source's mirror, `data_files` and `path` where they are on this machine; none for a synthetic source."""
    if spec.kind == "local":
        return [Path(spec.path)]
    if spec.kind != "hf":
        return []
    data_files = spec.data_files if isinstance(spec.data_files, list) else [spec.data_files or ""]
    locations = [spec.path, spec.mirror or "", *data_files]
    return sorted({file for location in locations if location for file in _files_under(location)})


def source_data_version(spec: SourceSpec) -> tuple[str, dict[str, str]]:
    """The data version of `raw/<source>`: its spec and the content of every local file it reads
    (`file_fingerprint`), so an edited file gives the raw asset, and through it `instructions` and everything
    downstream, a new version. Also returns each file's fingerprint, by path."""
    files = {str(file): file_fingerprint(file) for file in source_files(spec)}
    digest = hashlib.blake2b(digest_size=12)
    digest.update(json.dumps({"spec": spec.to_dict(), "files": files}, sort_keys=True).encode())
    return digest.hexdigest(), files


def current_source_data_version(asset_spec: dg.AssetSpec) -> tuple[str, dict[str, str]] | None:
    """For a `raw/<source>` asset, the data version its source has now (`source_data_version`); None for any
    other asset. Dagster does not watch the files: `moce run` compares this with the data version recorded on
    the asset's last materialization."""
    value = asset_spec.metadata.get(SOURCE_SPEC_METADATA)
    if value is None:
        return None
    return source_data_version(SourceSpec(**(value.value if isinstance(value, dg.JsonMetadataValue) else value)))


def build_raw_source_assets(experiment: Experiment) -> list[dg.AssetsDefinition]:
    """One `raw/<name>` asset per configured source, so lineage shows each dataset."""

    def make(spec: SourceSpec) -> dg.AssetsDefinition:
        @dg.asset(
            key=["raw", spec.name],
            group_name="data",
            kinds=_source_kinds(spec),
            # The spec (path, mapping, ...) is part of the definition: pointing a source at another file makes
            # it stale, so `moce run` reads the new file. The file's content is part of the data version (below).
            code_version=f"{DATA_CODE_VERSION}+{_spec_digest(spec)}",
            io_manager_key="parquet_io_manager",
            description=f"Raw `{spec.kind}` source `{spec.name}` mapped to the common instruction fields.",
            metadata={SOURCE_SPEC_METADATA: dg.MetadataValue.json(spec.to_dict())},
        )
        def raw_source(context: dg.AssetExecutionContext) -> dg.Output[pl.DataFrame]:
            from moce_model.data.sources import load_source

            # Versioned before reading: a file edited while it is read gets an older version than its new content,
            # so the next `moce run` reads it again.
            version, fingerprints = source_data_version(spec)
            frame = load_source(spec)
            with_problems = int(frame["problem"].is_not_null().sum())
            malformed = int(frame["malformed"].is_not_null().sum())
            context.log.info(
                f"raw/{spec.name}: {frame.height} rows, {with_problems} with a mapped value that is not text, "
                f"{malformed} lines that are not rows (set aside as malformed_line)"
            )
            return dg.Output(
                frame,
                data_version=dg.DataVersion(version),
                metadata={
                    "file_fingerprints": dg.MetadataValue.json(fingerprints),
                    "rows": frame.height,
                    "rows_with_wrong_types": with_problems,
                    "malformed_lines": malformed,
                    "domains": dg.MetadataValue.json(
                        frame.group_by("domain").len().sort("domain").to_dicts() if "domain" in frame.columns else []
                    ),
                    "preview": dg.MetadataValue.md(md_table(frame.head(5))),
                },
            )

        return raw_source

    return [make(spec) for spec in experiment.sources]


def content_data_version(ids: pl.Series) -> dg.DataVersion:
    """A data version derived from the content, so re-reading unchanged data does not make downstream stale."""
    digest = hashlib.blake2b(digest_size=12)
    for chunk in ids.sort().cast(pl.Utf8).to_list():
        digest.update(chunk.encode())
    return dg.DataVersion(digest.hexdigest())


def build_instruction_assets(experiment: Experiment) -> dg.AssetsDefinition:
    raw_keys = {spec.name: dg.AssetKey(["raw", spec.name]) for spec in experiment.sources}

    @dg.multi_asset(
        ins={name: dg.AssetIn(key=key) for name, key in raw_keys.items()},
        outs={
            "instructions": dg.AssetOut(
                group_name="data",
                kinds={"polars", "parquet"},
                code_version=DATA_CODE_VERSION,
                io_manager_key="parquet_io_manager",
                description="The normalised, de-duplicated union of all sources (INSTRUCTION_COLUMNS).",
            ),
            "rejected_instructions": dg.AssetOut(
                group_name="data",
                kinds={"polars", "parquet"},
                code_version=DATA_CODE_VERSION,
                io_manager_key="parquet_io_manager",
                description="Every invalid row with its reason: nothing is silently dropped.",
            ),
        },
    )
    def instructions(context: dg.AssetExecutionContext, **raw_frames: pl.DataFrame):
        from moce_model.data.instructions import normalise_instructions

        frames = [raw_frames[name] for name in raw_keys]
        kept, rejected = normalise_instructions(frames, max_chars=experiment.max_instruction_chars)
        n_in = sum(frame.height for frame in frames)
        if kept.height + rejected.height != n_in:
            raise RuntimeError(f"row accounting broken: {n_in} in, {kept.height} kept, {rejected.height} rejected")
        per_reason = rejected.group_by(["source", "reason"]).len().sort(["source", "reason"])
        context.log.info(f"instructions: {kept.height} kept, {rejected.height} rejected of {n_in}")
        # The rejected rows are stored first, so they are on disk (replacing any earlier table) even when no
        # row is valid and the step fails below.
        yield dg.Output(
            rejected,
            output_name="rejected_instructions",
            metadata={
                "rows": rejected.height,
                "per_source_and_reason": dg.MetadataValue.md(md_table(per_reason)),
            },
        )
        if kept.height == 0:
            counts = rejected.group_by("reason").len().sort("reason").iter_rows()
            reasons = ", ".join(f"{reason}: {n}" for reason, n in counts)
            raise ValueError(
                f"no valid instructions among {n_in} rows ({reasons}); every row is in rejected_instructions "
                f"with its reason and detail"
            )
        per_source = kept.group_by("source").len().sort("source")
        yield dg.Output(
            kept,
            output_name="instructions",
            data_version=content_data_version(kept["id"]),
            metadata={
                "rows": kept.height,
                "rows_in": n_in,
                "rows_rejected": rejected.height,
                "per_source": dg.MetadataValue.md(md_table(per_source)),
            },
        )

    return instructions
