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
    from moce_model.common.logs import BITSANDBYTES_KERNELS_LOGGER, quiet_library_logs

    @dg.asset
    def noisy(context) -> int:
        logging.getLogger("transformers.modeling_utils").warning("library says: weights not initialised")
        logging.getLogger("transformers.configuration_utils").info("library chatter: Model config LlamaConfig {")
        logging.getLogger("peft.tuners").info("library chatter: peft")
        logging.getLogger(BITSANDBYTES_KERNELS_LOGGER).warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "no kernels")
        logging.getLogger(BITSANDBYTES_KERNELS_LOGGER).warning("bitsandbytes says: another warning")
        logging.getLogger("moce_model.training").debug("below the level: not in the event log")
        logging.getLogger("moce_model.evaluation.runner").info("our own progress line")
        context.log.info("the step's own progress")
        warnings.warn("a deprecation notice", FutureWarning, stacklevel=1)
        return 1

    quiet_library_logs(verbose=False)  # what pipelines.definitions does when a process loads the definitions

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
    assert any("our own progress line" in m for m in messages)
    assert any("bitsandbytes says: another warning" in m for m in messages)
    assert not any("library chatter" in m or "kernels-community" in m for m in messages)


def test_the_instance_leaves_each_logger_its_own_level_and_shows_no_onboarding_dialog(tmp_path) -> None:
    import yaml

    from pipelines.instance import write_instance_config

    # an instance an earlier version wrote: python_log_level set every managed logger (libraries too) to INFO
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({
        "python_logs": {"python_log_level": "INFO", "managed_python_loggers": ["moce_model"]},
        "storage": {"sqlite": {"base_dir": "x"}}}))
    written = yaml.safe_load(write_instance_config(tmp_path).read_text())
    assert "python_log_level" not in written["python_logs"] and "transformers" in written["python_logs"][
        "managed_python_loggers"]
    assert written["nux"] == {"enabled": False} and written["telemetry"] == {"enabled": False}
    assert written["storage"] == {"sqlite": {"base_dir": "x"}}
    with dg.instance_for_test(overrides=INSTANCE_SETTINGS) as instance:
        assert instance.python_log_level is None and not instance.nux_enabled


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
