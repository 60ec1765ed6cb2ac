"""Where artifacts live, and the two IO managers the pipeline uses.

Tables go through dagster-polars (Parquet); everything else (an int, a small dict that points at an artifact
directory) is stored as JSON. Nothing is pickled. Both write to a temporary file and rename it into place, so a
crash never leaves a half-written output that a downstream asset could read.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from dagster_polars import PolarsParquetIOManager


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


class AtomicPolarsParquetIOManager(PolarsParquetIOManager):
    """PolarsParquetIOManager on a local directory, with atomic writes (temp file + rename).

    Reading is overridden too: dagster-polars 0.27 passes `rechunk=` to `pl.scan_parquet`, which polars 2
    removed.
    """

    def scan_df_from_path(self, path, context: dg.InputContext, partition_key: str | None = None) -> pl.LazyFrame:
        return pl.scan_parquet(str(path))

    def write_df_to_path(self, context: dg.OutputContext, df: pl.DataFrame, path) -> None:
        target = Path(str(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(target)
        try:
            super().write_df_to_path(context, df, type(path)(str(temp)))
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)

    def sink_df_to_path(self, context: dg.OutputContext, df: pl.LazyFrame, path) -> None:
        target = Path(str(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(target)
        try:
            super().sink_df_to_path(context, df, type(path)(str(temp)))
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)


class JsonIOManager(dg.ConfigurableIOManager):
    """Stores small JSON-serialisable outputs (k, artifact references) as `<base_dir>/<asset key>.json`."""

    base_dir: str

    def _path(self, key: dg.AssetKey) -> Path:
        return Path(self.base_dir).joinpath(*key.path).with_suffix(".json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        path = self._path(context.asset_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_sibling(path)
        temp.write_text(json.dumps(obj, indent=2, sort_keys=True))
        os.replace(temp, path)

    def load_input(self, context: dg.InputContext) -> Any:
        path = self._path(context.asset_key)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: materialize {context.asset_key.to_user_string()} first"
            )
        return json.loads(path.read_text())


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
