"""QLoRA as the paper runs it (NF4 base, bf16 compute, gradient checkpointing), on bitsandbytes' CPU backend, and a
merge that reproduces the model as it was trained: LoRA folded into the dequantised NF4 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moce_model.merging import (
    compare_merged_to_unmerged,
    max_logit_difference,
    merge_to_directory,
    probe_batch,
)
from moce_model.model.adapters import load_trained
from moce_model.model.config import MoCEConfig  # noqa: E402
from moce_model.model.modeling import MoCEForCausalLM  # noqa: E402
from moce_model.training import TrainingConfig, build_model, train  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402
from tests.training.test_training import make_rows  # noqa: E402


def rehearsal_config(**overrides) -> TrainingConfig:
    # The paper's preset at toy scale; paged AdamW needs CUDA, so plain AdamW on a CPU.
    # Compilation is left out: it costs a minute of CI per model and is covered by the benchmark tests.
    values = dict(max_steps=4, per_device_batch_size=2, grad_accum=2, max_length=96, lora_r=4, lora_alpha=8,
                  warmup_steps=1, save_steps=100, logging_steps=1, lr=5e-3, compile=False)
    if not torch.cuda.is_available():
        values["optim"] = "adamw_torch"
    values.update(overrides)
    return TrainingConfig.paper(**values)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    base_dir = save_tiny_llama(root / "base", hidden_size=64)
    rows = make_rows(16)
    clusters = {row_id: i % 2 for i, row_id in enumerate(rows["id"].to_list())}
    config = MoCEConfig(variant="moce", num_groups=2, experts_per_group=2, router_top_k=1, adapter_dim=4)
    result = train(base_dir, rows, clusters, config, rehearsal_config(), root / "run", num_clusters=2)
    return base_dir, result, root


def test_qlora_build_quantises_the_base_and_keeps_trainable_weights_in_float32(tmp_path) -> None:
    import bitsandbytes as bnb

    base_dir = save_tiny_llama(tmp_path / "base", hidden_size=64)
    config = MoCEConfig(variant="moce", num_groups=2, experts_per_group=2, router_top_k=1, adapter_dim=4)
    model = build_model(base_dir, config, rehearsal_config())
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # every projection of both layers
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert any("router" in name for name in trainable) and any("lora_A" in name for name in trainable)


def test_qlora_training_lowers_the_loss(qlora_run) -> None:
    _, result, _ = qlora_run
    assert result.global_step == 4
    losses = [loss for _, loss in result.loss_history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_merge_reproduces_the_trained_qlora_model_and_a_full_precision_reload_does_not(qlora_run) -> None:
    base_dir, result, root = qlora_run
    merged_dir = merge_to_directory(load_trained(result.artifact_dir, base_dir, dequantize=True), root / "merged",
                                    centroids=np.eye(2, 8, dtype=np.float32))
    check = compare_merged_to_unmerged(merged_dir, result.artifact_dir, base_dir)
    assert check.passed and not check.near_ties, check.describe()

    # What the merge did before: LoRA folded into a bf16 reload of the original weights, not the NF4 ones.
    trained = load_trained(result.artifact_dir, base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(MoCEForCausalLM.from_base(base, trained.get_base_model().config),
                                         result.artifact_dir).merge_and_unload()
    ids = probe_batch(trained.get_base_model().config.vocab_size, batch_size=2, seq_len=16)
    groups = torch.tensor([0, 1])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert max_logit_difference(reloaded, trained, ids, groups) > 3 * max_logit_difference(merged, trained, ids, groups)
