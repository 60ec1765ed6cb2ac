"""MoCELM (an lm-eval HFLM): batched scoring/generation equals one-at-a-time, and each request's group
reaches the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from moce_model.data.prompt_format import routing_text
from moce_model.evaluation.lm import MoCELM
from tests.evaluation.test_eval_fixtures import (
    MINILM_SPEC,
    build_model,
    build_tokenizer,
    save_model_dir,
    save_routed_model_dir,
)


@pytest.fixture(scope="module")
def tiny_lm() -> MoCELM:
    tokenizer = build_tokenizer()
    return MoCELM.from_objects(build_model(tokenizer), tokenizer, batch_size=3, max_length=256)


def _manual_continuation_logprob(lm: MoCELM, context: str, continuation: str) -> float:
    context_ids = lm.tok_encode(context)
    whole = lm.tok_encode(context + continuation)
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([whole])).logits[0]
    log_probs = torch.log_softmax(logits, -1)
    return float(sum(log_probs[i - 1, whole[i]] for i in range(len(context_ids), len(whole))))


def test_loglikelihood_matches_an_unpadded_forward(tiny_lm: MoCELM):
    pairs = [("Question: 2 + 2 =", " 4"), ("A much longer context that needs padding in a batch:", " yes it does"),
             ("Short", " x"), ("Another context", " and a longer continuation here"), ("Q", " A")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    batched = tiny_lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, batched):
        assert logprob == pytest.approx(_manual_continuation_logprob(tiny_lm, context, continuation), abs=1e-4)
        assert isinstance(greedy, bool)
    counts = tiny_lm.loglikelihood_with_counts(pairs)
    assert [c for _, c, _ in counts] == [len(tiny_lm.tok_encode(c)) for _, c in pairs]


def test_trailing_whitespace_moves_to_the_continuation_only_when_asked(tiny_lm: MoCELM):
    context = tiny_lm.render_prompt("", "hi")
    assert context.endswith("\n")
    (moved_lp, moved_n, _), = tiny_lm.loglikelihood_with_counts([(context, "ok")])
    (kept_lp, kept_n, _), = tiny_lm.loglikelihood_with_counts([(context, "ok")], move_trailing_whitespace=False)
    assert moved_n == kept_n + 1  # the byte-level "\n" is scored as part of the continuation
    assert kept_lp == pytest.approx(_manual_continuation_logprob(tiny_lm, context, "ok"), abs=1e-4)


def test_empty_context_is_conditioned_on_the_prefix_token(tiny_lm: MoCELM):
    (logprob, _), = tiny_lm.loglikelihood([Instance("loglikelihood", {}, ("", "hello"), 0)])
    tokens = [tiny_lm.prefix_token_id] + tiny_lm.tok_encode("hello")
    with torch.inference_mode():
        log_probs = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([tokens])).logits[0], -1)
    expected = float(sum(log_probs[i - 1, tokens[i]] for i in range(1, len(tokens))))
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_rolling_sums_every_token_once(tiny_lm: MoCELM):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (total,) = tiny_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    (expected, _), = tiny_lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
    assert total == pytest.approx(expected, abs=1e-3)
    short = MoCELM.from_objects(tiny_lm.model, tiny_lm.tokenizer, batch_size=4, max_length=32)
    (windowed,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert np.isfinite(windowed) and windowed < 0


def test_batched_greedy_generation_equals_one_at_a_time(tiny_lm: MoCELM):
    contexts = [tiny_lm.render_prompt("", q)
                for q in ["What is 1 + 1?", "Write a long Python function please", "hi", "Reverse: a b c"]]
    kwargs = {"until": [], "max_gen_toks": 12}
    batched = tiny_lm.generate(contexts, kwargs)
    singles = [tiny_lm.generate([c], kwargs)[0] for c in contexts]
    assert batched == singles
    # and the first one equals a manual greedy loop without padding or cache
    ids = tiny_lm.tok_encode(contexts[0])
    produced = []
    with torch.inference_mode():
        for _ in range(12):
            next_id = int(tiny_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if next_id == tiny_lm.tokenizer.eos_token_id:
                break
            ids.append(next_id)
            produced.append(next_id)
    assert batched[0] == tiny_lm.tokenizer.decode(produced, skip_special_tokens=True)


def test_generate_until_cuts_at_stop_sequences(tiny_lm: MoCELM):
    context = tiny_lm.render_prompt("", "say something")
    free = tiny_lm.generate([context], {"until": [], "max_gen_toks": 16})[0]
    assert len(free) >= 4
    stop = free[2:4]
    requests = [Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 16}), 0)]
    (cut,) = tiny_lm.generate_until(requests)
    assert cut == free[: free.index(stop)]


def test_sampling_is_refused(tiny_lm: MoCELM):
    with pytest.raises(ValueError, match="greedy"):
        tiny_lm.generate(["x"], {"until": [], "do_sample": True, "temperature": 0.7})


def test_render_prompt_remembers_the_items_routing_text(tiny_lm: MoCELM):
    rendered = tiny_lm.render_prompt("Be brief.", "Q2", " the input ", fewshot=[("Q1", "A1")])
    assert rendered.endswith("<|im_start|>user\nQ2\n\n the input <|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>" in rendered
    assert rendered.index("Be brief.") < rendered.index("Q1")
    # the item's own input side, exactly as the centroids were fit: no exemplar, no answer, no markup
    assert tiny_lm._routing_text[rendered] == routing_text("Be brief.", "Q2", " the input ") == "Be brief.\x1eQ2\nthe input"
    assert tiny_lm.clusters_for([rendered]) == [None]  # no router: no cluster


def test_random_group_scores_each_request_with_the_hash_of_its_context():
    from moce_model.model.config import MoCEConfig
    from moce_model.model.modeling import MoCEForCausalLM, random_group_ids

    tokenizer = build_tokenizer()
    config = MoCEConfig(variant="random_group", num_groups=4, experts_per_group=2, top_k=1, adapter_dim=4)
    model = MoCEForCausalLM.from_base(build_model(tokenizer), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.5)  # non-zero experts: the group changes the output
    lm = MoCELM.from_objects(model, tokenizer, batch_size=4, max_length=256)
    pairs = [("First context", " a long continuation"), ("Second, longer context here", " b"),
             ("Third", " some more words"), ("Fourth context!", " d e f g"), ("Fifth", " e")]
    expected = [int(random_group_ids(torch.tensor([lm.tok_encode(c)]), None, 4, seed=0)) for c, _ in pairs]
    assert len(set(expected)) > 1
    seen = []
    original = lm.model.forward
    lm.model.forward = lambda *args, **kwargs: seen.append(
        (args[0].tolist(), kwargs["group_ids"].tolist())) or original(*args, **kwargs)
    scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    lm.model.forward = original
    # a batch mixes groups, and each row gets the group of its own context
    assert any(len(set(groups)) > 1 for _, groups in seen)
    contexts = [lm.tok_encode(context) for context, _ in pairs]
    for rows, groups in seen:
        for row, group in zip(rows, groups):
            (owner,) = [i for i, tokens in enumerate(contexts) if row[:len(tokens)] == tokens]
            assert group == expected[owner]
    for (context, continuation), group, (logprob, _) in zip(pairs, expected, scored):
        whole = lm.tok_encode(context + continuation)
        n_context = len(lm.tok_encode(context))
        with torch.inference_mode():
            # the model's own choice when it sees the context alone: what training and generation hash
            logits = model(input_ids=torch.tensor([whole]),
                           prompt_mask=torch.tensor([[1] * n_context + [0] * (len(whole) - n_context)])).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        assert logprob == pytest.approx(float(sum(log_probs[i - 1, whole[i]] for i in range(n_context, len(whole)))),
                                        abs=1e-4)


def test_a_router_of_another_k_is_refused():
    from moce_model.model.config import MoCEConfig
    from moce_model.model.modeling import MoCEForCausalLM

    class ThreeClusters:
        num_clusters = 3

        def assign(self, texts):
            return np.zeros(len(texts), dtype=np.int64)

    tokenizer = build_tokenizer()
    config = MoCEConfig(variant="moce", num_clusters=2, experts_per_group=2, top_k=1, adapter_dim=4)
    model = MoCEForCausalLM.from_base(build_model(tokenizer), config).eval()
    with pytest.raises(ValueError, match="MoCELM router: the clustering has k=3 clusters but the 'moce' model has "
                                         "num_groups=2"):
        MoCELM.from_objects(model, tokenizer, router=ThreeClusters())
    with pytest.raises(ValueError, match="routes by cluster: give it a router"):
        MoCELM.from_objects(model, tokenizer)


def test_plain_model_dir_loads_without_router(tmp_path: Path):
    save_model_dir(tmp_path / "base")
    lm = MoCELM(pretrained=str(tmp_path / "base"), batch_size="4")
    assert lm.router is None and lm.prompt_format.name == "chat_template" and lm.batch_size == 4
    assert lm.generate([lm.render_prompt("", "hi")], {"until": [], "max_gen_toks": 3})
    with pytest.raises(FileNotFoundError, match="config.json"):
        MoCELM(pretrained=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------- routing, real MoCE model


@pytest.fixture(scope="module")
def routed_model_dir(tmp_path_factory) -> Path:
    return save_routed_model_dir(tmp_path_factory.mktemp("moce") / "merged")


def test_moce_dir_routes_each_request_by_its_input_side(routed_model_dir: Path):
    lm = MoCELM(pretrained=str(routed_model_dir), batch_size=4)
    assert lm.router is not None
    questions = ["Implement a Python function to reverse a string.", "Sam has 3 apples and buys 4 more. How many?",
                 "Write Python code that returns the maximum of a list.", "How many apples are 5 plus 9 apples?"]
    contexts = [lm.render_prompt("", q) for q in questions]
    assert lm.clusters_for(contexts) == [0, 1, 0, 1]

    # what the model is given equals running it directly with those cluster ids, and the group matters
    continuation = " The answer is 7."
    scored = lm.loglikelihood_with_counts([(c, continuation) for c in contexts], move_trailing_whitespace=False)
    for context, cluster, (logprob, _, _) in zip(contexts, [0, 1, 0, 1], scored):
        context_ids = lm.tok_encode(context)
        whole = lm.tok_encode(context + continuation)
        with torch.inference_mode():
            def score(group: int) -> float:
                logits = lm.model(input_ids=torch.tensor([whole]), cluster_ids=torch.tensor([group])).logits[0]
                log_probs = torch.log_softmax(logits, -1)
                return float(sum(log_probs[i - 1, whole[i]] for i in range(len(context_ids), len(whole))))
            assert logprob == pytest.approx(score(cluster), abs=1e-4)
            assert abs(score(1 - cluster) - logprob) > 1e-3

    generated = lm.generate(contexts, {"until": [], "max_gen_toks": 6})
    singles = [lm.generate([c], {"until": [], "max_gen_toks": 6})[0] for c in contexts]
    assert generated == singles


def test_router_embeds_the_routing_text_not_the_template(routed_model_dir: Path):
    lm = MoCELM(pretrained=str(routed_model_dir))
    seen: list[list[str]] = []
    real_router = lm.router

    class Recording:
        def assign(self, texts):
            seen.append(list(texts))
            return real_router.assign(texts)

    lm.router = Recording()
    context = lm.render_prompt("", "Write a Python function.", assistant_prefix="```python\n")
    assert lm.clusters_for([context, context]) == [0, 0]
    lm.clusters_for([context])  # cached: embedded once
    assert seen == [["Write a Python function."]]
    assert json.loads((routed_model_dir / "embedder.json").read_text())["model"] == MINILM_SPEC["model"]


def test_batch_size_auto_runs_each_group_with_its_clusters(routed_model_dir: Path):
    """HFLM's batch-size search calls the model too: it runs with a group, like every other call."""
    lm = MoCELM(pretrained=str(routed_model_dir), batch_size="auto", max_batch_size=4, max_length=96)
    fixed = MoCELM(pretrained=str(routed_model_dir), router=lm.router, batch_size=2, max_length=96)
    questions = ["Implement a Python function to reverse a string.", "Sam has 3 apples and buys 4 more. How many?"]
    contexts = [lm.render_prompt("", q) for q in questions]
    assert [fixed.render_prompt("", q) for q in questions] == contexts
    scored = lm.loglikelihood_with_counts([(c, " 7") for c in contexts])
    expected = fixed.loglikelihood_with_counts([(c, " 7") for c in contexts])
    assert [logprob for logprob, _, _ in scored] == pytest.approx([logprob for logprob, _, _ in expected], abs=1e-4)
    kwargs = {"until": [], "max_gen_toks": 4}
    assert lm.generate(contexts, kwargs) == fixed.generate(contexts, kwargs)
    rolling = [Instance("loglikelihood_rolling", {}, (c,), i) for i, c in enumerate(contexts)]
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(fixed.loglikelihood_rolling(rolling), abs=1e-3)
    assert lm.batch_size == "auto"
