"""The `paper-rehearsal` experiment end to end: the paper profile's code paths on toy fixtures, offline.

The fixtures are built in a temporary directory, the whole pipeline is materialized for the rehearsal profile,
and the outcomes are read back: every variant trained and merged (the merge check passed), the paper's
sources read from their mirrors with the Hub datasets' mappings, the paper's lm-eval benchmarks answered on
the local tasks with their document counts, and each few-shot item routed by its own document.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from moce_model.evaluation.suites import PAPER_LM_EVAL_TASKS
from moce_model.experiment import load_experiment
from moce_model.rehearsal.fixtures import (
    FIXTURE_VERSION,
    build_rehearsal_fixtures,
    ensure_rehearsal_fixtures,
    lm_eval_test_documents,
)
from moce_model.rehearsal.lm_eval_tasks import write_lm_eval_tasks
from moce_model.rehearsal.sources import write_source_mirrors
from moce_model.variants import VARIANTS as ALL_VARIANTS
from pipelines.definitions import PIPELINE, build_definitions
from tests.pipeline_fixtures import dagster_instance

REHEARSAL_DIR_ENV = "MOCE_REHEARSAL_DIR"
PAPER_SOURCES = {"slimorca", "metamathqa", "magicoder_oss", "magicoder_evol"}
CLUSTER_ROUTED = ("moce", "cluster_only")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_source_mirrors_and_tasks_are_deterministic(tmp_path: Path):
    for copy in ("a", "b"):
        write_source_mirrors(tmp_path / copy / "datasets", seed=3)
        write_lm_eval_tasks(tmp_path / copy / "tasks", seed=3)
    first, second = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) > 20
    # the task YAMLs name their own copy's files; everything else is byte-identical
    assert {k for k in first if first[k] != second[k]} == {k for k in first if k.endswith(".yaml")
                                                           and "data_files" in (tmp_path / "a" / k).read_text()}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("rehearsal")
    with pytest.MonkeyPatch.context() as patch:
        # datasets caches the prepared local files; keep that out of the user's home cache.
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets_cache")
        started = time.perf_counter()
        fixtures = build_rehearsal_fixtures(root / "fixtures")
        fixture_seconds = time.perf_counter() - started
        patch.setenv(REHEARSAL_DIR_ENV, str(fixtures.root))
        profile = load_experiment("paper-rehearsal").model_copy(update={"storage_root": root / "store"})
        defs = build_definitions(profile)
        with dagster_instance(root) as instance:
            started = time.perf_counter()
            result = defs.resolve_job_def("demo_pipeline").execute_in_process(instance=instance)
            pipeline_seconds = time.perf_counter() - started
            assert result.success
            print(f"\npaper-rehearsal: fixtures {fixture_seconds:.1f} s, pipeline {pipeline_seconds:.1f} s")
            yield profile, fixtures, defs, instance


def _table(profile, *parts: str) -> pl.DataFrame:
    return pl.read_parquet(profile.storage_root.joinpath("tables", *parts[:-1], parts[-1] + ".parquet"))


def test_rehearsal_profile_takes_the_paper_paths(rehearsal):
    experiment, fixtures, _, _ = rehearsal
    paper = load_experiment("paper-reference")
    assert tuple(experiment.variants) == ALL_VARIANTS and experiment.variants == paper.variants
    assert [(s.name, s.kind, s.path, s.mapping, s.conversations) for s in experiment.sources] == [
        (s.name, s.kind, s.path, s.mapping, s.conversations) for s in paper.sources]
    assert all(Path(s.mirror).parent == fixtures.datasets_dir for s in experiment.sources)
    assert experiment.embedder.kind == paper.embedder.kind == "instructor"
    assert experiment.base_model.kind == "hub" and experiment.base_model.prompt_format == "human_assistant"
    assert experiment.training.preset == paper.training.preset == "paper"
    assert experiment.evaluation.benchmarks == "paper"
    assert Path(experiment.evaluation.lm_eval_tasks_dir) == fixtures.lm_eval_tasks_dir
    # The reference recipe's settings, at toy scale.
    assert experiment.embedder.instruction_source == paper.embedder.instruction_source == "system_prompt"
    assert experiment.evaluation.lm_eval_tasks == paper.evaluation.lm_eval_tasks
    for key in ("adapter_dropout", "balance_loss", "ac"):
        assert getattr(experiment.experts, key) == getattr(paper.experts, key), key


def test_every_variant_is_trained_merged_and_checked(rehearsal):
    profile, fixtures, defs, instance = rehearsal
    for key in PIPELINE.resolve(defs.resolve_asset_graph()):
        assert instance.get_latest_materialization_event(key) is not None, key.to_user_string()
    base_tokenizer = json.loads((fixtures.base_model_dir / "tokenizer_config.json").read_text())
    assert base_tokenizer.get("chat_template") is None and not list(fixtures.base_model_dir.glob("chat_template*"))
    for variant in ALL_VARIANTS:
        check_key = dg.AssetCheckKey(dg.AssetKey(["merged_model", variant]), "merged_equals_unmerged")
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key])[check_key]
        assert record.event.dagster_event.event_specific_data.passed, variant
        merged_dir = Path(_ref(profile, "merged_model", variant)["path"])
        config = json.loads((merged_dir / "config.json").read_text())
        assert config["variant"] == variant and any(merged_dir.glob("*.safetensors"))
        # The reference recipe reached the model: adapter dropout 0.1, no balance loss.
        assert (config["adapter_dropout"], config["aux_loss_coef"]) == (0.1, 0.0), variant
        assert (merged_dir / "centroids.npy").is_file() == (variant in CLUSTER_ROUTED)
        adapters = instance.get_latest_materialization_event(dg.AssetKey(["moce_adapters", variant]))
        assert adapters.asset_materialization.metadata["optimizer_steps"].value == 3, variant
        # TrainingConfig.paper() scaled down; QLoRA, bf16 and paged AdamW where CUDA is, float32 elsewhere.
        record = json.loads((Path(_ref(profile, "moce_adapters", variant)["path"]) / "training.json").read_text())
        config = record["training_config"]
        cuda = torch.cuda.is_available()
        assert (config["qlora"], config["bf16"], config["optim"]) == (
            (True, True, "paged_adamw_32bit") if cuda else (False, False, "adamw_torch")), variant
        assert (config["gradient_checkpointing"], config["grad_accum"], config["lr"], config["max_grad_norm"],
                config["lora_dropout"], config["prompt_format"]) == (True, 4, 2e-4, 0.3, 0.1, "human_assistant")
        assert record["n_examples"] == 4 * 40


def test_the_four_paper_sources_are_read_with_their_mappings(rehearsal):
    profile, _, _, _ = rehearsal
    instructions = _table(profile, "instructions")
    rejected = _table(profile, "rejected_instructions")
    assert rejected.height == 0, rejected.select("source", "reason").head(5).rows()
    counts = dict(instructions.group_by("source").len().iter_rows())
    assert counts == {source: 40 for source in PAPER_SOURCES}
    by_source = {source: group for (source,), group in instructions.group_by("source")}
    assert by_source["slimorca"].filter(pl.col("system") != "").height > 0  # the ShareGPT system turn
    assert by_source["metamathqa"]["response"].str.contains("The answer is: ").all()
    assert by_source["magicoder_oss"]["instruction"].str.starts_with("You are tasked with implementing").all()
    assert set(instructions["domain"]) == {"general", "math", "code"}


def test_paper_benchmarks_run_on_the_local_tasks_with_their_sizes(rehearsal):
    profile, fixtures, _, _ = rehearsal
    documents = lm_eval_test_documents(fixtures)
    expected_n = {
        "mmlu": documents["mmlu_high_school_mathematics"] + documents["mmlu_computer_security"],
        "math": documents["minerva_math_algebra"] + documents["minerva_math_prealgebra"],
        **{name: documents[name] for name in ("gsm8k", "hellaswag", "arc_challenge", "mbpp", "humaneval")},
    }
    for model in ("base", *ALL_VARIANTS):
        results = _table(profile, "benchmark_results", model)
        assert set(results["benchmark"]) == set(profile.evaluation.lm_eval_tasks) == set(PAPER_LM_EVAL_TASKS), model
        n_items = dict(results.group_by("benchmark").agg(pl.col("n_items").max()).iter_rows())
        assert n_items == expected_n, model
        assert results["value"].is_between(0, 1).all() and results["ci_low"].is_not_null().all(), model
        scores = _table(profile, "benchmark_item_scores", model)
        per_metric = scores.group_by("benchmark", "metric").len()
        joined = results.join(per_metric, on=["benchmark", "metric"])
        assert joined.height == results.height and (joined["len"] == joined["n_items"]).all(), model
        metrics = set(results.select("benchmark", "metric").iter_rows())
        assert {("mbpp", "pass@1"), ("humaneval", "pass@1"), ("gsm8k", "exact_match (strict-match)"),
                ("arc_challenge", "acc"), ("mmlu", "acc")} <= metrics, model
    # Asked in the human_assistant format (base model without chat template), except HumanEval's completion.
    items = pl.read_parquet(profile.storage_root / "artifacts" / "benchmark_items" / "moce.parquet")
    formatted = items.filter(pl.col("benchmark") != "humaneval")["prompt"]
    assert formatted.str.starts_with("<|endoftext|>### ").all() and formatted.str.contains("### Assistant:\n").all()
    humaneval = items.filter(pl.col("benchmark") == "humaneval")["prompt"]
    assert humaneval.str.starts_with("def ").all()
    report = (profile.storage_root / "report" / "benchmark_report.md").read_text()
    assert "## Paper average" in report
    assert all(f"\n| {model} | " in report.split("## Paper average")[1] for model in ("base", *ALL_VARIANTS))


def test_few_shot_items_are_routed_by_their_own_document(rehearsal):
    """The cluster recorded for each few-shot item is the nearest centroid of its own zero-shot prompt (the
    task's description as the system part, the question as the instruction), embedded as the centroids were
    fit (the Instructor prompt and all); routed by the whole few-shot prompt, some items would go elsewhere."""
    from moce_model.clustering.embedding import load_embedder
    from moce_model.data.instructions import routing_text

    profile, fixtures, _, _ = rehearsal
    data = fixtures.lm_eval_tasks_dir / "data"

    def mmlu_text(subject: str, d: dict) -> str:
        topic = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", d["choices"]))
        return routing_text(description, f"{d['question'].strip()}{choices}\nAnswer:", "")

    own_texts = {  # item id -> its own zero-shot routing text
        **{f"gsm8k/{i}": routing_text("", f"Question: {d['question']}\nAnswer:", "")
           for i, d in enumerate(_jsonl(data / "gsm8k" / "test.jsonl"))},
        **{f"arc_challenge/{i}": routing_text("", f"Question: {d['question']}\nAnswer:", "")
           for i, d in enumerate(_jsonl(data / "arc_challenge" / "test.jsonl"))},
        **{f"hellaswag/{i}": routing_text("", f"{d['activity_label']}: {d['ctx']}", "")
           for i, d in enumerate(_jsonl(data / "hellaswag" / "validation.jsonl"))},
        **{f"minerva_math_{s}/{i}": routing_text("", f"Problem:\n{d['problem']}\n\nSolution:", "")
           for s in ("algebra", "prealgebra") for i, d in enumerate(_jsonl(data / f"minerva_math_{s}" / "test.jsonl"))},
        **{f"mmlu_{s}/{i}": mmlu_text(s, d) for s in ("high_school_mathematics", "computer_security")
           for i, d in enumerate(_jsonl(data / f"mmlu_{s}" / "test.jsonl"))},
    }
    for variant in CLUSTER_ROUTED:
        merged = Path(_ref(profile, "merged_model", variant)["path"])
        centroids = np.load(merged / "centroids.npy")
        embedder = load_embedder(json.loads((merged / "embedder.json").read_text()), device="cpu")
        assert embedder.spec.kind == "instructor"

        def nearest(texts: list[str]) -> list[int]:
            vectors = embedder.encode(texts)
            return np.argmin(((vectors[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1).tolist()

        items = pl.read_parquet(profile.storage_root / "artifacts" / "benchmark_items" / f"{variant}.parquet")
        items = items.filter(pl.col("item_id").is_in(list(own_texts))).sort("item_id")
        assert items.height == len(own_texts), variant
        assert items["cluster"].to_list() == nearest([own_texts[i] for i in items["item_id"]]), variant
        scores = _table(profile, "benchmark_item_scores", variant).filter(pl.col("item_id").is_in(list(own_texts)))
        assert dict(scores.select("item_id", "cluster").unique().iter_rows()) == dict(
            items.select("item_id", "cluster").iter_rows()), variant
        # The whole few-shot prompts (exemplars and their answers included) would route some items elsewhere,
        # so the equality above tells the two apart.
        few_shot_prompts = items.filter(~pl.col("benchmark").is_in(["humaneval"]))
        assert few_shot_prompts["prompt"].str.count_matches("### Human:").min() > 1
        assert nearest(few_shot_prompts["prompt"].to_list()) != few_shot_prompts["cluster"].to_list(), variant


def _ref(profile, *key: str) -> dict:
    return json.loads(profile.storage_root.joinpath("refs", *key[:-1], key[-1] + ".json").read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_existing_fixtures_are_reused_and_rebuilt_only_when_stale(rehearsal):
    _, fixtures, _, _ = rehearsal
    weights = fixtures.base_model_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert ensure_rehearsal_fixtures(fixtures.root).root == fixtures.root
    assert weights.stat().st_mtime_ns == built_at
    manifest = json.loads(fixtures.manifest_path.read_text())
    assert manifest["root"] == str(fixtures.root) and manifest["version"] == FIXTURE_VERSION


def test_the_rehearsal_mirrors_every_source_of_the_paper_experiment():
    from moce_model.rehearsal.sources import SOURCE_FILES

    assert set(SOURCE_FILES) == PAPER_SOURCES == {source.name for source in load_experiment("paper").sources}
