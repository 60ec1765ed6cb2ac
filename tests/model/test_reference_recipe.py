"""The `paper-reference` experiment (the authors' recipe) and each option that tells it apart from the project's
defaults, checked where it takes effect: the model config, the layers, the training config, the embedder's input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moce_model.clustering.embedding import Embedder, EmbedderSpec
from moce_model.data.instructions import routing_text
from moce_model.experiment import ExperimentError, load_experiment
from moce_model.model.ac_router import adaptive_clustering_token_weights
from moce_model.model.config import ExpertLayout, MoCEConfig
from tests.experiment.test_experiment import _my_experiment, _write
from tests.model.test_modeling import batch_ids, tiny_moce


def test_paper_reference_pins_the_authors_recipe(monkeypatch):
    monkeypatch.delenv("MOCE_NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("MOCE_NNODES", raising=False)
    experiment = load_experiment("paper-reference")
    assert experiment.base_model.model_id == "meta-llama/Llama-2-7b-chat-hf"
    assert (experiment.embedder.kind, experiment.embedder.instruction_source) == ("instructor", "system_prompt")
    assert experiment.clustering.k == 4
    training = experiment.training_config()
    # 16 per device x 16 accumulation x 4 GPUs = 1,024 sequences per optimiser step.
    assert (training.per_device_batch_size, training.grad_accum, experiment.processes) == (16, 16, 4)
    assert (training.lora_dropout, training.lr, training.max_grad_norm) == (0.1, 2e-4, 0.3)
    layout = experiment.experts.layout()
    assert (layout.adapter_dropout, layout.aux_loss_coef) == (0.1, 0.0)
    assert (layout.ac_start_layer, layout.ac_statistics, layout.ac_scoring) == (2, "batch", "normalised_experts")
    shots = {spec.name: (spec.lm_eval_task, spec.num_fewshot) for spec in experiment.benchmark_specs()}
    assert shots["mbpp"] == ("mbpp", 4) and shots["math"] == ("minerva_math", 4) and shots["humaneval"] == ("humaneval", 0)


def test_global_batch_sets_the_accumulation_from_the_process_count(monkeypatch):
    monkeypatch.setenv("MOCE_NPROC_PER_NODE", "8")
    assert load_experiment("paper-reference").training_config().grad_accum == 8  # 1024 / (16 x 8)
    monkeypatch.setenv("MOCE_NPROC_PER_NODE", "3")
    with pytest.raises(ExperimentError, match=r"training\.global_batch.*not a multiple of .* 16 x 3 = 48"):
        load_experiment("paper-reference")


def test_global_batch_and_grad_accum_together_are_refused(tmp_path):
    path = _write(tmp_path / "experiments" / "both.yaml",
                  _my_experiment(training={"global_batch": 16, "overrides": {"grad_accum": 2}}))
    with pytest.raises(ExperimentError, match=r"(?s)both\.yaml: .*training = .*overrides\.grad_accum is derived from global_batch"):
        load_experiment(path)


@pytest.mark.parametrize("variant", ["moce", "pesc", "random_group"])
def test_the_layout_options_reach_the_model_config_and_its_layers(variant):
    layout = ExpertLayout(experts_per_group=4, single_group_experts=4, adapter_dim=8, adapter_dropout=0.1,
                          aux_loss_coef=0.0, balance_loss_scope="all", token_router="ac", ac_start_layer=1,
                          ac_statistics="batch", ac_scoring="normalised_experts")
    config = MoCEConfig.for_variant(variant, layout, num_clusters=3)
    assert (config.adapter_dropout, config.aux_loss_coef, config.balance_loss_scope) == (0.1, 0.0, "all")
    assert (config.ac_start_layer, config.ac_statistics, config.ac_scoring) == (1, "batch", "normalised_experts")
    assert not config.balance_loss_enabled
    model = tiny_moce(variant=variant, **{k: getattr(config, k) for k in (
        "adapter_dropout", "token_router", "ac_start_layer", "ac_statistics", "ac_scoring")})
    blocks = sorted(model.moce_blocks(), key=lambda block: block.layer_index)
    assert all(block.moce_experts.dropout.p == 0.1 for block in blocks)
    assert [block.moce_experts.normalise_router for block in blocks] == [False, True]
    assert [block.ac_statistics for block in blocks] == ["batch", "batch"]


def _aux_loss(**overrides):
    model = tiny_moce(**overrides).train()
    ids = batch_ids()
    model(ids, labels=ids, cluster_ids=torch.tensor([0, 1, 2])).loss.backward()
    return model.last_aux_loss()


def test_balance_loss_off_adds_no_term_and_scope_all_pools_the_groups():
    assert _aux_loss(aux_loss_coef=0.0) is None
    per_group = _aux_loss(aux_loss_coef=0.01)
    pooled = _aux_loss(aux_loss_coef=0.01, balance_loss_scope="all")
    assert per_group is not None and pooled is not None
    # Three sequences in three groups: balancing each group alone is not balancing the pooled expert slots.
    assert not torch.allclose(per_group, pooled)
    # With every sequence in one group the two scopes are the same loss.
    model_group = _aux_loss_one_group("group")
    model_all = _aux_loss_one_group("all")
    torch.testing.assert_close(model_group, model_all)


def _aux_loss_one_group(scope: str):
    model = tiny_moce(aux_loss_coef=0.01, balance_loss_scope=scope).train()
    ids = batch_ids()
    model(ids, labels=ids, cluster_ids=torch.tensor([1, 1, 1])).loss.backward()
    return model.last_aux_loss()


def test_ac_start_layer_decides_which_blocks_score_with_ac_weights():
    ids, clusters = batch_ids(), torch.tensor([0, 1, 2])
    linear = tiny_moce()
    with torch.no_grad():
        expected = linear(ids, cluster_ids=clusters).logits
        outputs = {}
        for start in (1, 2):
            model = tiny_moce(token_router="ac", ac_start_layer=start)
            model.load_state_dict(linear.state_dict())
            outputs[start] = model(ids, cluster_ids=clusters).logits
    # Two blocks: from block 2 on there is none, so the model is the linear-router one; from block 1 it is not.
    torch.testing.assert_close(outputs[2], expected)
    assert not torch.allclose(outputs[1], expected)


def test_ac_batch_statistics_pool_the_rows_of_a_group_and_sequence_statistics_do_not():
    torch.manual_seed(0)
    tokens = torch.randn(2, 6, 8)
    previous = torch.randint(0, 3, (2, 6))
    groups = torch.tensor([1, 1])
    batch = adaptive_clustering_token_weights(tokens, previous, None, 3, "batch", groups, num_groups=2)
    # Both rows in one group: the batch statistics are those of one sequence holding all their tokens.
    joined = adaptive_clustering_token_weights(tokens.reshape(1, 12, 8), previous.reshape(1, 12), None, 3)
    torch.testing.assert_close(batch.reshape(1, 12, 8), joined)
    alone = adaptive_clustering_token_weights(tokens[:1], previous[:1], None, 3, "batch", groups[:1], num_groups=2)
    per_sequence = adaptive_clustering_token_weights(tokens, previous, None, 3, "sequence")
    assert not torch.allclose(alone[0], batch[0])  # batch statistics: a row's weights depend on its companions
    torch.testing.assert_close(per_sequence[:1], adaptive_clustering_token_weights(tokens[:1], previous[:1], None, 3))
    # Rows of another group do not enter a group's statistics.
    other = adaptive_clustering_token_weights(tokens, previous, None, 3, "batch", torch.tensor([1, 0]), num_groups=2)
    torch.testing.assert_close(other[0], alone[0])


@pytest.mark.parametrize("scoring", ["router", "normalised_experts"])
def test_normalised_expert_scoring_ignores_the_scale_of_router_rows(scoring):
    ids, clusters = batch_ids(), torch.tensor([0, 1, 2])
    model = tiny_moce(token_router="ac", ac_start_layer=1, ac_scoring=scoring)
    block = sorted(model.moce_blocks(), key=lambda b: b.layer_index)[1]
    with torch.no_grad():
        before = model(ids, cluster_ids=clusters).logits
        # Each router row of the AC block scaled by its own positive factor.
        factors = torch.rand(block.moce_experts.router.shape[:2] + (1,), generator=torch.Generator().manual_seed(3))
        block.moce_experts.router.mul_(factors * 3 + 0.5)
        after = model(ids, cluster_ids=clusters).logits
    if scoring == "normalised_experts":
        torch.testing.assert_close(after, before)
    else:
        assert not torch.allclose(after, before)


class _RecordingModel:
    """Stands in for a SentenceTransformer: records each encode call's prompt and texts."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, list[str]]] = []

    def get_embedding_dimension(self) -> int:
        return 4

    def encode(self, texts, prompt=None, **_):
        self.calls.append((prompt, list(texts)))
        return np.stack([np.array([len(t) + 1.0, len(prompt or "") + 1.0, 1.0, 1.0]) for t in texts])


