"""Careless or hostile experiment files: bounded YAML (aliases, size, repeated keys), values out of range,
environment values that do not parse, a storage root that cannot be one, a device that does not exist and a k
range the rows cannot bear. Every error names the file, the key and the value."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from moce_model.common.field_values import conformed
from moce_model.experiment import (
    MAX_ALIASES,
    ExperimentError,
    available_devices,
    elbow_ks,
    load_experiment,
    read_yaml,
)
from moce_model.study.config import StudyConfig
from moce_model.training import TrainingConfig
from pipelines.cli import main as moce
from resources.refs import CentroidsRef, EmbeddingsRef
from tests.experiment.test_experiment import _my_experiment, _write, clean_env  # noqa: F401  (clean_env: a fixture)


def _bomb(levels: int, width: int = 9) -> str:
    """`levels` lists of `width` aliases of the one below: width**levels strings from a few hundred bytes."""
    lines = ["a0: &a0 [" + ",".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 6, 9])
def test_an_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path, clean_env, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(levels))
    assert len(path.read_bytes()) < 600  # 5 levels took 3-6 s and gave a 4-8 MB message before the bounds
    started = time.perf_counter()
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    assert time.perf_counter() - started < 0.5
    message = str(error.value)
    assert len(message) < 500
    assert message.startswith(f"{path}: not valid YAML") and "expand to more than 1,000,000 characters" in message
    assert f'in "{path}", line' in message


def test_many_aliases_are_refused_even_when_they_expand_to_little(tmp_path, clean_env):
    path = tmp_path / "aliases.yaml"
    path.write_text("x: &x 1\nmany: [" + ",".join(["*x"] * (MAX_ALIASES + 1)) + "]\n")
    with pytest.raises(ExperimentError, match=f"more than {MAX_ALIASES} aliases") as error:
        load_experiment(path)
    assert f'in "{path}", line 2' in str(error.value)


def test_a_few_aliases_within_the_bounds_still_work():
    assert read_yaml("base: &b {k_min: 2}\nother: *b\nmerged: {<<: *b, k_min: 3}\n", "f.yaml") == {
        "base": {"k_min": 2}, "other": {"k_min": 2}, "merged": {"k_min": 3}}


def test_a_recursive_alias_and_deep_nesting_are_refused():
    with pytest.raises(yaml.YAMLError, match="refers to the node that contains it"):
        read_yaml("a: &a [1, *a]\n", "f.yaml")
    with pytest.raises(yaml.YAMLError, match="nested too deeply"):
        read_yaml("[" * 5_000 + "]" * 5_000, "f.yaml")


def test_an_oversized_file_is_refused_before_parsing(tmp_path, clean_env):
    path = tmp_path / "huge.yaml"
    path.write_text("description: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ExperimentError, match=r"more than the 1,048,576 an experiment may have"):
        load_experiment(path)


def test_a_key_given_twice_is_refused_naming_line_and_key(tmp_path, clean_env):
    text = yaml.safe_dump(_my_experiment(), sort_keys=False)
    path = tmp_path / "twice.yaml"
    path.write_text(text + "clustering:\n  k_min: 3\n")
    first = 1 + text.splitlines().index("clustering:")
    second = 1 + len(text.splitlines())
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    message = str(error.value)
    assert f"key 'clustering' appears twice in this mapping (first on line {first})" in message
    assert f'in "{path}", line {second}' in message
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("  k_min: 2\n", "  k_min: 2\n  k_min: 5\n"))
    with pytest.raises(ExperimentError, match="key 'k_min' appears twice"):
        load_experiment(nested)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"seed": True}, ["seed = True", "valid integer"]),
        ({"seed": -1}, ["seed = -1", "greater than or equal to 0"]),
        ({"seed": 2**32}, ["seed = 4294967296", "less than or equal to 4294967295"]),
        ({"clustering": {"k_max": 100_000}},
         ["clustering = {'k_max': 100000}", "k_max=100000 exceeds elbow_sample_rows=20000"]),
        ({"clustering": {"k_min": True}}, ["clustering.k_min = True", "valid integer"]),
        ({"clustering": {"restarts": 0}}, ["clustering.restarts = 0", "greater than 0"]),
        ({"embedder": {"model": "m", "batch_size": -8}}, ["embedder.batch_size = -8", "greater than 0"]),
        ({"embedder": {"model": "m", "batch_size": True}}, ["embedder.batch_size = True", "valid integer"]),
        ({"experts": {"adapter_dim": 0}}, ["experts.adapter_dim = 0", "greater than 0"]),
        ({"experts": {"soft_assignment": {"margin": float("nan")}}},
         ["experts.soft_assignment.margin = nan", "finite number"]),
        ({"experts": {"soft_assignment": {"temperature": True}}},
         ["experts.soft_assignment.temperature = True", "valid number"]),
        ({"training": {"train_rows": 0}}, ["training.train_rows = 0", "greater than 0"]),
        ({"training": {"overrides": {"max_steps": 0}}},
         ["training.overrides = {'max_steps': 0}", "'max_steps' = 0: expected an int >= 1, or null to train"]),
        ({"training": {"overrides": {"max_steps": -5}}}, ["'max_steps' = -5: expected an int >= 1"]),
        ({"training": {"overrides": {"lr": float("nan")}}},
         ["training.overrides = {'lr': nan}", "training config field 'lr': expected finite float, got nan"]),
        ({"training": {"overrides": {"lr": 0}}}, ["'lr' = 0.0: expected a finite number > 0"]),
        ({"training": {"overrides": {"per_device_batch_size": 0}}},
         ["'per_device_batch_size' = 0: expected an int >= 1"]),
        ({"training": {"overrides": {"lora_dropout": 1.0}}}, ["'lora_dropout' = 1.0: expected a number in [0, 1)"]),
        ({"training": {"overrides": {"warmup_steps": -1}}}, ["'warmup_steps' = -1: expected an int >= 0"]),
        ({"training": {"overrides": {"num_threads": 0}}}, ["'num_threads' = 0: expected an int >= 1, or null"]),
        ({"training": {"overrides": {"lora_targets": []}}},
         ["'lora_targets' = (): expected a non-empty list of module names"]),
        ({"launcher": {"nnodes": 2, "node_rank": 2}}, ["node_rank=2 is not a node of nnodes=2 (0..1)"]),
        ({"evaluation": {"device": "gpu0"}}, ["evaluation.device = 'gpu0'", "should match pattern"]),
        ({"evaluation": {"loss_items_per_domain": 0}}, ["evaluation.loss_items_per_domain = 0", "greater than 0"]),
        ({"max_instruction_chars": 0}, ["max_instruction_chars = 0", "greater than 0"]),
        ({"study": {"lr": float("inf")}}, ["study lr = inf: expected finite float"]),
        ({"study": {"lr": -0.1}}, ["study lr must be a finite number > 0, got -0.1"]),
        ({"study": {"seeds": [0, -1]}}, ["study seeds and noise_seed must be in [0, 2**32), got -1"]),
        ({"study": {"gsm8k_max_new_tokens": 0}}, ["study gsm8k_max_new_tokens must be at least 1, got 0"]),
    ],
    ids=["seed_bool", "seed_negative", "seed_too_large", "k_max_past_the_elbow_sample", "k_min_bool",
         "restarts_zero", "batch_size_negative", "batch_size_bool", "adapter_dim_zero", "soft_margin_nan",
         "soft_temperature_bool", "train_rows_zero", "max_steps_zero", "max_steps_negative", "lr_nan", "lr_zero",
         "batch_zero", "dropout_one", "warmup_negative", "threads_zero", "no_lora_targets", "node_rank_past_nnodes",
         "device_malformed", "loss_items_zero", "instruction_chars_zero", "study_lr_inf", "study_lr_negative",
         "study_seed_negative", "study_new_tokens_zero"],
)
def test_out_of_range_values_name_file_key_and_value(tmp_path, clean_env, change, expected):
    path = _write(tmp_path / "bad.yaml", _my_experiment(**change))
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    message = str(error.value)
    assert message.startswith(f"{path}: 1 problem(s)")
    for part in expected:
        assert part in message


def test_a_long_value_is_shortened_in_the_message(tmp_path, clean_env):
    path = _write(tmp_path / "bad.yaml", _my_experiment(clustering={"k_max": "x" * 50_000}))
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    assert "clustering.k_max = 'xxx" in str(error.value) and "(50,002 characters)" in str(error.value)
    assert len(str(error.value)) < 1_000


def test_training_config_ranges_hold_for_every_construction():
    with pytest.raises(ValueError, match="'max_steps' = 0"):
        TrainingConfig(max_steps=0)
    with pytest.raises(ValueError, match="'seed' = -1"):
        TrainingConfig.from_dict({"seed": -1})
    assert TrainingConfig.demo().max_steps == 40 and TrainingConfig.paper().max_steps is None
    assert TrainingConfig().with_overrides({"max_grad_norm": 0.0, "max_steps": None}).max_grad_norm == 0.0


def test_study_config_refuses_a_learning_rate_of_nan():
    with pytest.raises(ValueError, match=r"study lr = nan: expected finite float"):
        StudyConfig.from_mapping({"lr": math.nan})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_a_float_field_takes_only_finite_numbers(value):
    with pytest.raises(TypeError, match="^expected finite float$"):
        conformed(value, float)


def test_an_environment_value_that_is_not_yaml_names_the_variable(tmp_path, clean_env):
    path = _write(tmp_path / "env.yaml", _my_experiment(seed="${MY_SEED}"))
    clean_env.setenv("MY_SEED", "[1, 2")
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    message = str(error.value)
    assert message.startswith(f"{path}: seed = '${{MY_SEED}}': the value of $MY_SEED, '[1, 2', is not a valid YAML")
    assert 'in "$MY_SEED"' in message
    clean_env.setenv("MY_SEED", "true")
    with pytest.raises(ExperimentError, match=r"seed = True: Input should be a valid integer.*\$MY_SEED"):
        load_experiment(path)
    clean_env.setenv("MY_SEED", "7")
    assert load_experiment(path).seed == 7


def test_an_environment_alias_bomb_is_refused_too(tmp_path, clean_env):
    path = _write(tmp_path / "env.yaml", _my_experiment(description="${MY_TEXT}"))
    clean_env.setenv("MY_TEXT", _bomb(6))
    started = time.perf_counter()
    with pytest.raises(ExperimentError, match=r"the value of \$MY_TEXT.*expand to more than"):
        load_experiment(path)
    assert time.perf_counter() - started < 0.5


def test_a_storage_root_that_is_a_file_is_named(tmp_path, clean_env):
    (tmp_path / "a_file").write_text("not a directory")
    path = _write(tmp_path / "root.yaml", _my_experiment(storage_root="a_file"))
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    assert f"storage_root = 'a_file': {tmp_path / 'a_file'} exists and is not a directory" in str(error.value)
    below = _write(tmp_path / "below.yaml", _my_experiment(storage_root="a_file/store"))
    with pytest.raises(ExperimentError, match=f"cannot be created: {tmp_path / 'a_file'} is a file"):
        load_experiment(below)
    # From the environment: the variable is named.
    clean_env.setenv("MOCE_DATA_DIR", str(tmp_path / "a_file"))
    values = _my_experiment()
    del values["storage_root"]
    from_env = _write(tmp_path / "from_env.yaml", values)
    with pytest.raises(ExperimentError, match=r"exists and is not a directory \(the value came from \$MOCE_DATA_DIR\)"):
        load_experiment(from_env)


def test_moce_reports_a_storage_root_that_is_a_file_without_a_traceback(tmp_path, clean_env, capsys):
    (tmp_path / "a_file").write_text("")
    path = _write(tmp_path / "root.yaml", _my_experiment(storage_root="a_file"))
    assert moce(["run", "--experiment", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "storage_root" in error and "is not a directory" in error and "Traceback" not in error


def test_a_missing_device_is_named_with_the_devices_there_are(tmp_path, clean_env, capsys):
    path = _write(tmp_path / "gpu.yaml", _my_experiment(evaluation={"device": "cuda:99"}))
    experiment = load_experiment(path)  # read anywhere: a GPU experiment is read on CPU machines too
    with pytest.raises(ExperimentError) as error:
        experiment.check_devices()
    assert str(error.value) == (f"{path}: evaluation.device = 'cuda:99': no such device on this machine; "
                                f"available: {', '.join(available_devices())}")
    assert "cpu" in available_devices()
    load_experiment(_write(tmp_path / "cpu.yaml", _my_experiment())).check_devices()

    # `moce run` refuses before anything runs, `moce eval` likewise.
    assert moce(["run", "--experiment", str(path)]) == 2
    assert "evaluation.device = 'cuda:99': no such device" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
    assert moce(["eval", "--experiment", str(path)]) == 2
    assert "evaluation.device = 'cuda:99'" in capsys.readouterr().err


def test_the_k_range_is_checked_against_the_rows_naming_the_key():
    # Three rows, k_min 2: a sweep of k=2 only, with a cluster of one row; said, naming the key.
    ks, warnings = elbow_ks(2, 4, 3, Path("exp.yaml"))
    assert ks == [2]
    assert warnings == [
        "exp.yaml: clustering.k_max = 4: only 3 embedded instructions, so the elbow sweep stops at k=2",
        "exp.yaml: clustering.k_min = 2: 3 embedded instructions leave fewer than 2 per cluster at k=2..2; some "
        "expert group would train on a single instruction",
    ]
    with pytest.raises(ValueError, match=r"^exp\.yaml: clustering\.k_min = 3: the elbow sweep needs at least "
                                         r"k_min \+ 1 = 4 embedded instructions, there are 3"):
        elbow_ks(3, 5, 3, Path("exp.yaml"))
    # Enough rows: the whole range, quietly; a range whose top is thin names k_max.
    assert elbow_ks(2, 10, 1_000) == (list(range(2, 11)), [])
    ks, warnings = elbow_ks(2, 6, 10)
    assert ks == [2, 3, 4, 5, 6] and len(warnings) == 1
    assert warnings[0].startswith("clustering.k_max = 6: 10 embedded instructions leave fewer than 2 per cluster "
                                  "at k=6..6")


def _three_embeddings(directory: Path) -> EmbeddingsRef:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.eye(3, 8, dtype=np.float32).ravel()), 8)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "embedding": vectors}), directory / "shard-00000.parquet")
    return EmbeddingsRef(path=str(directory), rows=3, dimension=8, embedder={"model": "eye"})


def test_clustering_three_rows_says_which_key_the_rows_cannot_bear(tmp_path, clean_env):
    import dagster as dg
    import polars as pl

    from assets.clustering import build_assignment_assets, build_clustering_assets

    path = _write(tmp_path / "exp.yaml", _my_experiment())
    elbow_curve = build_clustering_assets(load_experiment(path))[0]
    embeddings = _three_embeddings(tmp_path / "embeddings")
    out = elbow_curve(dg.build_asset_context(), config={"k_min": 2, "k_max": 4}, instruction_embeddings=embeddings)
    assert out.value["k"].to_list() == [2]
    warnings = out.metadata["warnings"].data
    assert [w.split(": ")[1].split(" = ")[0] for w in warnings] == ["clustering.k_max", "clustering.k_min"]
    assert all(w.startswith(f"{path}: ") for w in warnings)
    with pytest.raises(ValueError, match=r"clustering\.k_min = 3: the elbow sweep needs at least k_min \+ 1 = 4"):
        elbow_curve(dg.build_asset_context(), config={"k_min": 3, "k_max": 4}, instruction_embeddings=embeddings)

    # The cluster of one row that k=2 leaves is flagged by the assignments' check.
    check = build_assignment_assets()[1]
    result = check(cluster_assignments=pl.DataFrame({"id": ["a", "b", "c"], "cluster": [0, 0, 1]}),
                   instructions=pl.LazyFrame({"id": ["a", "b", "c"]}), kmeans_centroids=CentroidsRef(path="", k=2, dimension=8, embedder={}))
    assert not result.passed and result.description == "tiny or empty clusters (size < 2): {1: 1}"
