"""Prompt formats: a base model without a chat template is trained, asked (generate) and evaluated (MoCELM) in
one and the same format, the reference code's `### System / ### Human / ### Assistant`."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from moce_model.data.prompt_format import (
    IGNORE_INDEX,
    make_prompt_format,
    tokenize_example,
)
from moce_model.evaluation.lm import MoCELM
from moce_model.generate import generate
from moce_model.training import build_dataset
from tests.tiny_models import make_char_tokenizer, save_tiny_llama


def base_tokenizer():
    """The char tokenizer as a base model ships it: no chat template."""
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_a_tokenizer_without_template_gets_the_reference_format():
    tokenizer = base_tokenizer()
    fmt = make_prompt_format("auto", tokenizer)
    assert fmt.name == "human_assistant"
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    prompt = fmt.prompt("Be exact.", "Add 2 and 3.", "numbers: 2, 3")
    assert prompt == f"{bos}### System:\nBe exact.\n### Human:\nAdd 2 and 3.\nnumbers: 2, 3\n### Assistant:\n"
    assert fmt.completion("Be exact.", "Add 2 and 3.", "numbers: 2, 3", "5") == f"5{eos}"
    # no system prompt, no input: their blocks are left out, as in the reference code
    assert fmt.prompt("", "Say hi.", "") == f"{bos}### Human:\nSay hi.\n### Assistant:\n"


def test_the_format_can_be_named_and_a_template_is_kept_by_default():
    with_template = make_char_tokenizer()
    assert make_prompt_format("auto", with_template).name == "chat_template"
    assert make_prompt_format("human_assistant", with_template).prompt("", "Q", "").endswith("### Assistant:\n")
    with pytest.raises(ValueError, match="has no chat template"):
        make_prompt_format("chat_template", base_tokenizer())
    with pytest.raises(ValueError, match="unknown prompt format 'alpaca'"):
        make_prompt_format("alpaca", with_template)
    no_eos = base_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        make_prompt_format("auto", no_eos)


def test_training_labels_are_the_response_and_eos_only():
    tokenizer = base_tokenizer()
    fmt = make_prompt_format("auto", tokenizer)
    example = tokenize_example(fmt, "Be exact.", "Add 2 and 3.", "numbers: 2, 3", "2 + 3 = 5", max_length=1000)
    ids, labels = example["input_ids"], example["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first]) == fmt.prompt("Be exact.", "Add 2 and 3.", "numbers: 2, 3")
    assert tokenizer.decode(labels[first:]) == "2 + 3 = 5" + tokenizer.eos_token
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # one BOS, not two
    assert labels[-1] == tokenizer.eos_token_id  # the model learns to stop


def test_training_generation_and_evaluation_use_the_same_format(tmp_path):
    """The prompt tokens of a training row, of `generate` and of MoCELM are identical for the same item."""
    model_dir = save_tiny_llama(tmp_path / "base")
    tokenizer = base_tokenizer()
    tokenizer.save_pretrained(model_dir)  # the checkpoint's tokenizer has no template
    instruction = "Reverse the word: stone"

    fmt = make_prompt_format("auto", tokenizer)
    dataset, _ = build_dataset(
        pl.DataFrame({"id": ["a"], "system": [""], "instruction": [instruction], "input": [""], "response": ["enots"]}),
        fmt, max_length=512, group_ids=[0],
    )
    (example,) = dataset.examples
    training_prompt = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen: list[list[int]] = []
    original_generate = model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["input_ids"][0][kwargs["attention_mask"][0].bool()].tolist())
        return original_generate(*args, **kwargs)

    model.generate = recording_generate
    generate(model_dir, [instruction], max_new_tokens=2, model=model, tokenizer=tokenizer)
    assert seen.pop() == training_prompt

    lm = MoCELM.from_objects(model, tokenizer, batch_size=2, max_length=256)
    assert lm.prompt_format.name == "human_assistant"
    context = lm.render_prompt("", instruction, "")
    assert lm.tok_encode(context) == training_prompt
    lm.generate([context], {"until": [], "max_gen_toks": 2})
    assert seen.pop() == training_prompt
    # the held-out loss scores exactly the training labels
    (logprob, count, _), = lm.loglikelihood_with_counts(
        [(context, lm.render_continuation("", instruction, "", "enots"))], move_trailing_whitespace=False)
    assert count == sum(label != IGNORE_INDEX for label in example["labels"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
    labels = torch.tensor(example["labels"][1:])
    token_log_probs = torch.log_softmax(logits[:-1], -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    assert logprob == pytest.approx(float(token_log_probs[labels != IGNORE_INDEX].sum()), abs=1e-4)
    # lm-eval's chat hook renders few-shot turns in the same format
    rendered = lm.apply_chat_template([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                       {"role": "user", "content": instruction}])
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert rendered == f"{bos}### Human:\nQ1\n### Assistant:\nA1{eos}### Human:\n{instruction}\n### Assistant:\n"
