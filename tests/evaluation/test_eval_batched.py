"""Evaluation batches that mix routes: every request scores and generates exactly as it does alone, with its own
route reaching the model in its own row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.routes import SoftRoute
from moce_model.evaluation.scoring import score_pairs
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from tests.tiny_models import make_char_tokenizer, save_tiny_llama

QUESTIONS = ["What is 1 + 1?", "Write a long Python function that sorts a list, please", "hi", "Reverse: a b c",
             "Name three colours.", "Translate 'cat' to French", "2 * 21 = ?", "Summarise: the sky is blue today"]


class LengthRouter:
    """Four clusters by the routing text's length: neighbouring items land in different clusters."""

    num_clusters = 4

    def assign(self, texts):
        return np.array([len(text) % 4 for text in texts])


def routed_lm(directory: Path, batch_size: int) -> MoCELM:
    base = AutoModelForCausalLM.from_pretrained(save_tiny_llama(directory))
    config = MoCEConfig(variant="moce", num_clusters=4, experts_per_group=2, router_top_k=1, adapter_dim=8)
    model = MoCEForCausalLM.from_base(base, config).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=1.0)  # groups that change the output
    return MoCELM.from_objects(model, make_char_tokenizer(), router=LengthRouter(), batch_size=batch_size,
                               max_length=256)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> MoCELM:
    return routed_lm(tmp_path_factory.mktemp("tiny"), batch_size=8)


def recorded_cluster_ids(lm: MoCELM):
    """The cluster ids of every model call with more than one token per row (scoring and prefill)."""
    calls: list[list] = []

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1 and "cluster_ids" in kwargs:
            calls.append(kwargs["cluster_ids"].tolist())

    return calls, lm.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_batched_held_out_loss_equals_each_item_alone_with_clusters_mixed(lm: MoCELM):
    contexts = [lm.render_prompt("", q) for q in QUESTIONS]
    pairs = [(c, f"The answer to item {i} is here.<|im_end|>") for i, c in enumerate(contexts)]
    clusters = lm.clusters_for(contexts)
    assert len(set(clusters)) == 4
    calls, handle = recorded_cluster_ids(lm)
    try:
        batched = lm.loglikelihood_with_counts(pairs, move_trailing_whitespace=False)
    finally:
        handle.remove()
    assert len(calls) == 1 and sorted(calls[0]) == sorted(clusters)  # one call, all four clusters in it
    lm.batch_size = 1
    try:
        alone = lm.loglikelihood_with_counts(pairs, move_trailing_whitespace=False)
    finally:
        lm.batch_size = 8
    assert [n for _, n, _ in batched] == [n for _, n, _ in alone]
    assert max(abs(a[0] - b[0]) for a, b in zip(batched, alone)) < 1e-5
    # and an item alone is scored by its own cluster's group: another cluster gives another score
    context, continuation = pairs[0]
    tokens = lm.tok_encode(context + continuation)
    n_context = len(lm.tok_encode(context))

    def logprob(cluster: int) -> float:
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([tokens]), cluster_ids=torch.tensor([cluster])).logits[0]
        log_probs = torch.log_softmax(logits.float(), -1)
        return float(sum(log_probs[i - 1, tokens[i]] for i in range(n_context, len(tokens))))

    assert batched[0][0] == pytest.approx(logprob(clusters[0]), abs=1e-4)
    assert abs(logprob((clusters[0] + 1) % 4) - batched[0][0]) > 1e-3


def test_soft_and_hard_rows_in_one_batch_score_as_alone(lm: MoCELM):
    encoded = [(f"ctx{i}", lm.tok_encode(f"Context number {i}: " + "x" * i), lm.tok_encode(f" answer {i} done"))
               for i in range(6)]
    routes = [0, SoftRoute((1, 2), (0.7, 0.3)), 3, SoftRoute((3, 0), (0.5, 0.5)), 2, 1]
    batched = score_pairs(lm, encoded, routes, batch_size=6)
    alone = score_pairs(lm, encoded, routes, batch_size=1)
    assert max(abs(a[0] - b[0]) for a, b in zip(batched, alone)) < 1e-5
    assert [a[1] for a in batched] == [b[1] for b in alone]
    # the soft route is not its nearest cluster's
    hard = score_pairs(lm, encoded[1:2], [1], batch_size=1)
    assert abs(hard[0][0] - batched[1][0]) > 1e-4


def test_batched_greedy_generation_equals_each_prompt_alone_with_clusters_mixed(lm: MoCELM):
    contexts = [lm.render_prompt("", q) for q in QUESTIONS]
    kwargs = {"until": [], "max_gen_toks": 10}
    calls, handle = recorded_cluster_ids(lm)
    try:
        batched = lm.generate(contexts, kwargs)
    finally:
        handle.remove()
    assert len(calls) == 1 and len(set(calls[0])) == 4  # one batch, prefilled with all four clusters
    singles = [lm.generate([context], kwargs)[0] for context in contexts]
    assert batched == singles
    assert len(set(batched)) > 1


def test_equal_prompts_with_different_routes_run_apart(lm: MoCELM):
    """Two requests with the same tokens but different routes cannot be told apart in a batch: each gets its own."""
    context = lm.render_prompt("", "same prompt")
    encoded = [(context, *lm._encoded_pair(context, " yes"))] * 2
    fed = [lm._fed_tokens(c, t) for _, c, t in encoded]
    seen: list[list] = []

    def run(subset):
        seen.append([lm._row_routes[key] for key in {k: None for k in fed}])
        return lm._loglikelihood_tokens(subset, disable_tqdm=True)

    scored = lm._by_rows(encoded, [0, 1], fed, run)
    assert seen == [[0], [1]]
    assert scored[0][0] == pytest.approx(score_pairs(lm, encoded[:1], [0], 1)[0][0], abs=1e-5)
    assert scored[1][0] == pytest.approx(score_pairs(lm, encoded[:1], [1], 1)[0][0], abs=1e-5)
    assert abs(scored[0][0] - scored[1][0]) > 1e-4
