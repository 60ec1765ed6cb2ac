"""What a run shows and how it shares the machine: library warnings reach the Dagster event log, and heavy steps
(model loading, training, evaluation, embedding) run at most MOCE_HEAVY_STEPS at a time."""

from __future__ import annotations

import logging
import warnings

import dagster as dg
import pytest

from assets.common import HEAVY_STEP_TAG
from pipelines.instance import INSTANCE_SETTINGS


def test_library_warnings_and_python_warnings_reach_the_event_log() -> None:
    @dg.asset
    def noisy(context) -> int:
        logging.getLogger("transformers.modeling_utils").warning("library says: weights not initialised")
        logging.getLogger("moce_model.training").debug("below the level: not in the event log")
        context.log.info("the step's own progress")
        warnings.warn("a deprecation notice", FutureWarning, stacklevel=1)
        return 1

    # pytest records warnings itself; route them as a Dagster process does (pipelines.definitions at import)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # an earlier import may have captured them under another test's hooks
        logging.captureWarnings(True)
        try:
            with dg.instance_for_test(overrides=INSTANCE_SETTINGS) as instance:
                result = dg.materialize([noisy], instance=instance)
                assert result.success
                messages = [record.user_message for record in instance.all_logs(result.run_id)]
        finally:
            logging.captureWarnings(False)
    assert any("library says: weights not initialised" in m for m in messages)
    assert any("a deprecation notice" in m for m in messages)
    assert not any("below the level" in m for m in messages)
    assert any("the step's own progress" in m for m in messages)


def test_heavy_steps_are_tagged_and_limited_by_the_executor(monkeypatch) -> None:
    from pipelines import definitions

    heavy = {key.to_user_string() for assets_def in definitions.defs.assets for key in assets_def.keys
             if HEAVY_STEP_TAG.items() <= dict(assets_def.op.tags).items()}
    assert {"base_model", "instruction_embeddings", "moce_adapters/moce", "merged_model/moce",
            "benchmark_results/moce"} <= heavy
    assert not heavy & {"instructions", "kmeans_centroids", "cluster_assignments", "benchmark_report"}

    monkeypatch.setenv("MOCE_HEAVY_STEPS", "3")
    assert definitions.heavy_step_limit() == 3
    monkeypatch.setenv("MOCE_HEAVY_STEPS", "zero")
    with pytest.raises(ValueError, match="MOCE_HEAVY_STEPS='zero'"):
        definitions.heavy_step_limit()


def test_training_progress_gives_step_loss_and_time_left() -> None:
    from moce_model.training import training_progress

    line = training_progress({"step": 10, "max_steps": 40, "loss": 1.23456, "aux_loss": "0.5", "epoch": 0.2}, 75.0)
    assert line == "step 10/40, loss 1.235, aux_loss 0.5, elapsed 1m15s, ETA 3m45s"
    assert training_progress({"step": 40, "max_steps": 40, "loss": 0.5}, 3700) == "step 40/40, loss 0.5, elapsed 1h01m"
    assert training_progress({"step": 3, "loss": 2.0}, 5) == "step 3, loss 2, elapsed 0m05s"
