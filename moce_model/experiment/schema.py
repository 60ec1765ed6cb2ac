"""The experiment as a whole (`Experiment`): its sections together, the checks across sections, and what the
pipeline asks of it (the training config, the benchmarks, the devices)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moce_model.data.sources import SourceSpec
from moce_model.evaluation.suites import demo_benchmarks, paper_benchmarks
from moce_model.experiment.sections import (
    DATA_DIR_ENV,
    REPO_ROOT,
    BaseModelSettings,
    Clustering,
    Embedder,
    Evaluation,
    ExperimentError,
    Experts,
    Launcher,
    PositiveInt,
    Seed,
    Source,
    Training,
    Variant,
    _resolved,
    _Section,
)
from moce_model.study.config import StudyConfig
from moce_model.training import TrainingConfig
from moce_model.training.config import native_bf16
from moce_model.variants import cluster_routed_variants

# ------------------------------------------------------------------------------------------------ experiment


def _unique_source_names(sources: list[SourceSpec]) -> list[SourceSpec]:
    names = [spec.name for spec in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"source names must be unique (each becomes the asset raw/<name>); repeated: {repeated}")
    return sources


def _unique_variants(variants: list[str]) -> list[str]:
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:
        raise ValueError(f"variants repeated: {repeated}")
    return variants


class Experiment(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    storage_root: Path
    seed: Seed = 0
    sources: Annotated[list[Source], Field(min_length=1), AfterValidator(_unique_source_names)]
    # Longer instructions (system + instruction + input + response) are rejected as over-long.
    max_instruction_chars: PositiveInt = 8_000
    embedder: Embedder
    base_model: BaseModelSettings = BaseModelSettings()
    clustering: Clustering = Clustering()
    variants: Annotated[list[Variant], Field(min_length=1), AfterValidator(_unique_variants)]
    experts: Experts = Experts()
    training: Training = Training()
    launcher: Launcher = Launcher()
    evaluation: Evaluation = Evaluation()
    # What `moce study` runs: any field of moce_model.study.config.StudyConfig (seeds, variants, experts_per_group_sweep,
    # token_routers, conditions, sizes); missing fields keep StudyConfig's defaults.
    study: dict[str, Any] = {}

    @field_validator("study")
    @classmethod
    def _known_study_fields_of_the_right_type(cls, study: dict[str, Any]) -> dict[str, Any]:
        StudyConfig.from_mapping(study)  # names the unknown or badly typed field
        return study

    @field_validator("experts")
    @classmethod
    def _soft_assignment_has_a_variant_to_apply_to(cls, experts: Experts, info: ValidationInfo) -> Experts:
        variants = info.data.get("variants")
        if experts.soft_assignment.enabled and variants is not None \
                and not set(variants) & set(cluster_routed_variants()):
            raise ValueError(
                f"soft_assignment.enabled = True mixes the groups of two clusters, but none of the variants "
                f"{variants} routes by cluster ({', '.join(cluster_routed_variants())} do); add one of them or "
                "switch soft assignment off"
            )
        return experts

    @model_validator(mode="after")
    def _global_batch_divides(self) -> Experiment:
        try:
            self.training.grad_accum_for(self.processes)
        except ValueError as err:
            raise ValueError(f"training.global_batch with launcher nproc_per_node x nnodes = {self.processes}: {err}")
        return self

    @property
    def processes(self) -> int:
        """Training processes in all (one per device): the launcher's processes per node x nodes."""
        return self.launcher.nproc_per_node * self.launcher.nnodes

    @model_validator(mode="before")
    @classmethod
    def _default_storage_root(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("storage_root") is None and isinstance(data.get("name"), str):
            env_root = os.environ.get(DATA_DIR_ENV)
            root = Path(env_root).resolve() if env_root else REPO_ROOT / ".moce_data" / data["name"]
            data = {**data, "storage_root": root}
        return data

    # The file the experiment was read from (None for one built in code), for naming it in later errors.
    _file: Path | None = PrivateAttr(default=None)

    @field_validator("storage_root")
    @classmethod
    def _storage_relative_to_file(cls, value: Path, info: ValidationInfo) -> Path:
        root = Path(_resolved(str(value), info))
        # Checked here, so that a file or an unwritable place fails with the key named, not mid-run.
        if root.exists():
            if not root.is_dir():
                raise ValueError(f"{root} exists and is not a directory")
            return root
        existing = next(parent for parent in root.parents if parent.exists())
        if not existing.is_dir():
            raise ValueError(f"cannot be created: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"cannot be created: {existing} is not writable")
        return root

    @property
    def source_file(self) -> Path | None:
        return self._file

    def check_devices(self) -> None:
        """Raise an ExperimentError, naming the key, its value and the devices there are, when a device the
        experiment names does not exist on this machine. Run where work starts (`moce run`, `moce eval`, the
        evaluation steps), not when the file is read: a GPU experiment is read on CPU machines too."""
        device = self.evaluation.device
        available = available_devices()
        if device not in available:
            where = self._file if self._file is not None else f"experiment {self.name!r}"
            raise ExperimentError(f"{where}: evaluation.device = {device!r}: no such device on this machine; "
                                  f"available: {', '.join(available)}")

    def training_config(self):
        """The preset with this experiment's prompt format and overrides (a moce_model.training.TrainingConfig)."""

        derived = {}
        grad_accum = self.training.grad_accum_for(self.processes)
        if grad_accum is not None:  # global_batch: the accumulation follows the processes the launcher starts
            derived["grad_accum"] = grad_accum
        return TrainingConfig.preset(self.training.preset).with_overrides(
            {"prompt_format": self.base_model.prompt_format, "report_to": tuple(self.training.report_to),
             **self.training.overrides, **derived}
        )

    def study_config(self):
        """What the study job of this experiment runs (a moce_model.study.config.StudyConfig)."""

        return StudyConfig.from_mapping(self.study)

    def benchmark_specs(self) -> list:
        """The benchmarks every model of the experiment is evaluated on (moce_model.evaluation.runner)."""

        if self.evaluation.benchmarks == "paper":
            tasks = self.evaluation.lm_eval_tasks
            return paper_benchmarks(
                lm_eval_tasks_dir=self.evaluation.lm_eval_tasks_dir,
                tasks=None if tasks is None else {name: (t.task, t.num_fewshot) for name, t in tasks.items()},
            )
        if self.evaluation.lm_eval_tasks is not None:
            raise ExperimentError(f"experiment {self.name!r}: evaluation.lm_eval_tasks lists the paper benchmarks; it "
                                  "needs evaluation.benchmarks: paper")
        if self.evaluation.lm_eval_tasks_dir is not None:
            raise ExperimentError(f"experiment {self.name!r}: evaluation.lm_eval_tasks_dir stands in for the paper "
                                  "benchmarks' tasks; it needs evaluation.benchmarks: paper")
        return demo_benchmarks(
            n_per_domain=self.evaluation.generation_items_per_domain,
            n_loss_per_domain=self.evaluation.loss_items_per_domain,
            humaneval_items=self.evaluation.humaneval_items,
            gsm8k_items=self.evaluation.gsm8k_items,
            seed=self.seed,
            blends=self.evaluation.blends,
            n_blend_items=self.evaluation.blend_items,
        )

    def elbow_ks(self, n_rows: int, k_min: int | None = None, k_max: int | None = None) -> tuple[list[int], list[str]]:
        """See `elbow_ks`; k_min / k_max default to the file's."""
        return elbow_ks(self.clustering.k_min if k_min is None else k_min,
                        self.clustering.k_max if k_max is None else k_max, n_rows, self._file)

    def evaluation_settings(self) -> dict[str, str]:
        """Device, dtype, autocast (decided for this machine: `none` or `bfloat16`) and the prompt format the
        models were trained with."""
        autocast = self.evaluation.autocast
        if autocast == "bfloat16_where_native":
            autocast = "bfloat16" if native_bf16(self.evaluation.device) else "none"
        return {
            "device": self.evaluation.device,
            "dtype": self.evaluation.dtype,
            "autocast": autocast,
            "prompt_format": self.base_model.prompt_format,
        }


def available_devices() -> list[str]:
    """The devices of this machine as `evaluation.device` names them: cpu, then cuda / cuda:<i>, mps, xpu."""
    import torch

    devices = ["cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            devices += [kind, *(f"{kind}:{index}" for index in range(backend.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


# Fewer rows than this per cluster on average and some expert group learns from one or two instructions.
MIN_ROWS_PER_CLUSTER = 2


def elbow_ks(k_min: int, k_max: int, n_rows: int, file: Path | None = None) -> tuple[list[int], list[str]]:
    """The k of the elbow sweep over `n_rows` embedded instructions, and warnings naming the key whose value the
    rows cannot bear. The sweep stops at n_rows - 1 (a silhouette needs a cluster of two rows); a k_min beyond
    that is an error, a k_max beyond it a warning, and so is a range that leaves fewer than
    MIN_ROWS_PER_CLUSTER instructions per cluster on average."""
    where = f"{file}: " if file is not None else ""
    top = min(k_max, n_rows - 1)
    if top < k_min:
        raise ValueError(f"{where}clustering.k_min = {k_min}: the elbow sweep needs at least k_min + 1 = "
                         f"{k_min + 1} embedded instructions, there are {n_rows}; lower k_min or add instructions")
    warnings = []
    if k_max > top:
        warnings.append(f"{where}clustering.k_max = {k_max}: only {n_rows} embedded instructions, so the elbow "
                        f"sweep stops at k={top}")
    thin = [k for k in range(k_min, top + 1) if n_rows < MIN_ROWS_PER_CLUSTER * k]
    if thin:
        key, value = ("clustering.k_min", k_min) if thin[0] == k_min else ("clustering.k_max", k_max)
        warnings.append(f"{where}{key} = {value}: {n_rows} embedded instructions leave fewer than "
                        f"{MIN_ROWS_PER_CLUSTER} per cluster at k={thin[0]}..{thin[-1]}; some expert group would "
                        "train on a single instruction")
    return list(range(k_min, top + 1)), warnings

