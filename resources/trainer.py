from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import dagster as dg
import polars as pl

from moce_model.common.processes import terminable_children

REPO_ROOT = Path(__file__).resolve().parent.parent


class TrainerResource(dg.ConfigurableResource):
    """How a variant is trained: in this process (CPU or one GPU), or as a `torchrun` / `deepspeed` job of
    several processes launched through dagster-pipes (rank 0 reports metadata back to the asset)."""

    launcher: str = "in_process"
    nproc_per_node: int = 1
    # Several nodes: each node runs the same asset with its own node_rank; torchrun's c10d rendezvous at
    # rdzv_endpoint (host:port) joins them. Unset values come from the environment (Slurm, Kubernetes jobs).
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    deepspeed_config: str = str(REPO_ROOT / "configs" / "zero2.json")

    def train(
        self,
        context: dg.AssetExecutionContext,
        *,
        base_model_dir: str,
        train_rows: pl.DataFrame,
        cluster_ids: dict[str, int] | None,
        num_clusters: int | None,
        moce_config: Any,
        training_config: Any,
        output_dir: Path,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Returns the training result as a JSON dict (TrainResult.to_json_dict())."""
        if self.launcher == "in_process":
            from moce_model.training import train

            result = train(
                base_model_dir=base_model_dir,
                train_rows=train_rows,
                cluster_ids=cluster_ids,
                moce_config=moce_config,
                training_config=training_config,
                output_dir=output_dir,
                resume=True,
                on_log=on_log,
                num_clusters=num_clusters,
            )
            return result.to_json_dict()
        if self.launcher not in ("torchrun", "deepspeed"):
            raise ValueError(f"TrainerResource.launcher={self.launcher!r}: expected in_process, torchrun or deepspeed")
        return self._train_in_subprocesses(
            context, base_model_dir, train_rows, cluster_ids, num_clusters, moce_config, training_config, output_dir
        )

    def resolved_node_rank(self) -> int:
        if self.node_rank is not None:
            return self.node_rank
        for variable in ("NODE_RANK", "SLURM_NODEID", "GROUP_RANK"):
            if os.environ.get(variable, "").isdigit():
                return int(os.environ[variable])
        return 0

    def resolved_rdzv_endpoint(self) -> str:
        if self.rdzv_endpoint:
            return self.rdzv_endpoint
        if os.environ.get("MASTER_ADDR"):
            return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
        raise ValueError(
            f"TrainerResource.nnodes={self.nnodes} needs a rendezvous endpoint: set rdzv_endpoint (host:port of "
            "node 0) or MASTER_ADDR/MASTER_PORT"
        )

    def launch_command(self, spec_path: Path) -> list[str]:
        """The launcher's command line. On one node `deepspeed` runs DeepSpeed's own launcher; across nodes every
        launcher goes through torchrun (no ssh between nodes), and the Trainer starts DeepSpeed's engine itself
        from the training config's `deepspeed` file."""
        entry = ["resources.pipes_train_entry", "--spec", str(spec_path)]
        if self.launcher == "deepspeed" and self.nnodes == 1:
            return ["deepspeed", f"--num_gpus={self.nproc_per_node}", "--module", *entry]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}"]
        if self.nnodes > 1:
            command += [f"--nnodes={self.nnodes}", f"--node_rank={self.resolved_node_rank()}",
                        "--rdzv_backend=c10d", f"--rdzv_endpoint={self.resolved_rdzv_endpoint()}"]
        return [*command, "-m", *entry]

    def _train_in_subprocesses(
        self, context, base_model_dir, train_rows, cluster_ids, num_clusters, moce_config, training_config, output_dir
    ) -> dict[str, Any]:
        from moce_model.common.io import atomic_write_parquet
        from moce_model.training.entry import TrainSpec

        output_dir.mkdir(parents=True, exist_ok=True)
        rows_path = output_dir / "train_rows.parquet"
        atomic_write_parquet(train_rows, rows_path)
        clusters_path = None
        if cluster_ids is not None:
            clusters_path = output_dir / "cluster_ids.parquet"
            atomic_write_parquet(
                pl.DataFrame({"id": list(cluster_ids), "cluster": list(cluster_ids.values())}), clusters_path
            )
        config_dict = training_config.to_dict()
        if self.launcher == "deepspeed":
            config_dict["deepspeed"] = self.deepspeed_config
        spec_path = TrainSpec(
            base_model_dir=str(base_model_dir),
            train_data=str(rows_path),
            cluster_assignments=str(clusters_path) if clusters_path else None,
            num_clusters=num_clusters,
            moce_config=moce_config.to_dict() if hasattr(moce_config, "to_dict") else moce_config,
            training_config=config_dict,
            output_dir=str(output_dir),
        ).write(output_dir / "run_spec.json")
        command = self.launch_command(spec_path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        with terminable_children():  # so that stopping the run (SIGTERM to the launcher) ends the training
            dg.PipesSubprocessClient(env=env, cwd=str(REPO_ROOT)).run(command=command, context=context)
        return json.loads((output_dir / "result.json").read_text())
