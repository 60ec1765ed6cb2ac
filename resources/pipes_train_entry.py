"""The training entry point as launched by the pipeline through Dagster Pipes (under torchrun/deepspeed).

Rank 0 forwards the training log to the asset's log and reports the run's metrics as metadata; every rank
trains through `moce_model.training.entry.run`, which itself needs no Dagster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dagster_pipes import open_dagster_pipes

from moce_model.training.entry import load_spec, run

REPORTED = ("global_step", "tokens_per_second", "peak_memory_mb", "trainable_parameters", "train_seconds",
            "resumed_from_step", "artifact_dir", "world_size")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    spec = load_spec(parser.parse_args(argv).spec)
    if int(os.environ.get("RANK", "0")) != 0:
        run(spec)
        return 0
    with open_dagster_pipes() as pipes:
        result = run(spec, on_log=lambda record: pipes.log.info(json.dumps(record, default=str)))
        pipes.report_asset_materialization(metadata={key: result.get(key) for key in REPORTED})
    return 0


if __name__ == "__main__":
    sys.exit(main())
