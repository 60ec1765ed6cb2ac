"""`train`: the HF Trainer loop (DDP under torchrun, DeepSpeed when configured) with what the pipeline needs
around it: cluster ids passed to the model, the balance loss weighted like the LM loss, checkpoints of the
trainable tensors only, resume, an atomically published artifact and clear errors for bad input and OOM."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moce_model.common.io import atomic_dir
from moce_model.data.prompt_format import make_prompt_format
from moce_model.model.adapters import write_trained
from moce_model.model.config import MoCEConfig
from moce_model.training.checkpoints import (
    CHECKPOINTS_DIRNAME,
    checkpoint_step,
    discard_checkpoints_of_other_runs,
    find_resumable_checkpoint,
    is_main_process,
    prune_checkpoints,
    run_fingerprint,
)
from moce_model.training.config import TrainingConfig
from moce_model.training.data import (
    InstructionCollator,
    InstructionDataset,
    build_dataset,
    check_columns,
    resolve_cluster_ids,
)
from moce_model.training.expert_use import expert_use_counts
from moce_model.training.hf_trainer import (
    log_relay,
    make_trainer_class,
    point_trackers_at,
    training_arguments,
)
from moce_model.training.model import (
    build_model,
    compiled_length_bucket,
    count_trainable_parameters,
)

if TYPE_CHECKING:
    import polars as pl


logger = logging.getLogger(__name__)
ARTIFACT_DIRNAME = "adapter"

# Experiment trackers' records that belong to the run (TensorBoard's event files, MLflow's file store, W&B's
# offline run), unless the environment points a tracker elsewhere (hf_trainer.point_trackers_at).
LOGS_DIRNAME = "logs"


@dataclass
class TrainResult:
    output_dir: Path
    artifact_dir: Path
    global_step: int
    loss_history: list[tuple[int, float]]
    tokens_per_second: float
    peak_memory_mb: float
    trainable_parameters: int
    expert_use: np.ndarray | None
    train_seconds: float
    resumed_from_step: int = 0
    cpu_seconds: float = 0.0
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped_no_response: int = 0
    # tracker -> where its records are (hf_trainer.point_trackers_at); empty with report_to none.
    trackers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "artifact_dir": str(self.artifact_dir),
            "global_step": self.global_step,
            "loss_history": [[step, loss] for step, loss in self.loss_history],
            "tokens_per_second": self.tokens_per_second,
            "peak_memory_mb": self.peak_memory_mb,
            "trainable_parameters": self.trainable_parameters,
            "expert_use": None if self.expert_use is None else np.asarray(self.expert_use).tolist(),
            "train_seconds": self.train_seconds,
            "resumed_from_step": self.resumed_from_step,
            "cpu_seconds": self.cpu_seconds,
            "n_examples": self.n_examples,
            "n_truncated": self.n_truncated,
            "n_dropped_no_response": self.n_dropped_no_response,
            "trackers": dict(self.trackers),
            **({"extra": self.extra} if self.extra else {}),
        }


OOM_HINT = (
    "training ran out of memory; lower per_device_batch_size (and raise grad_accum to keep the effective "
    "batch), lower max_length, enable gradient_checkpointing, or enable qlora (GPU)"
)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux: the process's resident peak, which on CPU is what bounds a run.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _forward_takes_cluster_ids(model: torch.nn.Module) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cluster_ids" in inspect.signature(inner.forward).parameters


def _expert_use(
    model: torch.nn.Module, dataset: InstructionDataset, collator: InstructionCollator, per_group: int = 16
) -> np.ndarray:
    """(groups, experts) token-routing counts on up to `per_group` training examples of every group."""

    by_group: dict[int, list[dict[str, Any]]] = {}
    for example in dataset.examples:
        members = by_group.setdefault(example["cluster_ids"], [])
        if len(members) < per_group:
            members.append(example)
    batches = [
        collator(members[start : start + 8]) for members in by_group.values() for start in range(0, len(members), 8)
    ]
    return np.asarray(expert_use_counts(model, batches), dtype=np.float64)


def _save_artifact(model: torch.nn.Module, tokenizer: Any, artifact_dir: Path, metadata: dict[str, Any]) -> None:
    """Write the trained adapter/experts/routers + tokenizer to a staging dir, then rename into place."""
    with atomic_dir(artifact_dir) as staging:
        if metadata.get("moce_config") is not None:
            write_trained(model, staging)
        else:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(metadata, indent=2, default=str))


def _moce_config_dict(moce_config: MoCEConfig | None) -> dict[str, Any] | None:
    return None if moce_config is None else moce_config.to_dict()


def train(
    base_model_dir: str | os.PathLike,
    train_rows: pl.DataFrame,
    cluster_ids: Mapping[str, int] | None,
    moce_config: MoCEConfig | None,
    training_config: TrainingConfig,
    output_dir: str | os.PathLike,
    resume: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    num_clusters: int | None = None,
) -> TrainResult:
    """Fine-tune `base_model_dir` on `train_rows`; checkpoints under output_dir/checkpoints, artifact in
    output_dir/adapter (written atomically). With resume=True a previous run in output_dir continues from its
    last complete checkpoint.

    `cluster_ids` maps instruction id → k-means cluster (needed by cluster-routed variants); `num_clusters`
    (the number of centroids) is checked against the model's number of expert groups.

    Long: the run's steps in order, each a named helper; what remains is the result and the artifact.
    """
    from transformers import set_seed

    training_config = _for_this_device(training_config)
    output_dir = Path(output_dir)
    checkpoints_dir = output_dir / CHECKPOINTS_DIRNAME
    artifact_dir = output_dir / ARTIFACT_DIRNAME
    check_columns(train_rows)
    group_ids = resolve_cluster_ids(train_rows["id"].to_list(), cluster_ids, moce_config, num_clusters)
    data = _training_data(base_model_dir, train_rows, group_ids, training_config)

    set_seed(training_config.seed)
    args = training_arguments(training_config, checkpoints_dir)
    fingerprint = run_fingerprint(
        base_model_dir, train_rows["id"].to_list(), group_ids, _moce_config_dict(moce_config), training_config
    )
    resume_from = _checkpoint_to_resume(args, output_dir, checkpoints_dir, fingerprint, resume)
    model = build_model(base_model_dir, moce_config, training_config)
    trainable = count_trainable_parameters(model)
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=data.dataset,
        data_collator=data.collator,
        processing_class=data.tokenizer,
        callbacks=[log_relay(on_log)] if on_log is not None else None,
        forward_takes_cluster_ids=_forward_takes_cluster_ids(model),
    )
    if on_log is not None:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the caller shows the records: print each once, not twice
    trackers = point_trackers_at(trainer, output_dir / LOGS_DIRNAME)
    run = _run_trainer(trainer, resume_from, training_config)

    unwrapped = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    result = TrainResult(
        output_dir=output_dir,
        artifact_dir=artifact_dir,
        global_step=trainer.state.global_step,
        loss_history=_loss_history(trainer.state.log_history),
        tokens_per_second=run.tokens / run.train_seconds if run.train_seconds > 0 else 0.0,
        peak_memory_mb=_peak_memory_mb(),
        trainable_parameters=trainable,
        expert_use=_expert_use(unwrapped, data.dataset, data.collator) if moce_config is not None else None,
        train_seconds=run.train_seconds,
        resumed_from_step=run.resumed_from_step,
        cpu_seconds=run.cpu_seconds,
        n_examples=len(data.dataset),
        trackers=trackers,
        **data.token_stats,
    )
    if trainer.is_world_process_zero():
        prune_checkpoints(checkpoints_dir, training_config.save_total_limit)
        _save_artifact(
            unwrapped,
            data.tokenizer,
            artifact_dir,
            {
                "base_model_dir": str(base_model_dir),
                "moce_config": _moce_config_dict(moce_config),
                "training_config": training_config.to_dict(),
                "prompt_format": data.prompt_format,
                "global_step": result.global_step,
                "n_examples": result.n_examples,
            },
        )
    trainer.accelerator.wait_for_everyone()
    return result


def _for_this_device(training_config: TrainingConfig) -> TrainingConfig:
    training_config = training_config.for_this_machine()
    if training_config.optim.startswith("paged_") and not torch.cuda.is_available():
        raise ValueError(
            f"optim={training_config.optim!r} pages the optimiser state through CUDA unified memory and needs a GPU; "
            "on a CPU use optim='adamw_torch'"
        )
    if training_config.num_threads:
        torch.set_num_threads(training_config.num_threads)
    return training_config


@dataclass(frozen=True)
class _TrainingData:
    tokenizer: Any
    prompt_format: str
    dataset: InstructionDataset
    collator: InstructionCollator
    token_stats: dict[str, Any]


def _training_data(base_model_dir: str | os.PathLike, train_rows: pl.DataFrame, group_ids: Any,
                   training_config: TrainingConfig) -> _TrainingData:
    """The rows tokenised in the experiment's prompt format, with their groups, and the collator."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = make_prompt_format(training_config.prompt_format, tokenizer)
    dataset, token_stats = build_dataset(train_rows, fmt, training_config.max_length, group_ids)
    collator = InstructionCollator(
        tokenizer.pad_token_id,
        pad_to_multiple_of=compiled_length_bucket(training_config.max_length) if training_config.compile else None,
    )
    return _TrainingData(tokenizer, fmt.name, dataset, collator, token_stats)


