"""The trained, unmerged artifact: LoRA on the base layers around the MoCE model, written and loaded as
peft adapters plus the experts (`modules_to_save`), with the record of how it was trained (QLoRA or not)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM

from moce_model.common.io import atomic_dir
from moce_model.model.base_model import load_base_model
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM

if TYPE_CHECKING:
    from peft import PeftModel

EXPERT_MODULE_NAME = "moce_experts"
CONFIG_FILE = "config.json"
# The paper's LoRA targets: attention and the base MLP projections.
PAPER_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(
    model: MoCEForCausalLM,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.1,
    target_modules: Sequence[str] = PAPER_LORA_TARGETS,
) -> PeftModel:
    """Wrap `model` with LoRA on the named base Linear layers; experts and routers are trained in full."""
    if not isinstance(model, MoCEForCausalLM):
        raise TypeError(f"add_lora expects a MoCEForCausalLM, got {type(model).__name__}")
    targets = list(target_modules)
    if EXPERT_MODULE_NAME in targets:
        raise ValueError(f"target_modules must name base Linear layers, not {EXPERT_MODULE_NAME!r}")
    # peft is imported where it is used: it loads bitsandbytes (about 3 s), which reading an experiment file or
    # evaluating a merged model never needs.
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[EXPERT_MODULE_NAME],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    lora_in_experts = [name for name, _ in peft_model.named_modules() if f"{EXPERT_MODULE_NAME}." in name and "lora_" in name]
    if lora_in_experts:
        raise ValueError(f"LoRA was injected into expert modules ({lora_in_experts[:3]}); narrow target_modules")
    return peft_model


def moce_model_of(model: torch.nn.Module) -> MoCEForCausalLM:
    """The MoCE model inside a (peft-wrapped) training model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, MoCEForCausalLM):
        raise TypeError(f"expected a (peft-wrapped) MoCEForCausalLM, got {type(inner).__name__}")
    return inner


def write_trained(model: PeftModel, directory: str | Path) -> Path:
    """Write the files of the unmerged trained artifact into `directory` (not atomically: for a caller that
    stages a larger artifact itself). See `save_trained`."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_trained expects the peft model returned by add_lora, got {type(model).__name__}")
    model.save_pretrained(directory, safe_serialization=True)
    moce_model_of(model).config.save_pretrained(directory)
    return Path(directory)


def save_trained(model: PeftModel, out_dir: str | Path) -> Path:
    """Write the unmerged trained artifact: `adapter_config.json`, `adapter_model.safetensors` (LoRA + experts +
    routers) and the MoCE `config.json`, atomically. The base weights are not copied."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_trained expects the peft model returned by add_lora, got {type(model).__name__}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        write_trained(model, staging)
    return out_dir


TRAINING_RECORD_FILE = "training.json"


def trained_with_qlora(trained_dir: str | Path) -> bool:
    """Whether the artifact was trained on an NF4-quantised base (its `training.json` says so)."""
    record = Path(trained_dir) / TRAINING_RECORD_FILE
    if not record.is_file():
        return False
    try:
        training_config = json.loads(record.read_text()).get("training_config") or {}
    except ValueError as error:
        raise ValueError(f"{record}: invalid JSON: {error}") from error
    return bool(training_config.get("qlora", False))


def load_trained(
    trained_dir: str | Path,
    base_model_dir: str | Path,
    is_trainable: bool = False,
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
) -> PeftModel:
    """Rebuild the unmerged trained model: base model from `base_model_dir`, experts + LoRA from `trained_dir`.

    An artifact trained with QLoRA gets the base it was trained on, NF4 with bf16 compute; with `dequantize`
    its weights are turned into the bf16 matrices that NF4 forward actually multiplied with, which is what a
    merge must fold LoRA into (a full-precision reload of the base would be another model than the trained one).
    """
    from peft import PeftModel

    trained_dir = Path(trained_dir)
    for name in (CONFIG_FILE, "adapter_config.json", "adapter_model.safetensors"):
        if not (trained_dir / name).is_file():
            raise FileNotFoundError(f"{trained_dir}: not a trained MoCE artifact (missing {name})")
    moce_config = MoCEConfig.from_pretrained(trained_dir)
    if trained_with_qlora(trained_dir):
        base = load_base_model(base_model_dir, bf16=True, qlora=True)
        if dequantize:
            base = base.dequantize()
    else:
        load_kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, **load_kwargs)
    trained_type = (moce_config.base_config or {}).get("model_type")
    if trained_type is not None and trained_type != base.config.model_type:
        raise ValueError(
            f"{trained_dir}/{CONFIG_FILE}: trained on a {trained_type!r} model but {base_model_dir} "
            f"holds a {base.config.model_type!r} model"
        )
    model = MoCEForCausalLM.from_base(base, moce_config)
    return PeftModel.from_pretrained(model, trained_dir, is_trainable=is_trainable)
