"""Where artifacts live, and the two IO managers the pipeline uses.

Tables go through dagster-polars (Parquet); everything else (an int, a small dict that points at an artifact
directory) is stored as JSON. Nothing is pickled. Both write through `moce_model.common.io.atomic_path` (a temporary
file renamed into place), so a crash never leaves a half-written output that a downstream asset could read,
and a stored output that has been damaged since is reported with its asset and file rather than as a bare
decoder error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from dagster_polars import PolarsParquetIOManager

from moce_model.common.io import atomic_path, atomic_write_text
from resources.refs import (
    REF_TYPE_KEY,
    ArtifactRef,
    ref_from_json,
    ref_to_json,
    stored_ref_type,
)
from resources.run_process import record_run_process


def _unreadable(context: dg.InputContext, path: Any, error: Exception) -> ValueError:
    key = context.asset_key.to_user_string() if context.has_asset_key else "the upstream output"
    return ValueError(f"stored output of {key} at {path} is unreadable ({type(error).__name__}: {error}); "
                      f"re-materialize {key}")


class AtomicPolarsParquetIOManager(PolarsParquetIOManager):
    """PolarsParquetIOManager on a local directory, with atomic writes (temp file + rename).

    Reading is overridden too: dagster-polars 0.27 passes `rechunk=` to `pl.scan_parquet`, which polars 2
    removed.
    """

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        super().setup_for_execution(context)
        record_run_process(context)

    def scan_df_from_path(self, path, context: dg.InputContext, partition_key: str | None = None) -> pl.LazyFrame:
        frame = pl.scan_parquet(str(path))
        if Path(str(path)).exists():
            # Reads the footer only: a truncated or overwritten file fails here, named, not later in the asset.
            try:
                frame.collect_schema()
            except Exception as error:  # polars raises several error types for damaged files
                raise _unreadable(context, path, error) from error
        return frame

    def load_from_path(self, context: dg.InputContext, path):
        try:
            return super().load_from_path(context, path)
        except pl.exceptions.PolarsError as error:  # damaged pages, found when an eager input is collected
            raise _unreadable(context, path, error) from error

    def write_df_to_path(self, context: dg.OutputContext, df: pl.DataFrame, path) -> None:
        with atomic_path(str(path)) as temp:
            super().write_df_to_path(context, df, type(path)(str(temp)))

    def sink_df_to_path(self, context: dg.OutputContext, df: pl.LazyFrame, path) -> None:
        with atomic_path(str(path)) as temp:
            super().sink_df_to_path(context, df, type(path)(str(temp)))


class JsonIOManager(dg.ConfigurableIOManager):
    """Stores small JSON-serialisable outputs (k, artifact references) as `<base_dir>/<asset key>.json`, and a
    partition of a partitioned asset as `<base_dir>/<asset key>/<partition key>.json`."""

    base_dir: str

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        record_run_process(context)

    def _path(self, context: dg.InputContext | dg.OutputContext) -> Path:
        key = context.asset_key
        path = Path(self.base_dir).joinpath(*key.path)
        if not context.has_asset_partitions:
            return path.with_suffix(".json")
        partitions = context.asset_partition_keys
        # One file holds one partition: a run over several partitions of one of these assets (a single-run
        # backfill), or an input that maps to several, would need a file per partition.
        if len(partitions) != 1:
            raise ValueError(f"{key.to_user_string()}: stored one partition per file; asked for "
                             f"{len(partitions)} partitions at once ({list(partitions)[:5]})")
        return path / f"{partitions[0]}.json"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, ArtifactRef):
            obj = ref_to_json(obj)
        atomic_write_text(json.dumps(obj, indent=2, sort_keys=True), self._path(context))

    def load_input(self, context: dg.InputContext) -> Any:
        path = self._path(context)
        if not path.exists():
            partition = f" (partition {context.asset_partition_key})" if context.has_asset_partitions else ""
            raise FileNotFoundError(
                f"{path} does not exist: materialize {context.asset_key.to_user_string()}{partition} first"
            )
        try:
            stored = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            raise _unreadable(context, path, error) from error
        if isinstance(stored, dict) and (REF_TYPE_KEY in stored or stored_ref_type(stored) is not None):
            # an artifact reference, typed, or stored by an instance made before references were typed
            return ref_from_json(stored, str(path))
        return stored


class ArtifactStorage(dg.ConfigurableResource):
    """Root directory for artifact directories (embedding shards, centroids, model checkpoints)."""

    root: str

    def path_for(self, key: dg.AssetKey | str | list[str]) -> Path:
        if isinstance(key, str):
            parts = dg.AssetKey.from_user_string(key).path
        elif isinstance(key, dg.AssetKey):
            parts = key.path
        else:
            parts = list(key)
        path = Path(self.root).joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
