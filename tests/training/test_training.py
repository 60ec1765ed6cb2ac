import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from moce_model import training
from moce_model.data.prompt_format import (
    IGNORE_INDEX,
    make_prompt_format,
    tokenize_example,
)
from moce_model.model.config import MoCEConfig
from moce_model.training import (
    InstructionCollator,
    TrainingConfig,
    build_dataset,
    find_resumable_checkpoint,
    resolve_cluster_ids,
    train,
)
from tests.tiny_models import make_char_tokenizer, save_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_base"))


def make_rows(n: int) -> pl.DataFrame:
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        rows.append(
            {
                "id": f"row{i:03d}",
                "system": "" if i % 2 else "Answer briefly.",
                "instruction": f"Add {a} and {b}.",
                "input": "" if i % 3 else f"numbers: {a}, {b}",
                "response": f"{a} + {b} = {a + b}",
            }
        )
    return pl.DataFrame(rows)


def tiny_training_config(**overrides) -> TrainingConfig:
    values = dict(
        lr=5e-3,
        warmup_steps=0,
        max_steps=6,
        per_device_batch_size=4,
        max_length=96,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        save_steps=2,
        save_total_limit=3,
        logging_steps=1,
    )
    values.update(overrides)
    return TrainingConfig.demo(**values)


def moce_config(variant: str = "moce", num_groups: int = 2) -> MoCEConfig:
    return MoCEConfig(variant=variant, num_groups=num_groups, experts_per_group=2, top_k=1, adapter_dim=4)


# ---------------------------------------------------------------------------------------------- tokenisation


def chat_format():
    return make_prompt_format("chat_template", make_char_tokenizer())


def test_labels_cover_only_the_response():
    tokenizer = make_char_tokenizer()
    example = tokenize_example(chat_format(), "Be exact.", "Add 2 and 3.", "numbers: 2, 3", "2 + 3 = 5", max_length=1000)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == len(example["attention_mask"])
    first_response = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first_response])
    assert labels[first_response:] == ids[first_response:]
    prompt_text = tokenizer.decode(ids[:first_response])
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nAdd 2 and 3.\n\nnumbers: 2, 3<|im_end|>" in prompt_text
    assert "<|im_start|>system\nBe exact.<|im_end|>" in prompt_text
    assert tokenizer.decode(ids[first_response:]) == "2 + 3 = 5<|im_end|>\n"


def test_empty_input_and_system_use_instruction_and_template_default():
    tokenizer = make_char_tokenizer()
    example = tokenize_example(chat_format(), "", "Say hi.", "", "hi", max_length=1000)
    text = tokenizer.decode(example["input_ids"])
    assert "<|im_start|>user\nSay hi.<|im_end|>" in text
    assert "You are helpful." in text


def test_truncation_and_rows_without_response_tokens_are_counted(tiny_base_dir):
    rows = make_rows(4).with_columns(
        pl.when(pl.col("id") == "row000").then(pl.lit("x" * 300)).otherwise(pl.col("instruction")).alias("instruction")
    )
    dataset, stats = build_dataset(rows, chat_format(), max_length=80, group_ids=[0, 1, 0, 1])
    assert stats["n_dropped_no_response"] == 1
    assert len(dataset) == 3
    assert all(len(example["input_ids"]) <= 80 for example in dataset.examples)


