"""The training launcher's command lines: one node, several GPUs, several nodes (torchrun rendezvous)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from resources.trainer import REPO_ROOT, TrainerResource

SPEC = Path("/runs/moce/run_spec.json")


def test_one_node_torchrun_and_deepspeed() -> None:
    torchrun = TrainerResource(launcher="torchrun", nproc_per_node=8).launch_command(SPEC)
    assert torchrun == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8",
                        "-m", "resources.pipes_train_entry", "--spec", str(SPEC)]
    deepspeed = TrainerResource(launcher="deepspeed", nproc_per_node=8).launch_command(SPEC)
    assert deepspeed[:3] == ["deepspeed", "--num_gpus=8", "--module"]


def test_several_nodes_join_through_the_rendezvous_endpoint() -> None:
    command = TrainerResource(launcher="deepspeed", nproc_per_node=8, nnodes=4, node_rank=2,
                              rdzv_endpoint="node0:29500").launch_command(SPEC)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nproc_per_node=8", "--nnodes=4", "--node_rank=2", "--rdzv_backend=c10d",
            "--rdzv_endpoint=node0:29500"} <= set(command)


def test_node_rank_and_endpoint_come_from_slurm_or_kubernetes_variables(monkeypatch) -> None:
    for variable in ("NODE_RANK", "SLURM_NODEID", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    resource = TrainerResource(launcher="torchrun", nproc_per_node=4, nnodes=2)
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        resource.launch_command(SPEC)
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("MASTER_ADDR", "gpu-node-17")
    monkeypatch.setenv("MASTER_PORT", "29600")
    command = resource.launch_command(SPEC)
    assert "--node_rank=1" in command and "--rdzv_endpoint=gpu-node-17:29600" in command


def test_zero2_config_keeps_the_trainers_optimiser() -> None:
    """The paper trains with paged AdamW: a DeepSpeed `optimizer` block would replace it."""
    config = json.loads((REPO_ROOT / "configs" / "zero2.json").read_text())
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_allow_untested_optimizer"] is True  # DeepSpeed refuses client optimisers otherwise
    assert config["zero_optimization"]["stage"] == 2