def _checkpoint_to_resume(args: Any, output_dir: Path, checkpoints_dir: Path, fingerprint: str,
                          resume: bool) -> Path | None:
    # Rank 0 cleans up (foreign or corrupt checkpoints) first; the other ranks then see the same directory.
    with args.main_process_first(local=False, desc="checkpoint selection"):
        if is_main_process():
            if not resume and checkpoints_dir.exists():
                shutil.rmtree(checkpoints_dir)
            discard_checkpoints_of_other_runs(output_dir, fingerprint)
        return find_resumable_checkpoint(checkpoints_dir) if resume else None


@dataclass(frozen=True)
class _TrainerRun:
    resumed_from_step: int
    train_seconds: float
    cpu_seconds: float
    tokens: int


def _run_trainer(trainer: Any, resume_from: Path | None, training_config: TrainingConfig) -> _TrainerRun:
    """Train (or resume) to the end; a run out of memory says which settings to lower."""
    resumed_from_step = 0
    if resume_from is not None:
        resumed_from_step = checkpoint_step(resume_from) or 0
        logger.info("resuming from %s (step %d)", resume_from, resumed_from_step)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    cpu_started = time.process_time()
    # Resumed at exactly max_steps (killed after the last checkpoint, before the artifact was written), the
    # Trainer would take one step more than max_steps; the run is complete, so its last state is loaded instead.
    finished = resume_from is not None and bool(training_config.max_steps) \
        and resumed_from_step >= training_config.max_steps
    try:
        if finished:
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except BaseException as error:
        if _is_out_of_memory(error):
            raise MemoryError(
                f"{OOM_HINT} (per_device_batch_size={training_config.per_device_batch_size}, "
                f"max_length={training_config.max_length}, grad_accum={training_config.grad_accum}, "
                f"gradient_checkpointing={training_config.gradient_checkpointing}, qlora={training_config.qlora})"
            ) from error
        raise
    tokens_before = (
        trainer.state.num_input_tokens_seen if finished else getattr(trainer, "_initial_num_input_tokens_seen", 0)
    )
    # CPU time of all threads: on a shared machine wall time depends on the neighbours, this does not.
    return _TrainerRun(resumed_from_step, time.perf_counter() - started, time.process_time() - cpu_started,
                       trainer.state.num_input_tokens_seen - tokens_before)


def _loss_history(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(entry["step"]), float(entry["loss"])) for entry in log_history
            if "loss" in entry and "step" in entry and math.isfinite(float(entry["loss"]))]