def test_system_prompt_instruction_source_gives_each_item_its_own_instruction():
    texts = [routing_text("Be brief.", "Add 2 and 3.", None), routing_text(None, "Sort [3, 1].", None),
             routing_text("Be brief.", "Reverse:", "a b")]
    model = _RecordingModel()
    Embedder(EmbedderSpec(model="m", kind="instructor", instruction_source="system_prompt"), model, "cpu").encode(texts)
    assert sorted(model.calls, key=str) == sorted([("Be brief. ", ["Add 2 and 3.", "Reverse:\na b"]),
                                                   (None, ["Sort [3, 1]."])], key=str)
    # E5 as the reference: system prompt and request concatenated, no `query: ` prefix.
    e5 = EmbedderSpec(model="m", kind="e5", instruction_source="system_prompt")
    assert e5.model_inputs(texts[:1]) == [(None, "Be brief.Add 2 and 3.")]
    # The project's default: one fixed instruction, the system prompt a line of the text.
    fixed = EmbedderSpec(model="m", kind="instructor", instruction="Represent it:")
    assert fixed.model_inputs(texts[:1]) == [("Represent it: ", "Be brief.\nAdd 2 and 3.")]
    assert EmbedderSpec(model="m", kind="e5").model_inputs(texts[:1]) == [("query: ", "Be brief.\nAdd 2 and 3.")]
    assert "instruction_source" not in fixed.to_dict() and e5.to_dict()["instruction_source"] == "system_prompt"
