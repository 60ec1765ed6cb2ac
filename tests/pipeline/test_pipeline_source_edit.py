"""A local source edited in place makes `raw/<source>`, `instructions` and what follows stale, as a change of k does."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import dagster as dg
import polars as pl

from assets import data as data_assets
from assets.data import file_fingerprint
from pipelines.definitions import build_definitions
from pipelines.runner import materialize_unsynced, stale_reasons
from tests.pipeline_fixtures import dagster_instance, small_experiment

DATA = dg.AssetSelection.groups("data")


def _append_rows(path: Path, first: int, count: int) -> None:
    with path.open("a") as handle:
        for i in range(first, first + count):
            handle.write(json.dumps({"q": f"Question {i}: what is {i} plus {i}?", "a": f"It is {2 * i}."}) + "\n")


def _run(defs, instance) -> str:
    out = io.StringIO()
    assert materialize_unsynced(defs, instance, DATA, out=out), out.getvalue()
    return out.getvalue()


def test_appending_rows_to_a_local_source_reruns_it_and_what_reads_it(tmp_path):
    source = tmp_path / "qa.jsonl"
    _append_rows(source, 0, 30)
    experiment = small_experiment(tmp_path, sources=[
        {"name": "qa", "kind": "local", "path": str(source), "mapping": {"instruction": "q", "response": "a"},
         "domain": "math"},
    ])
    defs = build_definitions(experiment)
    instructions = experiment.storage_root / "tables" / "instructions.parquet"
    with dagster_instance(tmp_path) as instance:
        _run(defs, instance)
        assert pl.read_parquet(instructions).height == 30
        assert "nothing to run" in _run(defs, instance)
        source.touch()  # a new mtime, the same content: still fresh
        assert "nothing to run" in _run(defs, instance)

        _append_rows(source, 30, 40)
        raw = dg.AssetKey(["raw", "qa"])
        assert stale_reasons(defs, instance, [raw, dg.AssetKey("instructions")]) == {
            raw: f"source data changed since it was read ({source})"}
        output = _run(defs, instance)
        assert "raw/qa" in output and "instructions" in output
        assert pl.read_parquet(instructions).height == 70
        counts = {key: len(instance.fetch_materializations(key, limit=10).records)
                  for key in (raw, dg.AssetKey("instructions"))}
        assert counts == {raw: 2, dg.AssetKey("instructions"): 2}
        assert "nothing to run" in _run(defs, instance)


def test_a_large_file_is_versioned_by_size_mtime_and_its_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(data_assets, "FULL_HASH_MAX_BYTES", 4096)
    monkeypatch.setattr(data_assets, "EDGE_BLOCK_BYTES", 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * 10_000)
    before = file_fingerprint(path)
    assert before.startswith(f"10000:{path.stat().st_mtime_ns}:")
    with path.open("r+b") as handle:
        handle.seek(9_999)
        handle.write(b"b")
    os.utime(path, ns=(path.stat().st_atime_ns, int(before.split(":")[1])))  # the same size and mtime: the end
    assert file_fingerprint(path) != before
    assert file_fingerprint(tmp_path / "gone.jsonl") == "missing"