def test_collator_pads_and_keeps_cluster_ids():
    tokenizer = make_char_tokenizer()
    dataset, _ = build_dataset(make_rows(3), chat_format(), max_length=200, group_ids=[1, 0, 1])
    batch = InstructionCollator(tokenizer.pad_token_id)([dataset[0], dataset[1], dataset[2]])
    assert batch["cluster_ids"].tolist() == [1, 0, 1]
    lengths = [len(dataset[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------- cluster ids


def layout(variant: str, num_clusters: int | None = 2) -> MoCEConfig:
    return MoCEConfig(variant=variant, num_clusters=num_clusters, experts_per_group=2, top_k=1, adapter_dim=4)


def test_missing_cluster_ids_are_listed():
    with pytest.raises(ValueError, match=r"2 of 3 training rows have no cluster assignment.*'b'.*'c'"):
        resolve_cluster_ids(["a", "b", "c"], {"a": 0}, layout("moce"))


def test_cluster_count_must_match_groups():
    with pytest.raises(ValueError, match="training: the clustering has k=3 clusters but the 'moce' model has num_groups=2"):
        resolve_cluster_ids(["a"], {"a": 0}, layout("moce"), num_clusters=3)
    with pytest.raises(ValueError, match=r"cluster ids \[5\] are outside 0..1"):
        resolve_cluster_ids(["a"], {"a": 5}, layout("moce"))
    with pytest.raises(ValueError, match="no cluster assignments"):
        resolve_cluster_ids(["a"], None, layout("cluster_only"))


def test_variants_without_cluster_routing_ignore_clusters():
    assert resolve_cluster_ids(["a", "b"], None, layout("pesc", None)) == [0, 0]
    assert resolve_cluster_ids(["a", "b"], {"a": 3}, layout("dense_adapter", None), num_clusters=5) == [0, 0]
    # random_group hashes the prompt in the model; k only sizes its groups.
    assert resolve_cluster_ids(["a", "b"], None, layout("random_group", 3), num_clusters=3) == [0, 0]
    assert resolve_cluster_ids(["a"], None, None) == [0]


def test_train_reports_missing_cluster_ids_before_loading_the_model(tiny_base_dir, tmp_path):
    rows = make_rows(5)
    clusters = {row_id: 0 for row_id in rows["id"].to_list()[:3]}
    with pytest.raises(ValueError, match="2 of 5 training rows have no cluster assignment"):
        train(tiny_base_dir, rows, clusters, moce_config(), tiny_training_config(), tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()


def test_cluster_ids_reach_the_model_during_training(tiny_base_dir, tmp_path, monkeypatch):
    seen: list[list[int]] = []
    real_build = training.build_model

    def recording_build(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def record(module, args, kwargs):
            if module.training:
                seen.append(kwargs["cluster_ids"].tolist())

        model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(training.trainer, "build_model", recording_build)  # where train() looks it up
    rows = make_rows(8)
    clusters = {row_id: int(row_id[-1]) % 2 for row_id in rows["id"].to_list()}
    result = train(
        tiny_base_dir, rows, clusters, moce_config(), tiny_training_config(max_steps=2, save_steps=10), tmp_path / "run"
    )
    assert result.global_step == 2
    assert len(seen) == 2
    for batch_clusters in seen:
        assert len(batch_clusters) == 4
    assert sorted(sum(seen, [])) == sorted(clusters.values())
    # expert use is counted per group: both groups received tokens
    assert result.expert_use.shape == (2, 2)
    assert (result.expert_use.sum(axis=1) > 0).all()


# ---------------------------------------------------------------------------------------------- training


def test_training_lowers_loss_and_writes_a_loadable_artifact(tiny_base_dir, tmp_path, capsys):
    from moce_model.model.adapters import load_trained

    rows = make_rows(16)
    clusters = {row_id: i % 2 for i, row_id in enumerate(rows["id"].to_list())}
    logs = []
    result = train(
        tiny_base_dir,
        rows,
        clusters,
        moce_config(),
        tiny_training_config(max_steps=24, save_steps=100, lr=1e-2),
        tmp_path / "run",
        on_log=logs.append,
        num_clusters=2,
    )
    assert result.global_step == 24
    losses = [loss for _, loss in result.loss_history]
    first = sum(losses[:4]) / 4
    assert sum(losses[-4:]) / 4 < first - 0.3
    assert [step for step, _ in result.loss_history] == list(range(1, 25))
    assert any("loss" in record for record in logs)
    assert sum("aux_loss" in record for record in logs) == 24  # the balance loss of every step, via the probe
    assert "'loss'" not in capsys.readouterr().out  # records reach on_log, and are not printed a second time
    assert result.tokens_per_second > 0 and result.peak_memory_mb > 0
    assert result.trainable_parameters > 0
    artifact = result.artifact_dir
    assert artifact == tmp_path / "run" / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json", "tokenizer.json", "training.json"):
        assert (artifact / name).is_file(), name
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]

    reloaded = load_trained(artifact, tiny_base_dir).eval()
    tokenizer = make_char_tokenizer()
    dataset, _ = build_dataset(rows.head(4), make_prompt_format("auto", tokenizer), 96, [0, 1, 0, 1])
    batch = InstructionCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    with torch.no_grad():
        reloaded_loss = reloaded(**batch).loss
    assert reloaded_loss < first


def test_paper_precision_trains_on_cpu(tiny_base_dir, tmp_path):
    """The paper's bf16 + gradient checkpointing settings (QLoRA and paged AdamW need a GPU) on the tiny model."""
    rows = make_rows(16)
    clusters = {row_id: i % 2 for i, row_id in enumerate(rows["id"].to_list())}
    config = tiny_training_config(max_steps=8, save_steps=100, lr=1e-2, bf16=True, gradient_checkpointing=True)
    result = train(tiny_base_dir, rows, clusters, moce_config(), config, tmp_path / "run", num_clusters=2)
    losses = [loss for _, loss in result.loss_history]
    assert result.global_step == 8 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (result.artifact_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
def test_bf16_where_native_trains_in_bf16_only_where_the_device_computes_it(tiny_base_dir, tmp_path, monkeypatch,
                                                                             native):
    from moce_model.training import config as config_module
    from moce_model.training import model as model_module

    monkeypatch.setattr(config_module, "native_bf16", lambda: native)
    base_dtypes = []
    load_base_model = model_module.load_base_model

    def recording(*args, **kwargs):
        base = load_base_model(*args, **kwargs)
        base_dtypes.append(base.dtype)
        return base

    monkeypatch.setattr(model_module, "load_base_model", recording)
    rows = make_rows(8)
    config = tiny_training_config(max_steps=2, save_steps=100, bf16_where_native=True)
    result = train(tiny_base_dir, rows, {row_id: i % 2 for i, row_id in enumerate(rows["id"].to_list())},
                   moce_config(), config, tmp_path / "run", num_clusters=2)
    assert base_dtypes == [torch.bfloat16 if native else torch.float32]
    recorded = json.loads((result.artifact_dir / "training.json").read_text())["training_config"]
    assert (recorded["bf16"], recorded["bf16_where_native"]) == (native, False), "the artifact names its precision"


def test_native_bf16_means_a_cpu_with_avx512_bf16_or_amx_unless_the_environment_says(monkeypatch):
    from moce_model.training.config import cpu_computes_bf16, native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512_bf16: value)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value)
        assert cpu_computes_bf16() == (avx512_bf16 or amx)
        monkeypatch.delenv("MOCE_NATIVE_BF16", raising=False)
        assert native_bf16() == (avx512_bf16 or amx)
        for forced in ("0", "1"):
            monkeypatch.setenv("MOCE_NATIVE_BF16", forced)
            assert native_bf16() == (forced == "1")
    monkeypatch.setenv("MOCE_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match="MOCE_NATIVE_BF16='yes': expected 0 or 1"):
        native_bf16()


def test_out_of_memory_names_the_knobs(tiny_base_dir, tmp_path, monkeypatch):
    from transformers import Trainer

    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", exhausted)
    with pytest.raises(MemoryError, match="per_device_batch_size.*max_length.*gradient_checkpointing.*qlora"):
        train(tiny_base_dir, make_rows(4), None, moce_config("dense_adapter"), tiny_training_config(), tmp_path / "r")
    assert not (tmp_path / "r" / "adapter").exists()


def test_presets():
    paper = TrainingConfig.paper()
    assert (paper.lr, paper.lr_scheduler, paper.warmup_steps, paper.num_epochs) == (2e-4, "constant_with_warmup", 200, 1.0)
    assert (paper.max_length, paper.optim, paper.max_grad_norm, paper.bf16, paper.qlora) == (
        512, "paged_adamw_32bit", 0.3, True, True
    )
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout) == (64, 16, 0.1)
    assert paper.compile and paper.gradient_checkpointing
    assert set(paper.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    demo = TrainingConfig.demo()
    assert not demo.qlora and not demo.bf16 and not demo.compile and demo.optim == "adamw_torch"
    assert demo.bf16_where_native, "the demo trains in bf16 where the device computes it natively"
    assert TrainingConfig.from_dict(demo.to_dict()) == demo
    with pytest.raises(ValueError, match="unknown training config field"):
        TrainingConfig.from_dict({"learning_rate": 1.0})


def test_named_presets_and_overrides():
    assert TrainingConfig.preset("paper") == TrainingConfig.paper()
    assert TrainingConfig.preset("demo") == TrainingConfig.demo()
    with pytest.raises(ValueError, match=r"training preset 'huge' is not one of \['demo', 'paper'\]"):
        TrainingConfig.preset("huge")
    paper = TrainingConfig.paper()
    tuned = paper.with_overrides({"max_steps": 10, "lr": 1, "lora_targets": ["q_proj", "v_proj"]})
    assert (tuned.max_steps, tuned.lr, tuned.lora_targets) == (10, 1.0, ("q_proj", "v_proj"))
    assert isinstance(tuned.lr, float)
    assert tuned.qlora and tuned.optim == paper.optim  # what is not overridden keeps the preset's value
    assert paper.max_steps is None  # the preset itself is not changed
    assert paper.with_overrides({}) == paper and paper.with_overrides(None) == paper
    assert TrainingConfig.demo(max_steps=None).max_steps is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 1e-4}, r"unknown training config field 'learning_rate' \(did you mean 'lr'\?\)"),
        ({"max_stpes": 5}, r"unknown training config field 'max_stpes' \(did you mean 'max_steps'\?\)"),
        ({"zzz": 5}, r"unknown training config field 'zzz'; known fields: \['bf16'"),
        ({"lr": "fast"}, r"training config field 'lr': expected finite float, got 'fast' \(str\)"),
        ({"max_steps": 2.5}, r"training config field 'max_steps': expected int or None, got 2.5"),
        ({"qlora": "yes"}, r"training config field 'qlora': expected bool, got 'yes'"),
        ({"per_device_batch_size": True}, r"field 'per_device_batch_size': expected int, got True \(bool\)"),
        ({"lora_targets": "q_proj"}, r"field 'lora_targets': expected a list of str, got 'q_proj'"),
        # The Trainer would read these as "train a whole epoch" and "a learning rate": refused, not trained on.
        ({"max_steps": 0}, r"field 'max_steps' = 0: expected an int >= 1, or null to train num_epochs"),
        ({"lr": float("nan")}, r"field 'lr': expected finite float, got nan \(float\)"),
        ({"report_to": ["tensorbored"]}, r"field 'report_to' = \['tensorbored'\]: expected \['none'\] or a list"),
        ({"report_to": ["none", "wandb"]}, r"field 'report_to' = \['none', 'wandb'\]"),
        ({"report_to": []}, r"field 'report_to' = \[\]"),
    ],
)
def test_overrides_are_validated_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig.demo().with_overrides(overrides)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tiny_base_dir, tmp_path):
    rows = make_rows(8)
    run = tmp_path / "run"
    config = tiny_training_config(max_steps=4, save_steps=2)
    train(tiny_base_dir, rows, None, moce_config("pesc", 1), config, run)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    weights = checkpoints / "checkpoint-4" / training.TRAINABLE_STATE_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    assert find_resumable_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    assert not (checkpoints / "checkpoint-4").exists()
    result = train(tiny_base_dir, rows, None, moce_config("pesc", 1), config, run)
    assert result.resumed_from_step == 2
    assert result.global_step == 4


