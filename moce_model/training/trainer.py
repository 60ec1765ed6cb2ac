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
from moce_model.common.progress import clock
from moce_model.data.prompt_format import IGNORE_INDEX, make_prompt_format
from moce_model.model.adapters import write_trained
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.training.checkpoints import (
    CHECKPOINTS_DIRNAME,
    TRAINABLE_STATE_NAME,
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
from moce_model.training.model import (
    build_model,
    compiled_length_bucket,
    count_trainable_parameters,
    trainable_state_dict,
)
from moce_model.training.samplers import (
    EpochSeededLengthGroupedSampler,
    EpochSeededRandomSampler,
)

if TYPE_CHECKING:
    import polars as pl

logger = logging.getLogger(__name__)

ARTIFACT_DIRNAME = "adapter"
# Experiment trackers' files that belong to the run (TensorBoard's event files, with report_to tensorboard).
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
            **({"extra": self.extra} if self.extra else {}),
        }



def _make_trainer_class():
    from transformers import Trainer

    class MoCETrainer(Trainer):
        """Trainer that checkpoints only the trainable tensors and passes `cluster_ids` to models that take it."""

        def __init__(self, *args: Any, forward_takes_cluster_ids: bool, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.forward_takes_cluster_ids = forward_takes_cluster_ids

            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self.moce_model = inner if isinstance(inner, MoCEForCausalLM) and inner.config.has_router else None
            self._aux_loss_total: torch.Tensor | float = 0.0
            self._aux_loss_count = 0

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(example["input_ids"]) for example in dataset.examples]
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            if self.args.train_sampling_strategy == "group_by_length":
                group = self.args.train_batch_size * self.args.gradient_accumulation_steps
                return EpochSeededLengthGroupedSampler(lengths, group, seed)
            return EpochSeededRandomSampler(lengths, 1, seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.forward_takes_cluster_ids:
                inputs = {k: v for k, v in inputs.items() if k != "cluster_ids"}
            else:
                inputs = {**inputs, "aux_loss_weight": self._aux_loss_weight(inputs, num_items_in_batch)}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _aux_loss_weight(self, inputs, num_items_in_batch) -> torch.Tensor | float:
            """This micro-batch's share of the optimiser step, as the Trainer weights the LM loss: the balance
            loss then has the same weight at any gradient accumulation and world size."""
            if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
                # The Trainer divides the (mean) LM loss of each micro-batch by the accumulation steps.
                return 1.0 / self.current_gradient_accumulation_steps
            # The LM loss is this micro-batch's label-token sum over the step's label tokens (all ranks' when
            # tokens are averaged across devices, and then multiplied by the process count, which DDP's
            # gradient average undoes). Count label tokens exactly as the Trainer did.
            labels = inputs["labels"]
            if getattr(self, "_loss_shifts_labels", True):
                labels = labels[..., 1:]
            weight = labels.ne(IGNORE_INDEX).sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:
                weight = weight * (self.accelerator.num_processes // self.get_tp_size())
            return weight

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.moce_model is not None:
                aux_loss = self.moce_model.last_aux_loss()
                if aux_loss is not None:  # accumulated on the device: no host sync per micro-batch
                    self._aux_loss_total = self._aux_loss_total + aux_loss.detach()
                    self._aux_loss_count += 1
            return loss

        def log(self, logs, *args, **kwargs):
            if self._aux_loss_count and "loss" in logs:
                logs["aux_loss"] = round(float(self._aux_loss_total) / self._aux_loss_count, 4)
                self._aux_loss_total, self._aux_loss_count = 0.0, 0
            return super().log(logs, *args, **kwargs)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            # The frozen base is reloaded from base_model_dir; a checkpoint needs only what training changes.
            if not self.args.should_save:
                return
            from safetensors.torch import save_file

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            save_file(trainable_state_dict(model), os.path.join(output_dir, TRAINABLE_STATE_NAME))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
            from safetensors.torch import load_file

            model = model if model is not None else self.model
            state = load_file(os.path.join(resume_from_checkpoint, TRAINABLE_STATE_NAME))
            expected = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(state) != expected:
                raise ValueError(
                    f"checkpoint {resume_from_checkpoint} does not match the model's trainable parameters "
                    f"({len(set(state) - expected)} unexpected, {len(expected - set(state))} missing): "
                    "the model or LoRA configuration changed since it was written"
                )
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in state.items():
                    parameters[name].copy_(tensor)

    return MoCETrainer


def _training_arguments(config: TrainingConfig, checkpoints_dir: Path):
    from transformers import TrainingArguments

    use_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps if config.max_steps else -1,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        optim=config.optim,
        weight_decay=0.0,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=use_cpu,
        ddp_backend=("gloo" if use_cpu else "nccl") if distributed else None,
        ddp_find_unused_parameters=False if distributed else None,
        deepspeed=config.deepspeed,
        remove_unused_columns=False,  # keeps cluster_ids, which the peft wrapper's signature hides
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        report_to=list(config.report_to),
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
    )


def _tensorboard_logs_in(trainer, logging_dir: Path) -> None:
    """TensorBoard's event files (with `report_to` tensorboard) in the run's directory, beside its checkpoints and
    artifact. transformers 5 has no TrainingArguments.logging_dir: its TensorBoardCallback writes to
    $TENSORBOARD_LOGGING_DIR when that is set, else to the callback's `logging_dir`, else under output_dir (here the
    checkpoints folder)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(logging_dir)


def _log_relay(on_log: Callable[[dict[str, Any]], None]):
    """Trainer callback forwarding each rank-0 log record (with its step) to `on_log`."""
    from transformers import TrainerCallback

    class LogRelay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    return LogRelay()


def training_progress(logs: Mapping[str, Any], elapsed_seconds: float) -> str:
    """One line for a person watching a run: step of max, loss, and the time left at the pace so far
    (`logs` as the log relay passes them: the Trainer's record with `step` and `max_steps`)."""
    step, max_steps = int(logs.get("step") or 0), int(logs.get("max_steps") or 0)
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]
    for key in ("loss", "aux_loss", "grad_norm", "learning_rate"):
        if key in logs:
            value = logs[key]
            parts.append(f"{key} {float(value):.4g}" if _is_number(value) else f"{key} {value}")
    parts.append(f"elapsed {clock(elapsed_seconds)}")
    if max_steps and 0 < step < max_steps:
        parts.append(f"ETA {clock(elapsed_seconds / step * (max_steps - step))}")
    return ", ".join(parts)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


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
    args = _training_arguments(training_config, checkpoints_dir)
    fingerprint = run_fingerprint(
        base_model_dir, train_rows["id"].to_list(), group_ids, _moce_config_dict(moce_config), training_config
    )
    resume_from = _checkpoint_to_resume(args, output_dir, checkpoints_dir, fingerprint, resume)
    model = build_model(base_model_dir, moce_config, training_config)
    trainable = count_trainable_parameters(model)
    trainer = _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=data.dataset,
        data_collator=data.collator,
        processing_class=data.tokenizer,
        callbacks=[_log_relay(on_log)] if on_log is not None else None,
        forward_takes_cluster_ids=_forward_takes_cluster_ids(model),
    )
    if on_log is not None:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the caller shows the records: print each once, not twice
    _tensorboard_logs_in(trainer, output_dir / LOGS_DIRNAME)
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
