"""Training settings: one `TrainingConfig` shape, with the demo and paper presets and validated overrides.

Every caller (the training assets, the k sweep, an experiment's overrides, a launched job's spec) builds its
config as `TrainingConfig.preset(name).with_overrides(mapping)`, so a misspelt key or a value of the wrong
type fails at once, naming the key, instead of training with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moce_model.common.field_values import conformed

# transformers.TrainingArguments' names of fields this config names more briefly: the likeliest misspellings.
_TRAINING_ARGUMENTS_NAMES = {
    "learning_rate": "lr",
    "lr_scheduler_type": "lr_scheduler",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "grad_accum",
}

# Where the Trainer may report its logs: "none", or transformers' integrations by the names its `report_to` takes
# (transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK; tests/training/test_training.py checks the two
# lists agree). Written out so that checking a config does not import transformers.
REPORT_TO_INTEGRATIONS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
                          "mlflow", "neptune", "swanlab", "tensorboard", "trackio", "wandb")

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + ("gate_proj", "up_proj", "down_proj")


@dataclass
class TrainingConfig:
    lr: float = 1e-3
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 4
    num_epochs: float = 1.0
    max_steps: int | None = 40
    per_device_batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 192
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # LoRA on the MLP projections too costs only ~6% more CPU time per step than attention only (measured
    # on SmolLM2-135M), so the demo keeps the paper's targets.
    lora_targets: tuple[str, ...] = ALL_PROJECTIONS
    save_steps: int = 10
    save_total_limit: int | None = 2
    seed: int = 0
    bf16: bool = False
    # bf16 as above, but only on a device that computes bf16 natively (a CUDA GPU with bf16, a CPU with
    # AVX512-BF16 or AMX); float32 elsewhere. Without native support a CPU emulates bf16 matmuls: 8x slower than
    # float32 on the 2-core AVX2 machine (a 512x576 by 576x1536 matmul, 101 vs 12 ms).
    bf16_where_native: bool = False
    qlora: bool = False
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    deepspeed: str | None = None
    gradient_checkpointing: bool = False
    # Regional compilation: each decoder layer is compiled once (they share one graph), the rest stays eager.
    compile: bool = False
    group_by_length: bool = True
    # How rows become text (moce_model.data.prompt_format): `auto` is the tokenizer's chat template when it has
    # one, else the reference code's `human_assistant` format. Generation and evaluation must use the same.
    prompt_format: str = "auto"
    # Experiment trackers the Trainer logs loss, learning rate and throughput to: ("none",), or names from
    # REPORT_TO_INTEGRATIONS, e.g. ("tensorboard",), whose event files go to the run's directory (output_dir/logs).
    # Each needs its package installed (tensorboard, mlflow, wandb, ...) and reads its own settings (MLFLOW_*,
    # WANDB_*) from the environment.
    report_to: tuple[str, ...] = ("none",)
    # torch intra-op threads; None keeps torch's default. On a CPU shared with other jobs use 1: OpenMP
    # threads spin at barriers, and an oversubscribed 2-thread step was measured 5x slower than 1 thread.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        # The Trainer reads max_steps <= 0 as "train num_epochs", a NaN learning rate as a number and a negative
        # warmup as none: such a value is a mistake in the file, refused here with its field named.
        for name, (allowed, words) in _RANGES.items():
            value = getattr(self, name)
            # None passes where the type allows it; types themselves are conformed by with_overrides.
            if isinstance(value, (int, float)) and not allowed(value):
                raise ValueError(f"training config field {name!r} = {value!r}: expected {words}")
        unknown = [name for name in self.report_to if name not in ("none", *REPORT_TO_INTEGRATIONS)]
        if unknown or not self.report_to or ("none" in self.report_to and len(self.report_to) > 1):
            raise ValueError(f"training config field 'report_to' = {list(self.report_to)!r}: expected ['none'] or a "
                             f"list of transformers' integrations {list(REPORT_TO_INTEGRATIONS)}")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"training config field 'lora_targets' = {self.lora_targets!r}: expected a non-empty "
                             "list of module names")

    @classmethod
    def demo(cls, **overrides: Any) -> TrainingConfig:
        """Small, fast CPU setting: fp32 (bf16 where the device computes it natively), LoRA r=8, 40 steps of 8
        sequences at a high adapter learning rate.

        Sized for SmolLM2-135M on 2 cores: 40 x 8 sequences of the synthetic mix are ~22k tokens, measured at
        ~220 CPU-seconds per variant (~100 tokens per CPU-second, one thread), i.e. 2-4 minutes of training
        on an otherwise idle machine. On a busy machine set num_threads=1.

        bf16 where native: on realmix (`moce/e4`, 3 seeds x 80 held-out items) bf16 training changed the held-out
        loss by +0.0024 [-0.0026, +0.0085] against float32 (docs/benchmarks.md, "bf16 training on the CPU").
        """
        return cls(bf16_where_native=True).with_overrides(overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> TrainingConfig:
        """The paper's setting (Eo et al. 2025): QLoRA NF4, bf16, paged AdamW, 1 epoch."""
        paper = cls(
            lr=2e-4,
            lr_scheduler="constant_with_warmup",
            warmup_steps=200,
            num_epochs=1.0,
            max_steps=None,
            per_device_batch_size=4,
            grad_accum=4,
            max_length=512,
            lora_r=64,
            lora_alpha=16,
            lora_dropout=0.1,
            lora_targets=ALL_PROJECTIONS,
            save_steps=500,
            save_total_limit=3,
            bf16=True,
            qlora=True,
            optim="paged_adamw_32bit",
            max_grad_norm=0.3,
            logging_steps=10,
            deepspeed=None,
            gradient_checkpointing=True,
            # Measured on an H100 at LLaMA-2-7B dims: a moce step 2.5x faster compiled than eager.
            compile=True,
        )
        return paper.with_overrides(overrides)

    @classmethod
    def preset(cls, name: str) -> TrainingConfig:
        """The named preset: `demo` (CPU, minutes) or `paper` (the paper's GPU setting)."""
        presets = {"demo": cls.demo, "paper": cls.paper}
        if name not in presets:
            raise ValueError(f"training preset {name!r} is not one of {sorted(presets)}")
        return presets[name]()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """A config from a `to_dict()` mapping (e.g. a launched job's spec); missing keys keep the defaults."""
        return cls().with_overrides(values)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> TrainingConfig:
        """A copy with `overrides` applied. An unknown key or a value of the wrong type raises a ValueError
        naming the key (and the closest field name for a misspelling); lists become tuples, ints floats where
        the field is a float."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ValueError(f"training config overrides must be a mapping of field to value, got {overrides!r}")
        hints = typing.get_type_hints(type(self))
        checked = {}
        for key, value in overrides.items():
            if key not in hints:
                close = [_TRAINING_ARGUMENTS_NAMES[key]] if key in _TRAINING_ARGUMENTS_NAMES \
                    else difflib.get_close_matches(str(key), hints, n=1)
                suggestion = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"unknown training config field {key!r}{suggestion}; known fields: {sorted(hints)}"
                )
            try:
                checked[key] = conformed(value, hints[key])
            except TypeError as error:
                raise ValueError(
                    f"training config field {key!r}: {error}, got {value!r} ({type(value).__name__})"
                ) from None
        return dataclasses.replace(self, **checked)

    def for_this_machine(self) -> TrainingConfig:
        """The config that trains here: `bf16_where_native` decided for this machine's device, so that the
        artifact records the precision it was trained in."""
        if not self.bf16_where_native:
            return self
        return dataclasses.replace(self, bf16=self.bf16 or native_bf16(), bf16_where_native=False)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        return values


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


# field -> (test, the allowed values in words). None passes wherever the field allows it (max_steps: the epochs
# decide; save_total_limit: keep every checkpoint; num_threads: torch's default).
_RANGES: dict[str, tuple[Any, str]] = {
    "lr": (_positive, "a finite number > 0"),
    "warmup_steps": (lambda v: v >= 0, "an int >= 0"),
    "num_epochs": (_positive, "a finite number > 0"),
    "max_steps": (lambda v: v >= 1, "an int >= 1, or null to train num_epochs"),
    "per_device_batch_size": (lambda v: v >= 1, "an int >= 1"),
    "grad_accum": (lambda v: v >= 1, "an int >= 1"),
    "max_length": (lambda v: v >= 1, "an int >= 1"),
    "lora_r": (lambda v: v >= 1, "an int >= 1"),
    "lora_alpha": (lambda v: v >= 1, "an int >= 1"),
    "lora_dropout": (lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "save_steps": (lambda v: v >= 1, "an int >= 1"),
    "save_total_limit": (lambda v: v >= 1, "an int >= 1, or null to keep every checkpoint"),
    # numpy's and the Trainer's seeds are unsigned 32-bit
    "seed": (lambda v: 0 <= v < 2**32, "an int in [0, 2**32)"),
    # 0 switches clipping off (the Trainer clips only above 0)
    "max_grad_norm": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "logging_steps": (lambda v: v >= 1, "an int >= 1"),
    "num_threads": (lambda v: v >= 1, "an int >= 1, or null for torch's default"),
}


NATIVE_BF16_ENV = "MOCE_NATIVE_BF16"


def native_bf16(device: str | None = None) -> bool:
    """Whether `device` (default: CUDA when there is a GPU, else the CPU) computes bf16 natively.
    MOCE_NATIVE_BF16=0 (or 1) overrides the probe, e.g. to reproduce float32 runs on a bf16 CPU; the test suite
    sets 0, so that its numbers do not depend on the machine."""
    import torch

    override = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise ValueError(f"{NATIVE_BF16_ENV}={override!r}: expected 0 or 1")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_computes_bf16()


def cpu_computes_bf16() -> bool:
    """A CPU with AVX512-BF16 or AMX (torch.cpu's own probes of the CPU's features: private, hence the fallback;
    no public API says it)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)
