"""Sources read through Hugging Face `datasets`: a Hub dataset, a builder with data files, or a local mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from moce_model.data.source_spec import SourceSpec, mirror_builder


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
            location = mirror_builder(spec.mirror) or spec.mirror
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


def scan_hf(spec: SourceSpec) -> pl.LazyFrame:
    table = _load_hf_arrow(spec)
    table = table.replace_schema_metadata(None)
    return pl.from_arrow(table).lazy()  # type: ignore[union-attr]
