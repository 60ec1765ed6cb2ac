"""What a report's numbers were produced with, stated at its top: the source revision, the precision each model
was trained in (read from its training record), the evaluation's dtype and device, the seed and the machine's
bf16 support. Two reports with the same revision, seed, machine and precision hold the same numbers (the
evaluation is seeded and greedy; tests/test_eval_report.py checks it); only the evaluation time differs."""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moce_model.model.adapters import TRAINING_RECORD_FILE
from moce_model.training.config import cpu_computes_bf16

_REPO_ROOT = Path(__file__).resolve().parents[2]
NOT_TRAINED = "not trained"


@dataclass(frozen=True)
class RunProvenance:
    commit: str
    seed: int
    evaluation_dtype: str
    evaluation_device: str
    # "none", or the dtype of the evaluation's matmuls under torch.autocast (evaluation.autocast)
    evaluation_autocast: str
    # model name -> the precision it was trained in ("bf16", "float32", "QLoRA NF4 + bf16", or NOT_TRAINED)
    training_precision: Mapping[str, str]
    machine: str
    # model name -> (groups, experts per group), for the models that have experts (read from config.json)
    expert_layouts: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def expert_budget_line(self) -> str | None:
        """Each model's experts in all, and whether the mixtures (more than one expert: not `dense_adapter`'s one
        adapter) are budget-matched, the same total, as in the paper's comparison; None without models that have
        experts."""
        if not self.expert_layouts:
            return None
        parts = [f"{name} {groups} x {per_group} = {groups * per_group}"
                 for name, (groups, per_group) in self.expert_layouts.items()]
        totals = {groups * per_group for groups, per_group in self.expert_layouts.values() if groups * per_group > 1}
        verdict = ("budget-matched: the same number of experts in all" if len(totals) <= 1 else
                   "NOT budget-matched: the models have different numbers of experts, so a difference between "
                   "them mixes routing with capacity")
        return f"- experts (groups x experts per group): {', '.join(parts)} ({verdict})"

    def markdown(self) -> str:
        trained = ", ".join(f"{name} {precision}" for name, precision in self.training_precision.items())
        return "\n".join([
            "## Run", "",
            f"- source: commit {self.commit}",
            f"- seed: {self.seed}",
            f"- training precision: {trained}",
            *([budget] if (budget := self.expert_budget_line()) else []),
            f"- evaluation: {self.evaluation_dtype} on {self.evaluation_device}"
            + ("" if self.evaluation_autocast == "none" else f", matmuls in {self.evaluation_autocast} (autocast)"),
            f"- machine: {self.machine}",
            "",
            "The same commit, seed, machine and precision give the same numbers; only the evaluation time varies.",
            "",
        ])


def source_revision(repo_root: str | Path = _REPO_ROOT) -> str:
    """The checkout's commit, marked when tracked files differ from it; 'unknown (...)' outside a git checkout
    (an installed copy) or without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=False)
        if head.returncode != 0:
            return f"unknown ({repo_root} is not a git checkout)"
        status = subprocess.run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (git: {error})"
    commit = head.stdout.strip()
    return f"{commit} + uncommitted changes" if status.stdout.strip() else commit


def training_precision(record: Mapping[str, Any], where: str) -> str:
    """The precision of a training record (`training.json`: its `training_config`, as the trainer resolved it for
    the machine it trained on)."""
    config = record.get("training_config")
    if not isinstance(config, Mapping) or not isinstance(config.get("bf16"), bool):
        raise ValueError(f"{where}: no training_config.bf16 in the training record (got {config!r})")
    precision = "bf16" if config["bf16"] else "float32"
    return f"QLoRA NF4 + {precision}" if config.get("qlora") else precision


def model_training_precision(model_dir: str | Path | None) -> str:
    """The training precision recorded in a merged model directory; NOT_TRAINED for the base model (None, or a
    directory without a training record)."""
    if model_dir is None:
        return NOT_TRAINED
    path = Path(model_dir) / TRAINING_RECORD_FILE
    if not path.is_file():
        return NOT_TRAINED
    return training_precision(_read_json(path), str(path))


def _read_json(path: Path) -> Any:
    """The JSON file at `path`; invalid JSON is an error that names the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from error


def machine_description() -> str:
    return (f"{platform.machine()} {platform.system()}, CPU "
            f"{'computes' if cpu_computes_bf16() else 'does not compute'} bf16 natively (AVX512-BF16 / AMX)")


def run_provenance(seed: int, evaluation_settings: Mapping[str, str],
                   model_dirs: Mapping[str, str | Path | None]) -> RunProvenance:
    """This checkout's and machine's provenance for models `model_dirs` (name -> merged directory, None for the
    base model) evaluated with `evaluation_settings` (the experiment's device, dtype and autocast)."""
    return RunProvenance(
        commit=source_revision(), seed=seed, evaluation_dtype=evaluation_settings["dtype"],
        evaluation_device=evaluation_settings["device"],
        evaluation_autocast=evaluation_settings.get("autocast", "none"),
        training_precision={name: model_training_precision(path) for name, path in model_dirs.items()},
        machine=machine_description(),
        expert_layouts={name: layout for name, path in model_dirs.items()
                        if (layout := model_expert_layout(path)) is not None},
    )


def model_expert_layout(model_dir: str | Path | None) -> tuple[int, int] | None:
    """(groups, experts per group) of a merged MoCE directory's config.json; None for a model without experts."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    config = _read_json(Path(model_dir) / "config.json")
    if "num_groups" not in config or "experts_per_group" not in config:
        return None
    return int(config["num_groups"]), int(config["experts_per_group"])