def test_interrupted_checkpoint_without_trainer_state_is_skipped(tmp_path):
    complete = tmp_path / "checkpoint-3"
    complete.mkdir()
    (complete / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(complete / training.TRAINABLE_STATE_NAME))
    partial = tmp_path / "checkpoint-6"
    partial.mkdir()
    save_file({"w": torch.zeros(2)}, str(partial / training.TRAINABLE_STATE_NAME))
    assert find_resumable_checkpoint(tmp_path) == complete


def _write_spec(path: Path, base_dir: Path, rows: pl.DataFrame, output_dir: Path, config: TrainingConfig, variant: str):
    data = path.parent / "train.parquet"
    rows.write_parquet(data)
    assignments = None
    moce = {"variant": variant, "num_groups": 2, "experts_per_group": 2, "top_k": 1, "adapter_dim": 4}
    if variant in ("moce", "cluster_only"):
        assignments = path.parent / "assignments.parquet"
        ids = rows["id"].to_list()
        pl.DataFrame({"id": ids, "cluster": [i % 2 for i in range(len(ids))], "distance": [0.1] * len(ids)}).write_parquet(
            assignments
        )
    spec = {
        "base_model_dir": str(base_dir),
        "train_data": str(data),
        "cluster_assignments": None if assignments is None else str(assignments),
        "moce_config": moce,
        "training_config": config.to_dict(),
        "output_dir": str(output_dir),
    }
    path.write_text(json.dumps(spec))
    return path


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigkill_then_restart_resumes_from_last_checkpoint(tiny_base_dir, tmp_path):
    rows = make_rows(32)
    config = tiny_training_config(max_steps=20, save_steps=5, per_device_batch_size=8, max_length=128)
    spec = _write_spec(tmp_path / "run.json", tiny_base_dir, rows, tmp_path / "run", config, "moce")
    command = [sys.executable, "-m", "moce_model.training.entry", "--spec", str(spec)]
    first_state = tmp_path / "run" / "checkpoints" / "checkpoint-5" / "trainer_state.json"
    process = subprocess.Popen(command, env=_subprocess_env(), cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not first_state.exists():
            assert process.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        assert process.poll() is None, "training finished before it could be killed; make the run longer"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "result.json").exists()
    assert not (tmp_path / "run" / "adapter").exists()
    surviving = find_resumable_checkpoint(tmp_path / "run" / "checkpoints")
    killed_at = int(surviving.name.split("-")[1])
    assert 5 <= killed_at < 20

    subprocess.run(command, env=_subprocess_env(), cwd=REPO_ROOT, check=True, timeout=300)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["resumed_from_step"] == killed_at
    assert result["global_step"] == 20
    final_state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-20" / "trainer_state.json").read_text())
    assert final_state["global_step"] == 20
    logged_steps = [entry["step"] for entry in final_state["log_history"] if "loss" in entry]
    assert logged_steps == list(range(1, 21))

    # Same data order, RNG and optimizer state: the resumed run ends where an uninterrupted one does.
    uninterrupted = train(tiny_base_dir, rows, {r: i % 2 for i, r in enumerate(rows["id"])},
                          moce_config(), config, tmp_path / "straight")
    assert uninterrupted.global_step == 20
    resumed_weights = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-20" / training.TRAINABLE_STATE_NAME)
    straight_weights = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-20" / training.TRAINABLE_STATE_NAME)
    assert resumed_weights.keys() == straight_weights.keys()
    for name in resumed_weights:
        torch.testing.assert_close(resumed_weights[name], straight_weights[name], rtol=1e-4, atol=1e-5)


