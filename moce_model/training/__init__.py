"""Fine-tuning of a base causal LM with LoRA + routed adapter experts, on CPU or GPU, resumable.

By concern: `config` (TrainingConfig, presets and overrides), `data` (rows → tokenised examples with their
cluster ids), `model` (base loading incl. QLoRA, experts + LoRA), `checkpoints` (resume, fingerprint,
pruning), `samplers` (resumable training order) and `trainer` (the loop and `train`). The public names are
exported here, so `from moce_model.training import train, TrainingConfig` is all a caller needs.
"""

from moce_model.data.prompt_format import IGNORE_INDEX, tokenize_example
from moce_model.training.checkpoints import (
    CHECKPOINTS_DIRNAME,
    RUN_FINGERPRINT_NAME,
    TRAINABLE_STATE_NAME,
    checkpoint_problem,
    find_resumable_checkpoint,
    prune_checkpoints,
    run_fingerprint,
)
from moce_model.training.config import (
    ALL_PROJECTIONS,
    ATTENTION_PROJECTIONS,
    TrainingConfig,
)
from moce_model.training.data import (
    REQUIRED_COLUMNS,
    InstructionCollator,
    InstructionDataset,
    build_dataset,
    resolve_cluster_ids,
)
from moce_model.training.hf_trainer import training_progress
from moce_model.training.model import (
    build_model,
    compile_decoder_layers,
    compiled_length_bucket,
    count_trainable_parameters,
    load_base_model,
    trainable_state_dict,
)
from moce_model.training.samplers import (
    EpochSeededLengthGroupedSampler,
    EpochSeededRandomSampler,
)
from moce_model.training.trainer import ARTIFACT_DIRNAME, OOM_HINT, TrainResult, train

__all__ = [
    "ALL_PROJECTIONS",
    "ARTIFACT_DIRNAME",
    "ATTENTION_PROJECTIONS",
    "CHECKPOINTS_DIRNAME",
    "IGNORE_INDEX",
    "OOM_HINT",
    "REQUIRED_COLUMNS",
    "RUN_FINGERPRINT_NAME",
    "TRAINABLE_STATE_NAME",
    "EpochSeededLengthGroupedSampler",
    "EpochSeededRandomSampler",
    "InstructionCollator",
    "InstructionDataset",
    "TrainResult",
    "TrainingConfig",
    "build_dataset",
    "build_model",
    "checkpoint_problem",
    "compile_decoder_layers",
    "compiled_length_bucket",
    "count_trainable_parameters",
    "find_resumable_checkpoint",
    "load_base_model",
    "prune_checkpoints",
    "resolve_cluster_ids",
    "run_fingerprint",
    "tokenize_example",
    "train",
    "training_progress",
    "trainable_state_dict",
]
