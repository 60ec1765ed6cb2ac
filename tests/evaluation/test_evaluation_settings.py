"""The experiment's evaluation device, dtype, autocast and prompt format reach the lm-eval model of every benchmark
asset."""

from __future__ import annotations

import inspect
from pathlib import Path

import dagster as dg
import polars as pl
import torch

import moce_model.evaluation.runner as runner
from assets.evaluation import build_evaluation_assets
from moce_model.experiment import load_experiment
from resources.refs import BaseModelRef
from resources.storage import ArtifactStorage
from tests.evaluation.test_eval_fixtures import save_model_dir
from tests.pipeline_fixtures import small_experiment


def test_experiments_name_device_dtype_and_prompt_format(monkeypatch):
    paper, demo = load_experiment("paper"), load_experiment("demo")
    assert paper.evaluation_settings() == {"device": "cuda", "dtype": "bfloat16", "autocast": "none",
                                           "prompt_format": "human_assistant"}
    # The demo's matmuls in bf16 where the CPU computes it (AVX512-BF16 / AMX), else float32.
    monkeypatch.setenv("MOCE_NATIVE_BF16", "1")
    assert demo.evaluation_settings() == {"device": "cpu", "dtype": "float32", "autocast": "bfloat16",
                                          "prompt_format": "auto"}
    monkeypatch.setenv("MOCE_NATIVE_BF16", "0")
    assert demo.evaluation_settings()["autocast"] == "none"
    # training renders rows in the same format
    assert paper.training_config().prompt_format == "human_assistant"
    assert demo.training_config().prompt_format == "auto"


def test_benchmark_results_evaluate_in_the_experiments_dtype_and_format(tmp_path: Path, monkeypatch):
    model_dir = save_model_dir(tmp_path / "base")  # its tokenizer has a chat template; the experiment names another
    experiment = small_experiment(tmp_path, evaluation={"dtype": "bfloat16", "autocast": "bfloat16"},
                                  base_model={"prompt_format": "human_assistant"})
    (asset,) = [a for a in build_evaluation_assets(experiment)
                if dg.AssetKey(["benchmark_results", "base"]) in a.keys]

    built: list[runner.MoCELM] = []

    class RecordingLM(runner.MoCELM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(runner, "MoCELM", RecordingLM)
    config_class = inspect.signature(asset.op.compute_fn.decorated_fn).parameters["config"].annotation
    outputs = asset(context=dg.build_asset_context(), config=config_class(limit_per_benchmark=1),
                    storage=ArtifactStorage(root=str(tmp_path / "store")), model=BaseModelRef(path=str(model_dir), name="tiny"))
    (output,) = [o for o in outputs if o.output_name == "results"]  # beside it: the per-item scores

    (lm,) = built
    assert next(lm.model.parameters()).dtype == torch.bfloat16 and lm.device.type == "cpu"
    assert lm.mixed_precision_dtype == torch.bfloat16
    assert lm.prompt_format.name == "human_assistant"
    assert output.metadata["evaluated_with"].data == experiment.evaluation_settings()
    items = pl.read_parquet(tmp_path / "store" / "benchmark_items" / "base.parquet")
    synthetic = items.filter(pl.col("benchmark").str.starts_with("synthetic_"))
    assert synthetic.height == 4
    assert all("### Human:\n" in p and p.endswith("### Assistant:\n") for p in synthetic["prompt"])
    assert output.value.filter(pl.col("metric") == "heldout_loss")["value"].is_finite().all()