def test_torchrun_two_processes(tiny_base_dir, tmp_path):
    rows = make_rows(16)
    config = tiny_training_config(max_steps=None, num_epochs=1.0, per_device_batch_size=2, save_steps=100)
    spec = _write_spec(tmp_path / "run.json", tiny_base_dir, rows, tmp_path / "run", config, "moce")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "moce_model.training.entry", "--spec", str(spec),
    ]
    completed = subprocess.run(
        command, env=_subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2
    # 16 rows / (2 per device x 2 ranks) = 4 optimizer steps in one epoch
    assert result["global_step"] == 4
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_run_spec_errors_name_the_field(tmp_path):
    from moce_model.training.entry import load_spec

    spec = tmp_path / "run.json"
    spec.write_text(json.dumps({"base_model_dir": "b", "train_data": "t.parquet", "output_dir": "o"}))
    with pytest.raises(ValueError, match="'training_config' is required"):
        load_spec(spec)
    spec.write_text(json.dumps({"base_model_dir": "b", "train_data": "t", "training_config": {}, "output_dir": "o",
                                "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]"):
        load_spec(spec)
    spec.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_spec(spec)
    with pytest.raises(FileNotFoundError, match="run spec not found"):
        load_spec(tmp_path / "missing.json")


def test_checkpoints_of_a_different_run_are_not_resumed(tiny_base_dir, tmp_path):
    rows = make_rows(8)
    run = tmp_path / "run"
    train(tiny_base_dir, rows, None, moce_config("pesc", 1), tiny_training_config(max_steps=2, save_steps=2), run)
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    same = train(tiny_base_dir, rows, None, moce_config("pesc", 1), tiny_training_config(max_steps=4, save_steps=2), run)
    assert same.resumed_from_step == 0  # max_steps is part of the run: a longer run is a different run
    again = train(tiny_base_dir, rows, None, moce_config("pesc", 1), tiny_training_config(max_steps=4, save_steps=2), run)
    assert again.resumed_from_step == 4 and again.global_step == 4
    other_data = train(
        tiny_base_dir, make_rows(9), None, moce_config("pesc", 1), tiny_training_config(max_steps=4, save_steps=2), run
    )
    assert other_data.resumed_from_step == 0 and other_data.global_step == 4


def test_compiled_runs_pad_batches_to_a_few_lengths() -> None:
    """Compiled layers see static shapes (see build_model): every batch width is a multiple of a quarter of
    max_length, so a whole run has at most four widths, and the padding is masked out of attention and loss."""
    from moce_model.training import InstructionCollator, compiled_length_bucket

    assert compiled_length_bucket(512) == 128 and compiled_length_bucket(96) == 24 and compiled_length_bucket(10) == 8
    collator = InstructionCollator(pad_token_id=0, pad_to_multiple_of=compiled_length_bucket(512))
    widths = set()
    for length in range(1, 513, 7):
        batch = collator([{"input_ids": [5] * length, "attention_mask": [1] * length, "labels": [5] * length,
                           "cluster_ids": 1}])
        widths.add(batch["input_ids"].shape[1])
        assert int(batch["attention_mask"].sum()) == length
        assert int((batch["labels"] != -100).sum()) == length
    assert widths == {128, 256, 384, 512}
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        InstructionCollator(pad_token_id=0, pad_to_multiple_of=0)


def test_report_to_config_reaches_the_training_args(tmp_path):
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from moce_model.training.config import REPORT_TO_INTEGRATIONS
    from moce_model.training.hf_trainer import training_arguments

    assert set(REPORT_TO_INTEGRATIONS) == set(INTEGRATION_TO_CALLBACK)  # the names transformers takes
    assert training_arguments(tiny_training_config(), tmp_path).report_to == []  # "none"
    args = training_arguments(tiny_training_config(report_to=["tensorboard", "mlflow"]), tmp_path)
    assert args.report_to == ["tensorboard", "mlflow"]


def test_report_to_tensorboard_config_writes_event_files_in_the_run_directory(tiny_base_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    rows = make_rows(8)
    result = train(tiny_base_dir, rows, None, moce_config("pesc", 1),
                   tiny_training_config(max_steps=2, save_steps=100, report_to=["tensorboard"]), tmp_path / "run")
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
    assert result.trackers == {"tensorboard": str((tmp_path / "run" / "logs").resolve())}


def test_report_to_mlflow_records_the_run_loss_in_a_local_file_store(tiny_base_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    rows = make_rows(8)
    result = train(tiny_base_dir, rows, None, moce_config("pesc", 1),
                   tiny_training_config(max_steps=2, logging_steps=1, save_steps=100, report_to=["mlflow"]),
                   tmp_path / "run")
    store = f"sqlite:///{(tmp_path / 'run' / 'logs' / 'mlflow.db').resolve()}"
    assert result.trackers == {"mlflow": store}
    client = mlflow.tracking.MlflowClient(store)
    [run] = client.search_runs(["0"])
    assert run.info.status == "FINISHED"
    losses = [metric.value for metric in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 2 and all(value > 0 for value in losses)
    assert run.data.params["max_steps"] == "2"
