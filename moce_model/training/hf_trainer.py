"""The transformers Trainer as training runs it: the subclass that passes cluster ids and adds the balance loss,
its TrainingArguments from a TrainingConfig, and the callbacks that relay logs and place TensorBoard's files."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from moce_model.common.progress import clock
from moce_model.data.prompt_format import IGNORE_INDEX
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.training.checkpoints import (
    TRAINABLE_STATE_NAME,
)
from moce_model.training.config import TrainingConfig
from moce_model.training.model import (
    trainable_state_dict,
)
from moce_model.training.samplers import (
    EpochSeededLengthGroupedSampler,
    EpochSeededRandomSampler,
)


def make_trainer_class():
    """The transformers Trainer subclass training runs. Long: the class is defined in here so that transformers' Trainer is imported only when a run trains."""
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


def training_arguments(config: TrainingConfig, checkpoints_dir: Path):
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


# Environment variables by which a person points a tracker elsewhere (a shared TensorBoard folder, an MLflow server,
# a W&B project): set, they win over the run's own folder.
TRACKER_LOCATION_ENV = {"tensorboard": "TENSORBOARD_LOGGING_DIR", "mlflow": "MLFLOW_TRACKING_URI", "wandb": "WANDB_DIR"}
# Variables this module set for the run before (W&B reads them when it starts); a later run in the same process
# replaces them, a person's own are never touched.
_set_for_runs: set[str] = set()


def point_trackers_at(trainer, logging_dir: Path) -> dict[str, str]:
    """Each tracker of the Trainer (`report_to`) writes under the run's `logging_dir`, beside its checkpoints and
    artifact, unless the environment points it elsewhere; returns tracker -> where its records are.

    TensorBoard: event files in `logging_dir` (transformers 5 has no TrainingArguments.logging_dir: its callback
    writes to $TENSORBOARD_LOGGING_DIR, else the callback's `logging_dir`). MLflow: a local SQLite store
    `logging_dir/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///<it>`; MLflow 3 refuses its old file
    store), which needs no server. W&B: offline mode (no
    network on the machines this runs on; `wandb sync` uploads it later) into `logging_dir`."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    logging_dir = Path(logging_dir).resolve()
    locations: dict[str, str] = {}
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            if callback.logging_dir is None:
                callback.logging_dir = str(logging_dir)
            locations["tensorboard"] = os.environ.get(TRACKER_LOCATION_ENV["tensorboard"]) or callback.logging_dir
        elif isinstance(callback, MLflowCallback):
            import mlflow

            uri = os.environ.get(TRACKER_LOCATION_ENV["mlflow"]) or f"sqlite:///{logging_dir / 'mlflow.db'}"
            mlflow.set_tracking_uri(uri)  # the callback keeps a URI already set and starts its run there
            locations["mlflow"] = uri
        elif isinstance(callback, WandbCallback):
            for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(logging_dir))):
                if name not in os.environ or name in _set_for_runs:
                    os.environ[name] = value
                    _set_for_runs.add(name)
            locations["wandb"] = os.environ["WANDB_DIR"]
    if locations:
        logging_dir.mkdir(parents=True, exist_ok=True)
    return locations


def log_relay(on_log: Callable[[dict[str, Any]], None]):
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
