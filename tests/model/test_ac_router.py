"""The Adaptive Clustering (AC) token router (`token_router: ac`): its feature weights on constructed clusters,
padding, the routing it changes, and the model-level guarantees (batching, checkpointing, merging, config)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moce_model.merging import merge_to_directory
from moce_model.model.ac_router import (
    AC_DISPERSION_FLOOR,
    AC_WEIGHT_CEILING,
    adaptive_clustering_feature_weights,
    adaptive_clustering_token_weights,
)
from moce_model.model.config import ExpertLayout, MoCEConfig
from moce_model.model.experts import AdapterExperts
from moce_model.model.modeling import MoCEForCausalLM
from tests.model.test_modeling import batch_ids, tiny_moce
from tests.tiny_models import save_tiny_llama

# Expert 0's tokens are tight along feature 0 and spread along feature 1; expert 1's the other way round.
EXPERT_0_TOKENS = [[1.0, 0.0], [1.2, 2.0], [0.8, -2.0]]
EXPERT_1_TOKENS = [[0.0, 1.0], [3.0, 1.1], [-3.0, 0.9]]


def hand_computed_weights(
    tokens: list[list[float]], labels: list[int], experts: int, clip: bool = True
) -> list[list[float]]:
    """The AC weights written out with loops over plain floats: mean absolute deviation per expert and feature,
    inverted, clipped at AC_WEIGHT_CEILING x the mean weight, each feature divided by its mean over the experts
    that hold tokens."""
    features = len(tokens[0])
    present = [e for e in range(experts) if e in labels]
    raw = {}
    for e in present:
        members = [t for t, label in zip(tokens, labels) if label == e]
        for q in range(features):
            centre = sum(m[q] for m in members) / len(members)
            dispersion = sum(abs(m[q] - centre) for m in members) / len(members)
            raw[e, q] = 1.0 / (dispersion + AC_DISPERSION_FLOOR)
    ceiling = AC_WEIGHT_CEILING * sum(raw.values()) / len(raw) if clip else float("inf")
    clipped = {key: min(value, ceiling) for key, value in raw.items()}
    weights = [[1.0] * features for _ in range(experts)]
    for q in range(features):
        feature_mean = sum(clipped[e, q] for e in present) / len(present)
        for e in present:
            weights[e][q] = clipped[e, q] / feature_mean
    return weights


def test_feature_weights_favour_the_feature_an_expert_is_tight_along() -> None:
    tokens = torch.tensor([EXPERT_0_TOKENS + EXPERT_1_TOKENS])
    labels = torch.tensor([[0, 0, 0, 1, 1, 1]])
    weights = adaptive_clustering_feature_weights(tokens, labels, None, experts_per_group=3)
    assert weights.shape == (1, 3, 2) and weights.dtype == torch.float32
    expected = torch.tensor(hand_computed_weights(tokens[0].tolist(), labels[0].tolist(), 3))
    torch.testing.assert_close(weights[0], expected)
    # Expert 0 is tight along feature 0 (MAD 0.133 vs 1.333): its weight there is large, along feature 1 small;
    # expert 1 the reverse. Expert 2 holds no token: weight 1, it scales nobody.
    assert weights[0, 0, 0] > 1.8 and weights[0, 0, 1] < 0.1
    assert weights[0, 1, 1] > 1.8 and weights[0, 1, 0] < 0.2
    torch.testing.assert_close(weights[0, 2], torch.ones(2))
    # Normalised per feature: mean 1 over the experts that hold tokens.
    torch.testing.assert_close(weights[0, :2].mean(dim=0), torch.ones(2))


def test_feature_weights_clip_a_constant_feature() -> None:
    # Expert 0 is constant along feature 2 (raw weight 1 / 1e-4), expert 1 nearly so (MAD 0.001, weight ~909):
    # the ceiling (10x the mean weight) caps expert 0's, which lowers its share of the feature.
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 8, 16, generator=generator)
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    tokens[0, :4, 2] = 5.0
    tokens[0, 4:, 2] = torch.tensor([5.0, 5.001, 4.999, 5.002])
    weights = adaptive_clustering_feature_weights(tokens, labels, None, experts_per_group=2)
    expected = torch.tensor(hand_computed_weights(tokens[0].tolist(), labels[0].tolist(), 2))
    unclipped = torch.tensor(hand_computed_weights(tokens[0].tolist(), labels[0].tolist(), 2, clip=False))
    torch.testing.assert_close(weights[0], expected)
    assert unclipped[0, 2] - weights[0, 0, 2] > 0.1  # the ceiling bit
    assert torch.isfinite(weights).all()


def test_padding_tokens_do_not_change_the_weights() -> None:
    real = torch.tensor([EXPERT_0_TOKENS + EXPERT_1_TOKENS])
    labels = torch.tensor([[0, 0, 0, 1, 1, 1]])
    alone = adaptive_clustering_feature_weights(real, labels, None, experts_per_group=2)
    # Far-away padding tokens carrying both labels: they would move every centre and dispersion if counted.
    padded = torch.cat([real, torch.tensor([[[50.0, -40.0], [-30.0, 70.0], [9.0, 9.0]]])], dim=1)
    padded_labels = torch.cat([labels, torch.tensor([[0, 1, 1]])], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(adaptive_clustering_feature_weights(padded, padded_labels, mask, 2), alone)
    assert not torch.allclose(adaptive_clustering_feature_weights(padded, padded_labels, None, 2), alone)
    torch.testing.assert_close(adaptive_clustering_feature_weights(real, labels, torch.ones_like(labels), 2), alone)


def test_ac_router_routes_a_token_by_its_cluster_tight_feature() -> None:
    """A token of expert 0's cluster at (0.3, 0.5): the linear router (expert e scores feature e) sends it to
    expert 1, whose feature is larger; the AC router weighs feature 0, along which cluster 0 is tight, and
    feature 1, along which it is spread, and sends it to expert 0."""
    experts = AdapterExperts(hidden_size=2, num_groups=1, experts_per_group=2, adapter_dim=1, top_k=1, scaling=1.0,
                             dropout=0.0)
    with torch.no_grad():
        experts.router.copy_(torch.eye(2).unsqueeze(0))
    query = [0.3, 0.5]
    x = torch.tensor([EXPERT_0_TOKENS + [query] + EXPERT_1_TOKENS])
    previous = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    group_ids = torch.tensor([0])
    _, linear = experts(x, x, group_ids)
    weights = adaptive_clustering_token_weights(x, previous, None, 2)
    _, adaptive = experts(x, x, group_ids, weights)
    assert linear.top_experts[0, 3, 0] == 1
    assert adaptive.top_experts[0, 3, 0] == 0
    # The query's weights are its cluster's row: the other tokens of cluster 0 share it.
    torch.testing.assert_close(weights[0, 3], weights[0, 0])
    assert weights[0, 3, 0] > 1.5 and weights[0, 3, 1] < 0.2
    # Likewise cluster 1's token (3.0, 1.1), far out along the feature its cluster is spread along: the linear
    # router sends it to expert 0, the AC router keeps the whole cluster on expert 1.
    assert linear.top_experts[0, 4:, 0].tolist() == [1, 0, 1]
    assert adaptive.top_experts[0, 4:, 0].tolist() == [1, 1, 1]


def routing_of_each_block(model: MoCEForCausalLM, ids: torch.Tensor, **kwargs) -> list:
    routings = []
    hooks = [b.moce_experts.register_forward_hook(lambda m, i, o: routings.append(o[1])) for b in model.moce_blocks()]
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return routings


@pytest.mark.parametrize("variant", ["moce", "pesc"])
def test_first_block_routes_plainly_and_later_blocks_by_the_previous_assignments(variant: str) -> None:
    linear = tiny_moce(variant)
    adaptive = tiny_moce(variant, token_router="ac")
    adaptive.load_state_dict(linear.state_dict())
    ids = batch_ids()
    clusters = torch.tensor([0, 1, 2])
    plain = routing_of_each_block(linear, ids, cluster_ids=clusters)
    routed = routing_of_each_block(adaptive, ids, cluster_ids=clusters)
    assert torch.equal(routed[0].logits, plain[0].logits)  # the first MoE block has no previous layer
    assert not torch.allclose(routed[1].logits, plain[1].logits)
    # Block 1's logits are the linear router's on x * M_{k*}, k* = block 0's top-1 expert of each token.
    block = adaptive.moce_blocks()[1]
    inputs = []
    hook = block.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        adaptive(ids, cluster_ids=clusters)
    hook.remove()
    x = inputs[0]
    weights = adaptive_clustering_token_weights(x, routed[0].top_experts[..., 0], None, 4)
    router = block.moce_experts.router.index_select(0, routed[1].group_ids)
    torch.testing.assert_close(routed[1].logits, torch.bmm(x * weights, router.transpose(1, 2)))


def test_batched_equals_one_sequence_at_a_time() -> None:
    model = tiny_moce(token_router="ac")
    ids = batch_ids(batch=3, seq_len=10)
    lengths = [10, 6, 3]
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    clusters = torch.tensor([0, 1, 2])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, cluster_ids=clusters).logits
        for row, length in enumerate(lengths):
            alone = model(ids[row:row + 1, :length], cluster_ids=clusters[row:row + 1]).logits
            torch.testing.assert_close(batched[row:row + 1, :length], alone, atol=1e-5, rtol=1e-5)


def test_checkpointed_recomputation_routes_like_the_plain_forward() -> None:
    model = tiny_moce("pesc", token_router="ac").train()
    ids = batch_ids()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    expected_aux = model.last_aux_loss()
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and any("router" in name for name in got)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    torch.testing.assert_close(model.last_aux_loss(), expected_aux)


@pytest.mark.parametrize("variant", ["moce", "pesc"])
def test_merged_model_reloads_as_ac_and_gives_the_same_logits(variant: str, tmp_path) -> None:
    base_dir = save_tiny_llama(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = MoCEConfig.for_variant(
        variant, ExpertLayout(experts_per_group=4, single_group_experts=4, router_top_k=2, adapter_dim=8,
                              token_router="ac"), num_clusters=3)
    model = MoCEForCausalLM.from_base(base, config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.5)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(4))
    clusters = torch.tensor([0, 1, 2])
    with torch.no_grad():
        expected = model(ids, cluster_ids=clusters).logits
    centroids = None
    if config.needs_centroids:
        centroids = np.eye(3, 8)
    out = merge_to_directory(model, tmp_path / "merged", centroids=centroids)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.token_router == "ac"
    assert "adaptive-clustering (AC) router" in (out / "README.md").read_text()
    with torch.no_grad():
        got = merged(ids, cluster_ids=clusters).logits
        reloaded_as_linear = AutoModelForCausalLM.from_pretrained(out, token_router="linear").eval()
        as_linear = reloaded_as_linear(ids, cluster_ids=clusters).logits
    torch.testing.assert_close(got, expected)
    # The reload really routes adaptively: the same weights under the linear router give other logits.
    assert not torch.allclose(as_linear, expected)


def test_config_round_trip_and_clear_errors(tmp_path) -> None:
    config = MoCEConfig(variant="pesc", experts_per_group=4, top_k=2, token_router="ac")
    assert config.adaptive_clustering_router and config.to_dict()["token_router"] == "ac"
    config.save_pretrained(tmp_path)
    loaded = MoCEConfig.from_pretrained(tmp_path)
    assert loaded.token_router == "ac" and loaded.adaptive_clustering_router
    assert MoCEConfig().token_router == "linear" and not MoCEConfig().adaptive_clustering_router
    with pytest.raises(ValueError, match=r"token_router must be one of \('linear', 'ac'\), got 'cosine'"):
        MoCEConfig(token_router="cosine")
    with pytest.raises(ValueError, match="'dense_adapter' with experts_per_group=1 has no token router"):
        MoCEConfig(variant="dense_adapter", token_router="ac")
    # An experiment-wide setting through for_variant: the variants without a token router leave it out.
    for variant in ("moce", "pesc", "random_group", "dense_adapter", "cluster_only"):
        built = MoCEConfig.for_variant(
            variant, ExpertLayout(experts_per_group=4, single_group_experts=4, router_top_k=2, token_router="ac"),
            num_clusters=3)
        assert built.adaptive_clustering_router == built.token_routing


def test_a_lone_token_gets_unit_weights() -> None:
    """What a cached decoding step sees (its new token only): no dispersion to compare, so the weights are 1 and
    the step routes with the plain linear router (the documented limit of the per-forward statistics)."""
    token = torch.randn(2, 1, 5, generator=torch.Generator().manual_seed(3))
    weights = adaptive_clustering_token_weights(token, torch.tensor([[2], [0]]), None, 4)
    torch.testing.assert_close(weights, torch.ones(2, 1, 5))


def test_run_fingerprint_tells_the_routers_apart_and_keeps_older_runs(tmp_path) -> None:
    from moce_model.training import TrainingConfig, run_fingerprint

    def fingerprint(moce_config: dict) -> str:
        return run_fingerprint(tmp_path, ["a", "b"], [0, 1], moce_config, TrainingConfig.demo())

    linear = MoCEConfig(variant="pesc", experts_per_group=4, top_k=2).to_dict()
    adaptive = MoCEConfig(variant="pesc", experts_per_group=4, top_k=2, token_router="ac").to_dict()
    # A checkpoint of a linear-router run must never be resumed as an AC run, nor the other way round.
    assert fingerprint(linear) != fingerprint(adaptive)
    # Runs fingerprinted before the setting existed (no token_router key) keep their fingerprint.
    before = {key: value for key, value in linear.items() if key != "token_router"}
    assert fingerprint(linear) == fingerprint(before)


def test_cached_generation_prefills_adaptively() -> None:
    """The prompt's prefill is a full forward (AC routing over the prompt); decode steps then see their new token
    only (unit weights, see test_a_lone_token_gets_unit_weights), which generation must get through."""
    model = tiny_moce(token_router="ac")
    model.generation_config.pad_token_id = 0
    ids = batch_ids(batch=3, seq_len=6)
    clusters = torch.tensor([2, 0, 1])
    with torch.no_grad():
        scored = model.generate(ids, attention_mask=torch.ones_like(ids), cluster_ids=clusters, max_new_tokens=4,
                                do_sample=False, return_dict_in_generate=True, output_logits=True)
        full_forward = model(ids, cluster_ids=clusters).logits[:, -1]
        linear = tiny_moce()
        as_linear = linear(ids, cluster_ids=clusters).logits[:, -1]
    assert scored.sequences.shape == (3, 10)
    torch.testing.assert_close(scored.logits[0], full_forward)
    assert not torch.allclose(full_forward, as_linear)  # the prefill did route adaptively


def test_regionally_compiled_layers_share_one_graph_and_match_eager() -> None:
    """Training's `compile: true` compiles each decoder layer in place; the AC router must not specialise the
    graph on the layer (a recompile per layer would exhaust dynamo's limit on a 30-layer model)."""
    from moce_model.training.model import compile_decoder_layers

    ids = batch_ids()
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0

    def loss_and_grads(model):
        model.train()
        out = model(ids, attention_mask=mask, labels=ids, cluster_ids=torch.tensor([0, 1, 2]), use_cache=False)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_logits, eager_grads = loss_and_grads(tiny_moce(token_router="ac"))
    torch._dynamo.reset()
    model = tiny_moce(token_router="ac")
    assert compile_decoder_layers(model, fullgraph=True, backend="aot_eager") == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits, grads = loss_and_grads(model)
    torch.testing.assert_close(logits, eager_logits)
    assert len(grads) == len(eager_grads)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected)
