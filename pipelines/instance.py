"""The Dagster instance of this project: its `dagster.yaml`, and runs whose process was killed marked failed.

`python -m pipelines.instance DAGSTER_HOME` writes (or updates) `DAGSTER_HOME/dagster.yaml` with the settings
below; every `moce` command writes it the same way before it runs (pipelines/cli.py), and the tests' instance uses
the same settings.

Run monitoring (`run_monitoring`, run by the daemon that `dagster dev` starts) fails runs stuck starting or
cancelling; a run worker that dies under `dagster dev` is failed by its code server. Neither sees a run executed
in-process (`make demo`, `dagster asset materialize`) whose process is SIGKILLed: it would stay STARTED for ever.
Such runs record their process (`resources.run_process`), and `fail_runs_of_dead_processes` marks the runs whose
process is gone as failed: at the start of `make demo` and, while `dagster dev` runs, from the
`fail_runs_of_killed_processes` sensor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from moce_model.experiment import deep_merged
from moce_model.common.io import atomic_write_text

from resources.run_process import RUN_PROCESS_TAG, process_is_gone

INSTANCE_FILE = "dagster.yaml"
INSTANCE_SETTINGS: dict[str, Any] = {
    "telemetry": {"enabled": False},
    "run_monitoring": {
        "enabled": True,
        # Dagster's documented defaults, written out so the file says what is in force.
        "start_timeout_seconds": 180,
        "cancel_timeout_seconds": 180,
        "poll_interval_seconds": 120,
        # The default run launcher cannot resume a run on a new worker: fail it instead of trying.
        "max_resume_run_attempts": 0,
    },
}
# Warnings that libraries log (transformers, peft, lm-eval, ...) reach each step's Dagster event log, not only
# the terminal; `warnings.warn` messages go through logging's `py.warnings` (pipelines/definitions.py).
INSTANCE_SETTINGS["python_logs"] = {
    # INFO: the level also applies to the steps' own context.log; libraries keep their own levels
    # (transformers and torch log warnings and above unless told otherwise).
    "python_log_level": "INFO",
    "managed_python_loggers": ["moce_model", "transformers", "peft", "accelerate", "sentence_transformers",
                               "lm-eval", "lm_eval", "bitsandbytes", "py.warnings"],
}
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def write_instance_config(home: str | Path) -> Path:
    """Write `home/dagster.yaml` with `INSTANCE_SETTINGS`, keeping any other setting an existing file has."""
    path = Path(home) / INSTANCE_FILE
    existing: Any = {}
    if path.is_file():
        try:
            existing = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error}); fix or remove it") from error
        if not isinstance(existing, dict):
            raise ValueError(f"{path}: expected a mapping of instance settings, got {type(existing).__name__}")
    atomic_write_text(yaml.safe_dump(deep_merged(existing, INSTANCE_SETTINGS), sort_keys=False), path)
    return path


def fail_runs_of_dead_processes(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every starting or started run whose recorded process has ended; returns their run ids.

    Runs without a recorded process, or whose process ran on another host, are left alone.
    """
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        identity = run.tags.get(RUN_PROCESS_TAG)
        if identity is None or not process_is_gone(identity):
            continue
        # Re-read: the run may have finished while the others were being checked.
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in IN_PROGRESS:
            continue
        instance.report_run_failed(
            current,
            message=f"the process that ran it ({identity}) ended without finishing the run (killed?); marked failed",
        )
        failed.append(run.run_id)
    return failed


@dg.sensor(
    name="fail_runs_of_killed_processes",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Marks failed the runs whose process was killed (they would otherwise stay STARTED).",
)
def fail_runs_of_killed_processes(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    failed = fail_runs_of_dead_processes(context.instance)
    return dg.SkipReason(f"marked failed: {failed}" if failed else "no run of a killed process")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.instance DAGSTER_HOME", file=sys.stderr)
        return 2
    print(f"wrote {write_instance_config(args[0])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
