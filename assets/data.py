"""raw/<source> → instructions (+ rejected_instructions)."""


import hashlib
import json

import dagster as dg
import polars as pl

from assets.common import md_table
from moce_model.experiment import Experiment
from moce_model.data.sources import SourceSpec

DATA_CODE_VERSION = "2"


def _source_kinds(spec: SourceSpec) -> set[str]:
    return {"polars", "parquet"} | ({"huggingface"} if spec.kind == "hf" else set())


def _spec_digest(spec: SourceSpec) -> str:
    return hashlib.blake2b(json.dumps(spec.to_dict(), sort_keys=True).encode(), digest_size=6).hexdigest()


def build_raw_source_assets(experiment: Experiment) -> list[dg.AssetsDefinition]:
    """One `raw/<name>` asset per configured source, so lineage shows each dataset."""

    def make(spec: SourceSpec) -> dg.AssetsDefinition:
        @dg.asset(
            key=["raw", spec.name],
            group_name="data",
            kinds=_source_kinds(spec),
            # The spec (path, mapping, ...) is part of the definition: pointing a source at another file makes
            # it stale, so `moce run` reads the new file.
            code_version=f"{DATA_CODE_VERSION}+{_spec_digest(spec)}",
            io_manager_key="parquet_io_manager",
            description=f"Raw `{spec.kind}` source `{spec.name}` mapped to the common instruction fields.",
            metadata={"source_spec": dg.MetadataValue.json(spec.to_dict())},
        )
        def raw_source(context: dg.AssetExecutionContext) -> dg.Output[pl.DataFrame]:
            from moce_model.data.sources import load_source

            frame = load_source(spec)
            with_problems = int(frame["problem"].is_not_null().sum())
            context.log.info(
                f"raw/{spec.name}: {frame.height} rows, {with_problems} with a mapped value that is not text"
            )
            return dg.Output(
                frame,
                metadata={
                    "rows": frame.height,
                    "rows_with_wrong_types": with_problems,
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
                description="The normalised, de-duplicated union of all sources (DESIGN.md schema).",
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
