"""Small pieces every asset module uses: markdown tables, artifact references, the automation condition, and
`Branch`, where an asset factory puts its assets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from resources.storage import ArtifactStorage

# Steps that load a model or encoder and keep every core busy. The executor (pipelines/definitions.py) runs at most
# MOCE_HEAVY_STEPS of them at once: two trainings sharing 2 cores were measured 5x slower than one after the other.
HEAVY_STEP_TAG = {"moce/compute": "heavy"}

# Dagster's provenance tags on a materialization (see "Data versioning" in the Dagster docs): the code version it
# ran with, its data version, and the data version of each input it read.
CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_TAG = "dagster/data_version"
INPUT_DATA_VERSION_TAG = "dagster/input_data_version/"

# Re-run an asset when an upstream asset's *data version* changed (not merely re-materialized): a new k gives
# `selected_k` a new data version, so exactly the assets downstream of it re-run; a re-materialization that
# produced the same data changes nothing. `will_be_requested` lets one tick request the whole downstream chain.
_AC = dg.AutomationCondition
RERUN_WHEN_UPSTREAM_CHANGES = (
    _AC.any_deps_match(_AC.data_version_changed() | _AC.will_be_requested()).since_last_handled()
    & ~_AC.any_deps_missing()
    & ~_AC.any_deps_in_progress()
    & ~_AC.in_progress()
).with_label("upstream data version changed")


def md_table(frame: pl.DataFrame, max_rows: int = 50, float_digits: int = 4) -> str:
    if frame.height == 0:
        return "_(empty)_"
    frame = frame.head(max_rows)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{float_digits}g}"
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")[:120]

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def artifact_metadata(path: Path) -> dict[str, Any]:
    return {"dagster/uri": dg.MetadataValue.path(str(path))}


@dataclass(frozen=True)
class Branch:
    """Where an asset factory puts the assets it builds: the main graph (`MAIN`: keys as named, the module's own
    group, re-run when upstream data changes) or a branch beside it, such as the k sweep's (keys under
    `k_sweep/`, its own group, one partition per k, materialized on demand). A branch's assets read the main
    graph's inputs (instructions, embeddings, base model) but write only under their own keys and directories."""

    prefix: tuple[str, ...] = ()
    group_name: str | None = None
    partitions_def: dg.PartitionsDefinition | None = None
    automation_condition: dg.AutomationCondition | None = RERUN_WHEN_UPSTREAM_CHANGES

    def key(self, *path: str) -> list[str]:
        return [*self.prefix, *path]

    def group(self, default: str) -> str:
        return self.group_name or default

    def op_name(self, name: str) -> str:
        return "__".join([*self.prefix, name])


MAIN = Branch()


def artifact_dir(storage: ArtifactStorage, context: dg.AssetExecutionContext) -> Path:
    """The asset's artifact directory, one per partition for a partitioned asset."""
    path = storage.path_for(context.asset_key)
    return path / context.partition_key if context.has_partition_key else path
