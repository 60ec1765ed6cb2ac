"""The model that training steps: the frozen base (fp32, bf16 or QLoRA's NF4) + routed adapter experts + LoRA."""

from __future__ import annotations

import os
from typing import Any

import torch

from moce_model.model.adapters import add_lora
from moce_model.model.base_model import check_supported_architecture, load_base_model
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.training.config import TrainingConfig


def build_model(
    base_model_dir: str | os.PathLike, moce_config: MoCEConfig | None, config: TrainingConfig
) -> torch.nn.Module:
    """Base model (optionally 4-bit NF4) + routed adapter experts + LoRA; only adapters/experts/routers train.

    With moce_config=None the base model gets LoRA only (the plain fine-tuning baseline).
    """
    from peft import LoraConfig, get_peft_model

    config = config.for_this_machine()

    base = load_base_model(base_model_dir, bf16=config.bf16, qlora=config.qlora)
    check_supported_architecture(base)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.gradient_checkpointing)

    lora_targets = list(config.lora_targets)
    if moce_config is None:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    else:
        moce = MoCEForCausalLM.from_base(base, moce_config)
        for block in moce.moce_blocks():
            block.moce_experts.float()  # trainable weights stay float32 (bf16 autocast computes in bf16)
        model = add_lora(
            moce,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=lora_targets,
        )
    if config.compile:
        # Static shapes: on CUDA (torch 2.11, QLoRA, bf16) the first recompile with dynamic sequence lengths
        # failed in AOTAutograd's partitioner ("Node ... was invalid, but is output") at the second step. The
        # collator pads to `compiled_length_bucket` instead, so a run sees a handful of shapes.
        compile_decoder_layers(model, dynamic=False)
    return model


def compiled_length_bucket(max_length: int) -> int:
    """Sequence lengths a compiled run pads to a multiple of: a quarter of max_length (rounded up to 8), so at
    most four lengths, times two batch sizes (full and the epoch's last), stay within dynamo's recompile limit
    of 8 while a short batch is not padded to max_length."""
    return max(8, -(-max_length // 4 // 8) * 8)


def compile_decoder_layers(model: torch.nn.Module, **compile_kwargs: Any) -> int:
    """Compile every decoder layer in place (regional compilation, as transformers and accelerate recommend):
    the layers share one graph, so compilation costs about one layer, and parameter names, peft wrappers,
    checkpoints and gradient checkpointing (which wraps each layer's call) are unchanged. Returns the count."""
    layers = [module for module in model.modules() if isinstance(getattr(module, "mlp", None), torch.nn.Module)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layer with an `mlp` to compile")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def count_trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


