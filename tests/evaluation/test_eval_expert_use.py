"""Expert use on the evaluated prompts: a tiny MoCE model whose routing is fixed by its weights (every token of
group g goes to known experts), so the counts per benchmark, group, expert and layer have a known answer; and
batched evaluation counts exactly the tokens one-at-a-time evaluation counts (no padding, no filler)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from moce_model.evaluation.benchmarks import BenchmarkOutcome
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.runner import (
    EXPERT_USE_SCHEMA,
    evaluate_model,
    expert_use_table,
)
from moce_model.evaluation.suites import BenchmarkSpec
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from tests.evaluation.test_eval_fixtures import build_model, build_tokenizer

EXPERTS = 3
# group -> the experts every token of that group is routed to, best first.
CHOSEN_TOP1 = {0: [2], 1: [0]}
CHOSEN_TOP2 = {0: [2, 1], 1: [0, 2]}


class KeywordRouter:
    """Stage-1 router of the test: prompts about apples are cluster 1, everything else cluster 0."""

    num_clusters = 2

    def assign(self, texts):
        return np.array([1 if "apple" in text else 0 for text in texts])


def forced_routing_model(tokenizer, chosen: dict[int, list[int]]) -> MoCEForCausalLM:
    """A MoCE model whose group routers pick `chosen[g]` for every token of group g.

    Hidden dimension 0 of the residual stream is held at +10 (the embeddings set it; attention, MLP and experts
    never write to it), so dimension 0 of every MLP input (after the positive-weight norm) is positive, and the
    routers read only that dimension: the logits are router[g, e, 0] times a positive number, and the experts
    with the larger weight always win."""
    config = MoCEConfig(variant="moce", num_groups=len(chosen), experts_per_group=EXPERTS,
                        router_top_k=len(chosen[0]), adapter_dim=4)
    model = MoCEForCausalLM.from_base(build_model(tokenizer), config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 10.0
        for layer in model.base.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.base_mlp.down_proj.weight[0, :] = 0.0
            layer.mlp.moce_experts.adapter_up.normal_(std=0.1)
            layer.mlp.moce_experts.adapter_up[..., 0] = 0.0
            assert (layer.post_attention_layernorm.weight > 0).all()
            router = layer.mlp.moce_experts.router
            router.zero_()
            router[:, :, 0] = -1.0
            for group, experts in chosen.items():
                for rank, expert in enumerate(experts):
                    router[group, expert, 0] = float(len(experts) - rank)
    return model


def forced_lm(chosen=CHOSEN_TOP1, batch_size: int = 2) -> MoCELM:
    tokenizer = build_tokenizer()
    return MoCELM.from_objects(forced_routing_model(tokenizer, chosen), tokenizer, router=KeywordRouter(),
                               batch_size=batch_size, max_length=256)


QUESTIONS = ["Sort this list.", "How many apples are 2 plus 3 apples?", "Reverse the string 'abc' for me please.",
             "Tom eats an apple.", "Name a colour.", "Two apples and one more apple make how many apples?"]


def _expected_counts(lm: MoCELM, tokens_per_question: list[int], chosen: dict[int, list[int]]) -> np.ndarray:
    layers = len(lm.model.moce_blocks())
    expected = np.zeros((layers, len(chosen), EXPERTS), dtype=np.int64)
    for question, tokens in zip(QUESTIONS, tokens_per_question):
        group = 1 if "apple" in question else 0
        expected[:, group, chosen[group]] += tokens
    return expected


@pytest.mark.parametrize("chosen", [CHOSEN_TOP1, CHOSEN_TOP2])
def test_scored_tokens_are_counted_once_per_layer_without_the_padding(chosen):
    lm = forced_lm(chosen)
    contexts = [lm.render_prompt("", q) for q in QUESTIONS]
    answers = [" 5", " yes", " cba, reversed", " ok", " blue", " four apples in all"]
    with lm.counting_expert_use("bench"):
        lm.loglikelihood_with_counts(list(zip(contexts, answers)), move_trailing_whitespace=False)
    counted = lm.take_expert_use()
    # HFLM reads context + continuation without its last token; batches of 2 of different lengths are padded.
    fed = [len(lm.tok_encode(c + a)) - 1 for c, a in zip(contexts, answers)]
    np.testing.assert_array_equal(counted["bench"], _expected_counts(lm, fed, chosen))
    assert lm.take_expert_use() == {}
    # The same, per prompt.
    per_prompt = lm.take_prompt_expert_use()["bench"]
    assert sorted(per_prompt) == sorted(contexts)
    for question, context, tokens in zip(QUESTIONS, contexts, fed):
        group = 1 if "apple" in question else 0
        expected = np.zeros_like(per_prompt[context])
        expected[:, group, chosen[group]] = tokens
        np.testing.assert_array_equal(per_prompt[context], expected)


class AnswerOfContentDependentLength(LogitsProcessor):
    """Makes every row answer 'x' repeated 1 + (its prompt's number of 'e's mod 5) times, then end its turn: rows
    of one batch end at different steps, and the answers do not hang on near-ties of a random model's logits
    (which padding can flip). Stateless: a row's answer starts after its last `<|im_start|>assistant\n`."""

    def __init__(self, tokenizer) -> None:
        self.end_token = tokenizer.eos_token_id
        self.answer_token = tokenizer.convert_tokens_to_ids("x")
        self.e_token = tokenizer.convert_tokens_to_ids("e")
        self.start_token = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.header_length = 1 + len(tokenizer("assistant\n", add_special_tokens=False).input_ids)

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(input_ids.tolist()):
            answer_start = max(i for i, t in enumerate(tokens) if t == self.start_token) + self.header_length
            length = 1 + tokens[:answer_start].count(self.e_token) % 5
            forced[row, self.answer_token if len(tokens) - answer_start < length else self.end_token] = 0.0
        return forced


def test_generation_counts_what_one_at_a_time_generation_counts():
    batched = forced_lm(batch_size=3)
    contexts = [batched.render_prompt("", q) for q in QUESTIONS]
    # Different prompt lengths (left padding) and rows that end early (then fed filler tokens until the last ends).
    kwargs = {"until": [], "max_gen_toks": 12,
              "logits_processor": LogitsProcessorList([AnswerOfContentDependentLength(batched.tokenizer)])}
    with batched.counting_expert_use("generated"):
        together = batched.generate(contexts, kwargs)
    # The same model and tokenizer (two byte-level test tokenizers may number the bytes differently).
    single = MoCELM.from_objects(batched.model, batched.tokenizer, router=KeywordRouter(), batch_size=1,
                                 max_length=256)
    singles, counts = [], []
    for context in contexts:
        single.render_prompt("", QUESTIONS[contexts.index(context)])
        with single.counting_expert_use("one"):
            singles.append(single.generate([context], kwargs)[0])
        counts.append(single.take_expert_use()["one"])
        # One prompt alone: its per-prompt counts are all there is.
        np.testing.assert_array_equal(single.take_prompt_expert_use()["one"][context], counts[-1])
    assert together == singles
    per_prompt = batched.take_prompt_expert_use()["generated"]
    for context, alone in zip(contexts, counts):
        np.testing.assert_array_equal(per_prompt[context], alone)
    assert len({len(text) for text in together}) > 2  # rows ended at different steps
    np.testing.assert_array_equal(batched.take_expert_use()["generated"], sum(counts[1:], counts[0]))
    # Every prompt token was counted at least, in its own group and its chosen expert only.
    prompt_tokens = [len(batched.tok_encode(c)) for c in contexts]
    total = sum(counts[1:], counts[0])
    assert (total[:, 0, 2] >= sum(n for q, n in zip(QUESTIONS, prompt_tokens) if "apple" not in q)).all()
    assert total[:, 0, :2].sum() == 0 and total[:, 1, 1:].sum() == 0


def test_nested_counting_gives_the_inner_calls_to_the_inner_label():
    lm = forced_lm()
    contexts = [lm.render_prompt("", q) for q in QUESTIONS[:2]]
    with lm.counting_expert_use("outer"):
        lm.loglikelihood_with_counts([(contexts[0], " a")], move_trailing_whitespace=False)
        with lm.counting_expert_use("inner"):
            lm.loglikelihood_with_counts([(contexts[1], " b")], move_trailing_whitespace=False)
    counted = lm.take_expert_use()
    assert counted["outer"][:, 0, 2].tolist() == [len(lm.tok_encode(contexts[0] + " a")) - 1] * 2
    assert counted["inner"][:, 1, 0].tolist() == [len(lm.tok_encode(contexts[1] + " b")) - 1] * 2
    assert not lm.model.routing_context.record_expert_use  # recording is off again outside


def test_nothing_is_recorded_outside_counting_and_a_plain_model_counts_nothing():
    lm = forced_lm()
    lm.generate([lm.render_prompt("", "Sort this list.")], {"until": [], "max_gen_toks": 3})
    assert lm.take_expert_use() == {} and int(lm.model.expert_use_counts().sum()) == 0
    tokenizer = build_tokenizer()
    plain = MoCELM.from_objects(build_model(tokenizer), tokenizer)
    with plain.counting_expert_use("bench"):
        plain.generate([plain.render_prompt("", "Sort this list.")], {"until": [], "max_gen_toks": 3})
    assert plain.take_expert_use() == {}


def test_evaluation_returns_the_share_per_benchmark_group_expert_and_layer(tmp_path: Path):
    gsm = tmp_path / "gsm.jsonl"
    questions = ["Tom has 2 apples and buys 3 more apples. How many?", "What is 4 times 5?", "Half of 10 is?"]
    gsm.write_text("".join(json.dumps({"question": q, "answer": "#### 5"}) + "\n" for q in questions))
    spec = BenchmarkSpec(name="gsm8k", kind="gsm8k", path=str(gsm), max_new_tokens=4)
    result = evaluate_model(None, "moce", [spec], lm=forced_lm(CHOSEN_TOP2), batch_size=2)
    use = result.expert_use
    assert use.schema == pl.Schema(EXPERT_USE_SCHEMA)
    # One apple question (group 1), two others (group 0); two layers; each group's three experts.
    assert sorted(set(use.select("layer", "group").rows())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert use.height == 4 * EXPERTS and set(use["n_items"]) == {3} and set(use["benchmark"]) == {"gsm8k"}
    # Every prompt routes the same way, so resampling prompts cannot move the shares: a zero-width interval for
    # group 0 (two prompts); group 1 has one prompt, so no interval.
    layer0 = use.filter(pl.col("layer") == 0)
    assert dict(layer0.group_by("group").agg(pl.col("n_prompts").first()).rows()) == {0: 2, 1: 1}
    group0 = layer0.filter(pl.col("group") == 0)
    assert (group0["share_ci_low"] == group0["share"]).all() and (group0["pooled_ci_high"] == group0["share"]).all()
    assert layer0.filter(pl.col("group") == 1)["share_ci_low"].null_count() == EXPERTS
    shares = {(g, e): s for g, e, s in use.filter(pl.col("layer") == 0).select("group", "expert", "share").rows()}
    # top-2: each token counts once for each of its two experts, so each chosen expert has half the assignments.
    assert shares == {(0, 0): 0.0, (0, 1): 0.5, (0, 2): 0.5, (1, 0): 0.5, (1, 1): 0.0, (1, 2): 0.5}
    per_group = use.group_by("layer", "group").agg(pl.col("assignments").sum(), pl.col("group_tokens").first())
    assert (per_group["assignments"] == 2 * per_group["group_tokens"]).all()
    clusters = result.item_clusters.sort("item_id")["cluster"].to_list()
    assert clusters == [1, 0, 0]


def test_expert_use_table_from_counts_and_its_checks():
    counts = np.zeros((2, 3, 4), dtype=np.int64)
    counts[0, 1] = [6, 2, 0, 0]  # 4 tokens at top-2
    counts[1, 1] = [4, 4, 0, 0]
    outcome = BenchmarkOutcome("b", [], n_items=3, expert_use=counts)
    table = expert_use_table("moce", [outcome, BenchmarkOutcome("no_experts", [], 2)], top_k=2)
    assert table.select("layer", "group", "expert", "share", "group_tokens").rows() == [
        (0, 1, 0, 0.75, 4), (0, 1, 1, 0.25, 4), (0, 1, 2, 0.0, 4), (0, 1, 3, 0.0, 4),
        (1, 1, 0, 0.5, 4), (1, 1, 1, 0.5, 4), (1, 1, 2, 0.0, 4), (1, 1, 3, 0.0, 4)]
    counts[0, 1, 0] = 5
    with pytest.raises(ValueError, match="not a multiple of top_k"):
        expert_use_table("moce", [outcome], top_k=2)


def test_evaluation_keeps_the_routers_embedding_of_each_prompt(tmp_path: Path):
    from moce_model.clustering.router import ClusterRouter

    class AppleAxisEncoder:
        """Unit vectors: (1, 0) for prompts about apples, (0, 1) otherwise."""

        def encode(self, texts):
            return np.array([[1.0, 0.0] if "apple" in t else [0.0, 1.0] for t in texts], dtype=np.float32)

    tokenizer = build_tokenizer()
    router = ClusterRouter(AppleAxisEncoder(), np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32))
    lm = MoCELM.from_objects(forced_routing_model(tokenizer, CHOSEN_TOP1), tokenizer, router=router, batch_size=2)
    gsm = tmp_path / "gsm.jsonl"
    questions = ["Tom has 2 apples and buys 3 more apples. How many?", "What is 4 times 5?"]
    gsm.write_text("".join(json.dumps({"question": q, "answer": "#### 5"}) + "\n" for q in questions))
    result = evaluate_model(None, "moce", [BenchmarkSpec(name="gsm8k", kind="gsm8k", path=str(gsm), max_new_tokens=2)],
                            lm=lm, batch_size=2)
    embedded = result.prompt_embeddings.sort("item_id")
    assert embedded.select("item_id", "cluster").rows() == [("gsm8k/0", 1), ("gsm8k/1", 0)]
    assert embedded["embedding"].to_list() == [[1.0, 0.0], [0.0, 1.0]]


def test_rolling_windows_of_an_lm_eval_task_count_under_the_task_and_belong_to_no_prompt():
    from lm_eval.api.instance import Instance

    lm = forced_lm(batch_size=2)
    texts = ["Sort this list of numbers please.", "Two apples."]
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    for request in requests:
        request.task_name = "wikitext_like"
    lm.loglikelihood_rolling(requests)  # counted under the task: no caller named a label
    counted = lm.take_expert_use()["wikitext_like"]
    # Every token of each text is read once (the prefix token first, the last token only predicted); the
    # keyword router sends both texts by their routing text: the apple one to group 1.
    tokens = [len(lm.tok_encode(text)) for text in texts]
    assert counted[:, 0, 2].tolist() == [tokens[0]] * 2 and counted[:, 1, 0].tolist() == [tokens[1]] * 2
    assert lm.take_prompt_expert_use() == {"wikitext_like": {}}
