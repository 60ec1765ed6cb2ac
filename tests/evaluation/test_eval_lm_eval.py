"""The lm-eval path: MoCELM inside `simple_evaluate` on local task files, requests routed by their own
documents, results-dict conversion, and code generations scored in the sandbox."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from moce_model.data.instructions import routing_text
from moce_model.evaluation.benchmarks import humaneval_path, read_jsonl
from moce_model.evaluation.humaneval_choice import (
    humaneval_choice_docs,
    humaneval_choice_spec,
    write_humaneval_choice_task,
)
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.lm_eval_suite import (
    code_program,
    outcome_from_lm_eval,
    run_lm_eval,
    score_code_samples,
)
from moce_model.evaluation.suites import (
    PAPER_LM_EVAL_TASKS,
    BenchmarkSpec,
    paper_benchmarks,
)
from tests.evaluation.test_eval_fixtures import (
    build_model,
    build_tokenizer,
    save_routed_model_dir,
)

# Shape of a real lm-eval 0.4 results dict (trimmed): a group (mmlu) with subtasks, and gsm8k with filters.
RECORDED = {
    "results": {
        "mmlu": {"alias": "mmlu", "acc,none": 0.46, "acc_stderr,none": 0.004},
        "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.4, "acc_stderr,none": 0.04, "sample_len": 135},
        "mmlu_virology": {"alias": " - virology", "acc,none": 0.5, "acc_stderr,none": 0.03, "sample_len": 166},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.14, "exact_match_stderr,strict-match": 0.0096,
                  "exact_match,flexible-extract": 0.15, "exact_match_stderr,flexible-extract": "N/A"},
    },
    "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.46, "acc_stderr,none": 0.004}},
    "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_virology"], "gsm8k": []},
    "n-samples": {"mmlu_anatomy": {"original": 135, "effective": 135},
                  "mmlu_virology": {"original": 166, "effective": 166},
                  "gsm8k": {"original": 1319, "effective": 1319}},
    "samples": {"gsm8k": [{"doc_id": 0, "arguments": [("Question: 1+1?\nAnswer:", {"until": ["\n"]})]}]},
}


def test_group_metrics_and_counts_from_a_recorded_results_dict():
    mmlu = outcome_from_lm_eval(RECORDED, BenchmarkSpec(name="mmlu", kind="lm_eval", lm_eval_task="mmlu", num_fewshot=5))
    assert [(m.metric, m.value, m.stderr) for m in mmlu.metrics] == [("acc", 0.46, 0.004)]
    assert mmlu.n_items == 135 + 166
    gsm8k = outcome_from_lm_eval(RECORDED, BenchmarkSpec(name="gsm8k", kind="lm_eval", lm_eval_task="gsm8k"))
    assert {m.metric: (m.value, m.stderr) for m in gsm8k.metrics} == {
        "exact_match (strict-match)": (0.14, 0.0096), "exact_match (flexible-extract)": (0.15, None)}
    assert gsm8k.n_items == 1319
    assert [i.item_id for i in gsm8k.items] == ["gsm8k/0"] and gsm8k.items[0].cluster is None
    with pytest.raises(KeyError, match="hellaswag"):
        outcome_from_lm_eval(RECORDED, BenchmarkSpec(name="hellaswag", kind="lm_eval", lm_eval_task="hellaswag"))


def test_per_document_scores_come_from_the_logged_samples_of_each_filter_and_subtask():
    def logged(doc_id: int, filter_name: str, score: float) -> dict:
        return {"doc_id": doc_id, "filter": filter_name, "metrics": ["exact_match"], "exact_match": score,
                "arguments": [(f"question {doc_id}", {})]}

    results = {
        **RECORDED,
        "results": {**RECORDED["results"],
                    "gsm8k": {**RECORDED["results"]["gsm8k"], "exact_match,strict-match": 1 / 3,
                              "exact_match,flexible-extract": 2 / 3}},
        "groups": {"mmlu": {"alias": "mmlu", "acc,none": 2 / 3, "acc_stderr,none": 0.3}},
        "n-samples": {**RECORDED["n-samples"], "gsm8k": {"original": 1319, "effective": 3}},
        "samples": {
            "gsm8k": [logged(i, "strict-match", s) for i, s in enumerate([1.0, 0.0, 0.0])]
                     + [logged(i, "flexible-extract", s) for i, s in enumerate([1.0, 1.0, 0.0])],
            "mmlu_anatomy": [{"doc_id": 0, "filter": "none", "acc": 1.0, "arguments": [("a0", {})]}],
            "mmlu_virology": [{"doc_id": 0, "filter": "none", "acc": 0.0, "arguments": [("v0", {})]},
                              {"doc_id": 1, "filter": "none", "acc": 1.0, "arguments": [("v1", {})]}],
        },
    }
    gsm8k = outcome_from_lm_eval(results, BenchmarkSpec(name="gsm8k", kind="lm_eval", lm_eval_task="gsm8k"))
    strict, flexible = gsm8k.metrics
    assert strict.item_ids == ("gsm8k/0", "gsm8k/1", "gsm8k/2") and strict.item_scores == (1.0, 0.0, 0.0)
    assert flexible.item_scores == (1.0, 1.0, 0.0) and flexible.n_items == 3
    assert strict.stderr == 0.0096  # lm-eval's own stderr is kept
    assert [i.item_id for i in gsm8k.items] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]  # one record per document
    mmlu = outcome_from_lm_eval(results, BenchmarkSpec(name="mmlu", kind="lm_eval", lm_eval_task="mmlu"))
    assert mmlu.metrics[0].item_ids == ("mmlu_anatomy/0", "mmlu_virology/0", "mmlu_virology/1")
    # A metric that is not the mean of its per-document values (corpus-level) keeps its aggregate only.
    corpus_level = {**results, "results": {**results["results"], "gsm8k": {
        **results["results"]["gsm8k"], "exact_match,strict-match": 0.14}}}
    assert outcome_from_lm_eval(corpus_level, BenchmarkSpec(name="gsm8k", kind="lm_eval", lm_eval_task="gsm8k")
                                ).metrics[0].item_scores == ()
    # Without logged per-document scores a metric keeps its aggregate and stderr only.
    assert outcome_from_lm_eval(RECORDED, BenchmarkSpec(name="gsm8k", kind="lm_eval", lm_eval_task="gsm8k")
                                ).metrics[0].item_scores == ()


def test_paper_benchmarks_name_the_papers_settings():
    specs = {s.name: s for s in paper_benchmarks()}
    assert {n: (s.lm_eval_task, s.num_fewshot) for n, s in specs.items() if s.lm_eval_task} == PAPER_LM_EVAL_TASKS
    assert specs["mmlu"].num_fewshot == 5 and specs["gsm8k"].num_fewshot == 5 and specs["math"].num_fewshot == 4
    assert specs["hellaswag"].num_fewshot == 10
    # HumanEval and MBPP as lm-eval defines them, their generations run in the sandbox; HumanEval is the
    # plain 0-shot completion (no prompt format), as published numbers are measured
    assert specs["humaneval"].kind == specs["mbpp"].kind == "lm_eval_code"
    assert (specs["humaneval"].lm_eval_task, specs["humaneval"].num_fewshot) == ("humaneval", 0)
    assert specs["humaneval"].completion and not specs["mbpp"].completion and not specs["mmlu"].completion
    from lm_eval.tasks import TaskManager

    available = set(TaskManager().all_tasks)
    assert {task for task, _ in PAPER_LM_EVAL_TASKS.values()} <= available


def test_mbpp_generations_are_scored_in_the_sandbox(tmp_path: Path):
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    doc = {"test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": ""}
    samples = [
        {"doc_id": 0, "doc": doc, "arguments": [("ctx0", {})], "resps": [["def add(a, b):\n    return a + b"]]},
        {"doc_id": 1, "doc": doc, "arguments": [("ctx1", {})], "resps": [["def add(a, b):\n    return a - b"]]},
        {"doc_id": 2, "doc": doc, "arguments": [("ctx2", {})],
         "resps": [[f"import os\nos.remove({str(outside)!r})\ndef add(a, b):\n    return a + b"]]},
    ]
    outcome = score_code_samples(None, BenchmarkSpec(name="mbpp", kind="lm_eval_code", lm_eval_task="mbpp"), samples)
    assert [i.correct for i in outcome.items] == [True, False, False]
    assert outcome.metrics[0].metric == "pass@1" and outcome.metrics[0].value == pytest.approx(1 / 3)
    assert outcome.n_items == 3 and outside.exists()


def test_humaneval_completions_are_the_body_after_the_prompt():
    doc = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
           "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    samples = [{"doc_id": i, "doc": doc, "arguments": [(doc["prompt"], {})], "resps": [[body]]}
               for i, body in enumerate(["    return a + b\n", "    return a * b\n"])]
    outcome = score_code_samples(None, BenchmarkSpec(name="humaneval", kind="lm_eval_code", lm_eval_task="humaneval",
                                                     completion=True), samples)
    assert [i.correct for i in outcome.items] == [True, False]
    assert code_program(doc, "    return a + b\n", "x").startswith(doc["prompt"] + "    return a + b")
    with pytest.raises(ValueError, match="humaneval/7.*has \\['text'\\]"):
        code_program({"text": "?"}, "", "humaneval/7")


def test_simple_evaluate_runs_moce_lm_on_local_task_files(tmp_path: Path):
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "What is 1 + 1?", "answer": "2", "choices": ["2", "3"], "label": 0},
        {"question": "What is 2 + 3?", "answer": "5", "choices": ["4", "5"], "label": 1},
        {"question": "What is 3 + 3?", "answer": "6", "choices": ["6", "7"], "label": 0},
    ]))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n")
    (tmp_path / "local_gen.yaml").write_text(
        "task: local_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tmp_path / "local_mc.yaml").write_text(
        "task: local_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tokenizer = build_tokenizer()
    lm = MoCELM.from_objects(build_model(tokenizer), tokenizer, batch_size=4)
    specs = [BenchmarkSpec(name="local_gen", kind="lm_eval", lm_eval_task="local_gen"),
             BenchmarkSpec(name="local_mc", kind="lm_eval", lm_eval_task="local_mc")]
    outcomes = {o.benchmark: o for o in run_lm_eval(lm, specs, limit=None, bootstrap_iters=10, include_path=str(tmp_path))}
    assert outcomes["local_gen"].n_items == 3 and outcomes["local_mc"].n_items == 3
    assert [m.metric for m in outcomes["local_mc"].metrics] == ["acc"]
    accuracy = outcomes["local_mc"].metrics[0]
    assert accuracy.value in (0.0, 1 / 3, 2 / 3, 1.0)
    assert accuracy.item_ids == ("local_mc/0", "local_mc/1", "local_mc/2")
    assert sum(accuracy.item_scores) / 3 == pytest.approx(accuracy.value)
    # lm-eval rendered the prompts in MoCELM's prompt format, and the items are recorded per document
    prompts = [i.prompt for i in outcomes["local_gen"].items]
    assert len(prompts) == 3 and all(p.startswith("<|im_start|>") for p in prompts)


# ------------------------------------------------------------------------------ routing by the document

PYTHON_ITEM = "Write a Python function that reverses a string."
APPLES_ITEM = "Sam has 3 apples and buys 4 more. How many apples does he have?"
# Long arithmetic exemplars, as in GSM8K's 5-shot prompt: routed by the whole context, every item would
# follow them (and the encoder's 256-token cut would drop the item itself).
EXEMPLARS = [
    {"question": f"A farmer picks {n} baskets of apples with {n + 3} apples in each basket and sells {n} apples "
                 f"at the market. How many apples does the farmer have left after the market closes?",
     "answer": f"EXEMPLAR_ANSWER_{n}: {n} * {n + 3} - {n} = {n * (n + 2)} apples", "choices": ["1", "2"], "label": 0}
    for n in range(3, 8)
]


def test_lm_eval_requests_are_routed_by_their_own_document(tmp_path: Path):
    """Two items after the same five exemplars route to different groups, and nothing the router embeds holds
    an exemplar, an exemplar's answer, or the prompt format's markup."""
    for split, rows in {"train": EXEMPLARS, "test": [
        {"question": PYTHON_ITEM, "answer": "def r(s): return s[::-1]", "choices": ["yes", "no"], "label": 0},
        {"question": APPLES_ITEM, "answer": "7", "choices": ["7", "8"], "label": 0},
    ]}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {tmp_path / 'train.jsonl'}\n"
              f"    test: {tmp_path / 'test.jsonl'}\nfewshot_split: train\ntest_split: test\n"
              "fewshot_config:\n  sampler: first_n\n"
              "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n")
    (tmp_path / "fewshot_gen.yaml").write_text(
        "task: fewshot_gen\n" + common + "output_type: generate_until\ndoc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tmp_path / "fewshot_mc.yaml").write_text(
        "task: fewshot_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")

    lm = MoCELM(pretrained=str(save_routed_model_dir(tmp_path / "merged")), batch_size=4)
    embedded: list[str] = []
    real_router = lm.router

    class Recording:
        def assign(self, texts):
            embedded.extend(texts)
            return real_router.assign(texts)

    lm.router = Recording()
    calls: list[tuple[str, list[int]]] = []
    forward = lm.model.forward

    @functools.wraps(forward)  # generate() checks the keyword arguments against forward's signature
    def recording_forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids.shape[1] > 1:  # not a decoding step
            for row, cluster in zip(input_ids, kwargs["cluster_ids"].tolist()):
                calls.append((lm.tokenizer.decode(row), cluster))
        return forward(*args, **kwargs)

    lm.model.forward = recording_forward
    specs = [BenchmarkSpec(name=name, kind="lm_eval", lm_eval_task=name, num_fewshot=5)
             for name in ("fewshot_gen", "fewshot_mc")]
    outcomes = run_lm_eval(lm, specs, limit=None, bootstrap_iters=10, include_path=str(tmp_path))

    # both items were asked after all five exemplars, in the prompt format
    assert {o.benchmark: o.n_items for o in outcomes} == {"fewshot_gen": 2, "fewshot_mc": 2}
    prompts = [item.prompt for o in outcomes for item in o.items]
    assert all(all(e["question"] in p for e in EXEMPLARS) and "<|im_start|>assistant" in p for p in prompts)
    assert all(e["answer"] in item.prompt for item in outcomes[0].items for e in EXEMPLARS)
    # the router saw each document's zero-shot prompt, nothing else
    assert set(embedded) == {f"Question: {PYTHON_ITEM}\nAnswer:", f"Question: {APPLES_ITEM}\nAnswer:"}
    assert not any("EXEMPLAR" in text or "farmer" in text or "<|im_start|>" in text for text in embedded)
    # and the two items went to different groups, in every model call
    by_item = {PYTHON_ITEM: set(), APPLES_ITEM: set()}
    for text, cluster in calls:
        for item in by_item:
            if item in text:
                by_item[item].add(cluster)
    assert by_item == {PYTHON_ITEM: {0}, APPLES_ITEM: {1}}
    assert {o.benchmark: [i.cluster for i in o.items] for o in outcomes} == {
        "fewshot_gen": [0, 1], "fewshot_mc": [0, 1]}
    # routed by its whole context, the python item would have followed the exemplars
    python_context = next(p for p in prompts if PYTHON_ITEM in p)
    assert int(real_router.assign([python_context])[0]) == 1


def test_a_task_folder_stands_in_for_lm_eval_s_own_tasks(tmp_path: Path):
    """Paper benchmarks pointed at a task folder take their tasks from it alone; a task it lacks is named."""
    specs = paper_benchmarks(lm_eval_tasks_dir=tmp_path)
    assert {s.lm_eval_tasks_dir for s in specs} == {str(tmp_path)}
    assert [(s.name, s.lm_eval_task, s.num_fewshot, s.kind) for s in specs] == [
        (s.name, s.lm_eval_task, s.num_fewshot, s.kind) for s in paper_benchmarks()]
    (tmp_path / "gsm8k.yaml").write_text(
        f"task: gsm8k\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'x.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n")
    gsm8k = next(s for s in specs if s.name == "gsm8k")
    mmlu = next(s for s in specs if s.name == "mmlu")
    with pytest.raises(ValueError, match=r"lm-eval task\(s\) \['mmlu'\] not defined in the task folder"):
        run_lm_eval(None, [gsm8k, mmlu], limit=None)
    with pytest.raises(ValueError, match="lm-eval task folder not found"):
        run_lm_eval(None, [BenchmarkSpec(name="g", kind="lm_eval", lm_eval_task="gsm8k",
                                         lm_eval_tasks_dir=str(tmp_path / "absent"))], limit=None)


def test_a_task_of_lm_evals_include_path_routes_through_the_cli_path(tmp_path: Path):
    """lm-eval's CLI loads a user task from --include_path and hands the model neither the task nor the path: the
    model finds the task's documents' routing through its include_path argument, and without it says so."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path / "user_tasks"
    tasks_dir.mkdir()
    data = tasks_dir / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": PYTHON_ITEM, "choices": ["yes", "no"], "label": 0},
        {"question": APPLES_ITEM, "choices": ["7", "8"], "label": 0},
    ]))
    (tasks_dir / "user_mc.yaml").write_text(
        f"task: user_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    model_dir = save_routed_model_dir(tmp_path / "merged")

    # what the CLI builds from --include_path (without lm-eval's own tasks, which this test does not need)
    cli_tasks = TaskManager(include_path=str(tasks_dir), include_defaults=False)

    def cli_run(model_args: dict) -> dict:
        return simple_evaluate(model="moce", model_args={"pretrained": str(model_dir), "batch_size": 4, **model_args},
                               tasks=["user_mc"], task_manager=cli_tasks,
                               bootstrap_iters=0, device="cpu")

    with pytest.raises(KeyError, match="'user_mc'.*include_path=DIR"):
        cli_run({})
    results = cli_run({"include_path": str(tasks_dir)})
    assert results["results"]["user_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert results["n-samples"]["user_mc"]["effective"] == 2


# ------------------------------------------------------------------- moce-lm-eval: lm-eval's command line

def test_moce_lm_eval_hands_the_run_s_task_folders_to_the_moce_model(tmp_path: Path):
    from moce_model.evaluation.lm_eval_cli import parse_args

    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    # lm-eval's legacy form (no `run`): --include_path becomes the model's include_path
    _, args = parse_args(["--model", "moce", "--model_args", "pretrained=/m", "--include_path", str(tasks_dir),
                          "--tasks", "my_task"])
    assert args.command == "run" and args.model_args == {"pretrained": "/m", "include_path": str(tasks_dir)}
    # a task given as a YAML file adds its folder
    (tmp_path / "other").mkdir()
    _, args = parse_args(["run", "--model", "moce", "--model_args", "pretrained=/m", "--include_path", str(tasks_dir),
                          "--tasks", f"my_task,{tmp_path / 'other' / 'x.yaml'}"])
    assert args.model_args["include_path"] == [str(tasks_dir), str(tmp_path / "other")]
    # an include_path the user gave the model stays; other models and runs without task folders are left alone
    _, args = parse_args(["run", "--model", "moce", "--model_args", "pretrained=/m", "include_path=/mine",
                          "--include_path", str(tasks_dir), "--tasks", "my_task"])
    assert args.model_args["include_path"] == "/mine"
    _, args = parse_args(["run", "--model", "hf", "--model_args", "pretrained=/m", "--include_path", str(tasks_dir),
                          "--tasks", "my_task"])
    assert "include_path" not in args.model_args
    _, args = parse_args(["run", "--model", "moce", "--model_args", "pretrained=/m", "--tasks", "gsm8k"])
    assert args.model_args == {"pretrained": "/m"}
    # settings from a --config file count as the command line's
    config = tmp_path / "run.yaml"
    config.write_text(f"model: moce\nmodel_args: pretrained=/m,dtype=float32\ninclude_path: {tasks_dir}\n"
                      "tasks: [my_task]\n")
    _, args = parse_args(["run", "--config", str(config)])
    assert args.model_args == {"pretrained": "/m", "dtype": "float32", "include_path": str(tasks_dir)}


def _user_tasks(tasks_dir: Path) -> None:
    tasks_dir.mkdir(exist_ok=True)
    data = tasks_dir / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": PYTHON_ITEM, "choices": ["yes", "no"], "label": 0},
        {"question": APPLES_ITEM, "choices": ["7", "8"], "label": 0},
    ]))
    (tasks_dir / "user_mc.yaml").write_text(
        f"task: user_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def _recording_routed_texts(monkeypatch) -> list[str]:
    routed: list[str] = []
    real = MoCELM._route_texts

    def recording(self, texts):
        routed.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(MoCELM, "_route_texts", recording)
    return routed


def _results(output_path: Path) -> dict:
    (path,) = output_path.rglob("results_*.json")
    return json.loads(path.read_text())


def test_moce_lm_eval_runs_a_user_task_routed_by_cluster(tmp_path: Path, monkeypatch):
    """`moce-lm-eval --model moce --include_path DIR --tasks T`: lm-eval's own command line knows the model, and
    the model routes each request by its document, found through the run's include path alone."""
    from moce_model.evaluation.lm_eval_cli import main

    _user_tasks(tmp_path / "my_tasks")
    model_dir = save_routed_model_dir(tmp_path / "merged")
    routed = _recording_routed_texts(monkeypatch)
    main(["run", "--model", "moce", "--model_args", f"pretrained={model_dir}", "--include_path",
          str(tmp_path / "my_tasks"), "--tasks", "user_mc", "--batch_size", "2", "--output_path", str(tmp_path / "out")])
    results = _results(tmp_path / "out")
    assert results["n-samples"]["user_mc"]["effective"] == 2
    assert results["results"]["user_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert set(routed) == {f"Question: {PYTHON_ITEM}\nAnswer:", f"Question: {APPLES_ITEM}\nAnswer:"}


def _digit_head_model():
    """(model, tokenizer): the tiny Llama with an untied head that can only say '1' or '2' (two opposite rows, every other row 0):
    every answer is a number, and which digits it holds depends on the prompt and on the expert group."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = build_model(tokenizer).config
    config.tie_word_embeddings = False  # before the model is built: the tying is fixed when it is
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    torch.manual_seed(5)
    direction = torch.randn(model.config.hidden_size)
    head = torch.zeros(len(tokenizer), model.config.hidden_size)
    head[tokenizer.convert_tokens_to_ids("1")] = direction
    head[tokenizer.convert_tokens_to_ids("2")] = -direction
    model.lm_head.weight = torch.nn.Parameter(head)
    return model, tokenizer


def test_moce_lm_eval_gsm8k_scores_what_the_project_s_gsm8k_scores(tmp_path: Path, monkeypatch):
    """lm-eval's gsm8k task (its metric, filters and stop sequences, from its installed YAML), run on a local file
    through `moce-lm-eval` and asked as the project's own GSM8K benchmark asks it, generates the same answers and
    gives the same exact match (its flexible-extract filter: the last number) on the same items and token budget."""
    from lm_eval import tasks as lm_eval_tasks

    from moce_model.evaluation.benchmarks import GSM8K_INSTRUCTION, run_benchmark
    from moce_model.evaluation.lm_eval_cli import main

    max_new_tokens = 5
    base, tokenizer = _digit_head_model()
    model_dir = save_routed_model_dir(tmp_path / "merged", base=base, tokenizer=tokenizer)
    data = tmp_path / "gsm8k.jsonl"
    questions = [APPLES_ITEM, PYTHON_ITEM, "A train travels 60 miles in 2 hours. What is its speed?"]

    def write(answers: list[str]) -> None:
        data.write_text("".join(json.dumps({"question": q, "answer": f"Work it out.\n#### {a}"}) + "\n"
                                for q, a in zip(questions, answers)))

    lm = MoCELM(pretrained=str(model_dir), batch_size=4)
    spec = BenchmarkSpec(name="gsm8k", kind="gsm8k", path=str(data), max_new_tokens=max_new_tokens)
    write(["0", "0", "0"])
    completions = [item.completion for item in run_benchmark(lm, spec, limit=None).items]
    assert all(len(c) == max_new_tokens and set(c) <= {"1", "2"} for c in completions), completions
    # answers that make the first and last items right and the middle one wrong
    write([completions[0], str(int(completions[1]) + 1), completions[2]])
    own = run_benchmark(lm, spec, limit=None)
    assert own.metrics[0].item_scores == (1.0, 0.0, 1.0)
    assert [item.cluster for item in own.items] == [1, 0, 1]

    gsm8k_yaml = Path(lm_eval_tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"
    tasks_dir = tmp_path / "my_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "my_gsm8k.yaml").write_text(
        f"include: {gsm8k_yaml}\ntask: my_gsm8k\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {data}\n    test: {data}\nnum_fewshot: 0\n"
        f"doc_to_text: {json.dumps('{{question}}' + chr(10) + GSM8K_INSTRUCTION)}\n")
    routed = _recording_routed_texts(monkeypatch)
    main(["run", "--model", "moce", "--model_args", f"pretrained={model_dir}", "--include_path", str(tasks_dir),
          "--tasks", "my_gsm8k", "--apply_chat_template", "--gen_kwargs", f"max_gen_toks={max_new_tokens}",
          "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"])
    results = _results(tmp_path / "out")["results"]["my_gsm8k"]
    (samples_path,) = (tmp_path / "out").rglob("samples_my_gsm8k_*.jsonl")
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    flexible = sorted((s for s in samples if s["filter"] == "flexible-extract"), key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in flexible] == completions
    assert [s["exact_match"] for s in flexible] == list(own.metrics[0].item_scores)
    assert results["exact_match,flexible-extract"] == pytest.approx(own.metrics[0].value) == pytest.approx(2 / 3)
    # the strict filter wants lm-eval's own "#### N" ending, which the project's instruction does not ask for
    assert results["exact_match,strict-match"] == 0.0
    assert set(routed) == {routing_text("", f"{q}\n{GSM8K_INSTRUCTION}", "") for q in questions}


# ------------------------------------------------------------------------ the HumanEval multiple-choice probe

def test_humaneval_choice_documents_hold_each_problems_own_body_among_distinct_others():
    problems = read_jsonl(humaneval_path(), ["task_id", "prompt", "canonical_solution"])
    docs = humaneval_choice_docs(problems, choices=4, seed=0)
    assert len(docs) == len(problems) == 164
    for doc, problem in zip(docs, problems):
        assert doc["prompt"] == problem["prompt"] and doc["task_id"] == problem["task_id"]
        assert len(doc["choices"]) == len(set(doc["choices"])) == 4
        assert doc["choices"][doc["label"]] == problem["canonical_solution"]
        assert sum(choice == problem["canonical_solution"] for choice in doc["choices"]) == 1
    # deterministic for a seed, another seed draws other distractors; the answer is not always in one slot
    assert humaneval_choice_docs(problems, choices=4, seed=0) == docs
    assert humaneval_choice_docs(problems, choices=4, seed=1) != docs
    assert len({doc["label"] for doc in docs}) == 4
    with pytest.raises(ValueError, match="at least 2 choices, got 1"):
        humaneval_choice_docs(problems, choices=1)


def _problems_file(path: Path) -> Path:
    problems = [
        {"task_id": "T/0", "prompt": 'def add(a, b):\n    """What is a plus b apples?"""\n',
         "canonical_solution": "    return a + b\n"},
        {"task_id": "T/1", "prompt": 'def reverse(s):\n    """Write a Python function that reverses a string."""\n',
         "canonical_solution": "    return s[::-1]\n"},
        {"task_id": "T/2", "prompt": 'def double(x):\n    """Return twice x."""\n',
         "canonical_solution": "    return 2 * x\n"},
    ]
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def test_humaneval_choice_runs_through_lm_eval_routed_by_each_problem_and_capped_by_its_n_items(tmp_path: Path):
    tasks_dir = write_humaneval_choice_task(tmp_path / "tasks", choices=2, seed=0,
                                            problems_path=_problems_file(tmp_path / "problems.jsonl"))
    lm = MoCELM(pretrained=str(save_routed_model_dir(tmp_path / "merged")), batch_size=4)
    embedded: list[str] = []
    real_router = lm.router

    class Recording:
        def assign(self, texts):
            embedded.extend(texts)
            return real_router.assign(texts)

    lm.router = Recording()
    outcome, = run_lm_eval(lm, [humaneval_choice_spec(tasks_dir, n_items=2)], limit=None, bootstrap_iters=10)
    assert outcome.n_items == 2
    assert {m.metric: m.item_ids for m in outcome.metrics} == {
        "acc": ("humaneval_choice/0", "humaneval_choice/1"), "acc_norm": ("humaneval_choice/0", "humaneval_choice/1")}
    assert all(score in (0.0, 1.0) for m in outcome.metrics for score in m.item_scores)
    # a plain completion of the function (no prompt format), each request routed by its own problem's prompt
    docs = [json.loads(line) for line in (tasks_dir / "humaneval_choice.jsonl").read_text().splitlines()]
    assert [item.prompt for item in outcome.items] == [docs[0]["prompt"], docs[1]["prompt"]]
    routing_texts = [docs[0]["prompt"].rstrip(), docs[1]["prompt"].rstrip()]  # lm-eval strips the rendered text
    assert set(embedded) == set(routing_texts)
    assert [item.cluster for item in outcome.items] == [int(c) for c in real_router.assign(routing_texts)] == [1, 0]
    # a run-wide limit below the spec's own n_items wins
    outcome, = run_lm_eval(lm, [humaneval_choice_spec(tasks_dir, n_items=2)], limit=1, bootstrap_iters=10)
    assert outcome.n_items == 1


def test_each_lm_eval_benchmark_keeps_its_own_n_items_in_one_run(tmp_path: Path):
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i)],
                                        "label": 0}) + "\n" for i in range(4)))
    for name in ("mc_a", "mc_b"):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "doc_to_text: \"Question: {{question}}\\nAnswer:\"\noutput_type: multiple_choice\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tokenizer = build_tokenizer()
    lm = MoCELM.from_objects(build_model(tokenizer), tokenizer, batch_size=4)
    specs = [BenchmarkSpec(name="mc_a", kind="lm_eval", lm_eval_task="mc_a", n_items=2),
             BenchmarkSpec(name="mc_b", kind="lm_eval", lm_eval_task="mc_b")]
    outcomes = run_lm_eval(lm, specs, limit=None, bootstrap_iters=10, include_path=str(tmp_path))
    assert {o.benchmark: o.n_items for o in outcomes} == {"mc_a": 2, "mc_b": 4}
    with pytest.raises(ValueError, match="'mc_a': n_items must be at least 1, got 0"):
        run_lm_eval(lm, [BenchmarkSpec(name="mc_a", kind="lm_eval", lm_eval_task="mc_a", n_items=0)], limit=None)
