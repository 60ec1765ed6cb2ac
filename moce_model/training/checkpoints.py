"""Checkpoints that survive SIGKILL: the newest *complete* one is resumed, damaged ones are skipped and removed,
and a checkpoint of another run (other data or settings, by fingerprint) is never resumed.

What a checkpoint holds: the trainable tensors as safetensors (`trainable_state.safetensors`, written by the
trainer's own `_save`), `trainer_state.json`, and the Trainer's `torch.save` files: `optimizer.pt`,
`scheduler.pt`, `rng_state*.pth` (and `scaler.pt` under fp16). Those are pickles. transformers reads them back
on resume with `torch.load(weights_only=True)`, whose unpickler builds only tensors, plain containers and a
short list of torch and (for the RNG state) numpy types, so a tampered file cannot run code; it refuses torch
older than 2.6, where that guarantee had a hole (CVE-2025-32434). `training_args.bin`, a full pickle, is not
written here (`_save` is replaced) and is never read back. Under DeepSpeed the optimizer state is DeepSpeed's
own checkpoint format."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moce_model.common.io import atomic_write_json
from moce_model.model.config import MoCEConfig
from moce_model.training.config import TrainingConfig

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINABLE_STATE_NAME = "trainable_state.safetensors"


def checkpoint_step(path: Path) -> int | None:
    prefix = "checkpoint-"
    if path.is_dir() and path.name.startswith(prefix) and path.name[len(prefix) :].isdigit():
        return int(path.name[len(prefix) :])
    return None


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete and readable.

    The Trainer writes the trainer state last, so a run killed mid-save leaves a directory without it; a
    file truncated or damaged later is caught by reading every tensor file through.
    """
    from safetensors import safe_open

    state_file = checkpoint_dir / "trainer_state.json"
    if not state_file.is_file():
        return "trainer_state.json missing (checkpoint write was interrupted)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as error:
        return f"trainer_state.json unreadable: {error}"
    if state.get("global_step") != checkpoint_step(checkpoint_dir):
        return f"trainer_state.json global_step={state.get('global_step')} does not match the directory name"
    tensor_files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not tensor_files:
        return "no *.safetensors weights"
    for tensor_file in tensor_files:
        try:
            with safe_open(str(tensor_file), framework="pt") as reader:
                for key in reader.keys():
                    reader.get_tensor(key)
        except Exception as error:  # safetensors raises its own error types for truncated/garbled files
            return f"{tensor_file.name} unreadable: {error}"
    # Every torch.save file the Trainer reads back on resume (optimizer, scheduler, RNG states, grad scaler) is
    # a zip archive: a damaged one would fail the resumed run every time instead of falling back.
    for path in sorted([*checkpoint_dir.glob("*.pt"), *checkpoint_dir.glob("*.pth"), *checkpoint_dir.glob("*.bin")]):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as error:
            return f"{path.name} unreadable: {error}"
        if bad is not None:
            return f"{path.name} has a corrupt member {bad}"
    return None


def find_resumable_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that is complete; newer broken ones are removed so the Trainer never sees them."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in checkpoints_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step, reverse=True
    )
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        logger.warning("skipping checkpoint %s: %s", candidate, problem)
        if is_main_process():
            shutil.rmtree(candidate, ignore_errors=True)
    return None


def prune_checkpoints(checkpoints_dir: Path, keep: int | None) -> list[Path]:
    """Remove all but the `keep` newest checkpoints (the Trainer's `save_total_limit`), returning the removed.

    The Trainer rotates only after a save; a run killed between a save and its rotation, then resumed with
    nothing left to train, would otherwise keep one checkpoint too many.
    """
    if not keep or not checkpoints_dir.is_dir():
        return []
    ordered = sorted((p for p in checkpoints_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)
    removed = ordered[: max(len(ordered) - keep, 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


RUN_FINGERPRINT_NAME = "run_fingerprint.json"
LAYOUT_KEYS_ADDED_LATER = ("token_router", "balance_loss_scope", "ac_start_layer", "ac_statistics", "ac_scoring")


def run_fingerprint(
    base_model_dir: str | os.PathLike,
    row_ids: Sequence[str],
    group_ids: Sequence[int],
    moce_config: dict[str, Any] | None,
    config: TrainingConfig,
) -> str:
    """Hash of everything a checkpoint's meaning depends on; a checkpoint of another run is never resumed."""
    import hashlib

    bookkeeping = ("save_steps", "save_total_limit", "logging_steps", "num_threads", "compile", "report_to")
    relevant = {k: v for k, v in config.to_dict().items() if k not in bookkeeping}
    layout = ("variant", "num_groups", "experts_per_group", "router_top_k", "adapter_dim", "adapter_scaling",
              "adapter_dropout", "aux_loss_coef", "random_group_seed", "token_router", *LAYOUT_KEYS_ADDED_LATER[1:])
    moce = {k: v for k, v in (moce_config or {}).items() if k in layout}
    # Settings added after runs were fingerprinted count only away from their default, so that those runs'
    # checkpoints (which used the default) still resume.
    for key in LAYOUT_KEYS_ADDED_LATER:
        if moce.get(key) == getattr(MoCEConfig, key):
            moce.pop(key)
    payload = json.dumps(
        [str(Path(base_model_dir).resolve()), list(row_ids), list(group_ids), moce, relevant], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def discard_checkpoints_of_other_runs(output_dir: Path, fingerprint: str) -> None:
    marker = output_dir / RUN_FINGERPRINT_NAME
    checkpoints_dir = output_dir / CHECKPOINTS_DIRNAME
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text()).get("fingerprint")
        except ValueError:
            previous = None
        if previous != fingerprint and checkpoints_dir.exists():
            logger.warning("checkpoints in %s belong to a different run (data/config changed); starting over", output_dir)
            shutil.rmtree(checkpoints_dir)
    elif checkpoints_dir.exists():
        logger.warning("checkpoints in %s have no run fingerprint; starting over", output_dir)
        shutil.rmtree(checkpoints_dir)
    atomic_write_json({"fingerprint": fingerprint}, marker)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


