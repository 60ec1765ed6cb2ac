"""The paper profile's benchmarks through lm-eval's `simple_evaluate`, and the conversion of lm-eval's
results dict into benchmark outcomes (rows of the results table).

Tasks are asked in the experiment's prompt format (lm-eval's chat hook, few-shot examples as earlier turns),
except completion tasks (HumanEval: the prompt is the start of the function), which lm-eval runs as the plain
0-shot completion that published numbers use. Every request is routed by its own document (`MoCELM`).

Code generation tasks (kind `lm_eval_code`: HumanEval, MBPP) are scored in our sandbox, never by lm-eval's
`code_eval` (which runs completions with `exec` in worker processes of the evaluating machine): lm-eval
produces the generations with `predict_only`, and each document's program runs here.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from moce_model.evaluation.benchmarks import (
    CODE_MEMORY_MB,
    CODE_TIMEOUT_S,
    BenchmarkOutcome,
    ItemRecord,
    MetricValue,
    humaneval_program,
    item_metric,
)
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.sandbox import run_sandboxed_many
from moce_model.evaluation.suites import BenchmarkSpec

LM_EVAL_KINDS = ("lm_eval", "lm_eval_code")



def run_lm_eval(lm: MoCELM, specs: Sequence[BenchmarkSpec], limit: int | None,
                bootstrap_iters: int = 1000, include_path: str | None = None) -> list[BenchmarkOutcome]:
    """Run lm-eval tasks (kinds `lm_eval` and `lm_eval_code`), one `simple_evaluate` call per setting
    (few-shot count, sandboxed or not, completion or prompt format, task folder, and the number of documents:
    `limit`, or a spec's own `n_items` where that is smaller).

    The tasks are loaded here and handed to `lm` as well, so that it routes every request by its document.
    `include_path`: a folder of extra lm-eval task YAMLs (e.g. tasks over local JSONL files).
    """
    import lm_eval

    outcomes: list[BenchmarkOutcome] = []
    settings: dict[tuple[int, bool, bool, str | None, int | None], list[BenchmarkSpec]] = {}
    for spec in specs:
        if spec.kind not in LM_EVAL_KINDS or not spec.lm_eval_task:
            raise ValueError(f"benchmark {spec.name!r}: not an lm-eval task (kind {spec.kind!r})")
        if spec.n_items is not None and spec.n_items < 1:
            raise ValueError(f"benchmark {spec.name!r}: n_items must be at least 1, got {spec.n_items}")
        # lm-eval's limit applies to every task of a call: a benchmark's own n_items needs a call of its own.
        counts = [n for n in (spec.n_items, limit) if n is not None]
        spec_limit = min(counts) if counts else None
        key = (spec.num_fewshot, spec.kind == "lm_eval_code", spec.completion, spec.lm_eval_tasks_dir, spec_limit)
        settings.setdefault(key, []).append(spec)
    task_managers: dict[str | None, Any] = {}
    for (num_fewshot, sandboxed, completion, tasks_dir, call_limit), group in settings.items():
        started = time.perf_counter()
        if tasks_dir not in task_managers:
            task_managers[tasks_dir] = _task_manager(tasks_dir, include_path)
        task_manager = task_managers[tasks_dir]
        names = [spec.lm_eval_task for spec in group]
        missing = sorted(set(names) - set(task_manager.all_tasks))
        if missing:
            where = f"the task folder {tasks_dir}" if tasks_dir else "lm-eval's registry"
            raise ValueError(f"lm-eval task(s) {missing} not defined in {where}")
        with _code_task_modules_loadable(sandboxed):
            loaded = task_manager.load(names)
        lm.use_tasks(loaded["tasks"])
        lm.use_task_manager(task_manager)  # tasks looked up later (subtasks) come from the same index
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[loaded["groups"].get(name) or loaded["tasks"][name] for name in names],
            num_fewshot=num_fewshot, limit=call_limit,
            apply_chat_template=not completion, fewshot_as_multiturn=not completion,
            bootstrap_iters=bootstrap_iters, log_samples=True, predict_only=sandboxed,
            # lm-eval refuses code tasks without this flag even with predict_only, which never runs their code
            # (the programs run in our sandbox below).
            confirm_run_unsafe_code=sandboxed, task_manager=task_manager,
        )
        seconds = (time.perf_counter() - started) / len(group)
        # Expert use is counted per leaf task (see MoCELM._by_group); a group such as mmlu sums its subtasks.
        expert_use_by_task = lm.take_expert_use()
        # Per prompt they are keyed by the rendered few-shot context, which the logged samples do not map back to
        # items here: lm-eval tasks get no prompt-level intervals (see runner.EXPERT_USE_SCHEMA).
        lm.take_prompt_expert_use()
        for spec in group:
            if sandboxed:
                outcome = score_code_samples(lm, spec, results["samples"][spec.lm_eval_task])
            else:
                outcome = outcome_from_lm_eval(results, spec, lm)
            outcome.seconds = seconds
            counted = [expert_use_by_task[leaf] for leaf in _leaf_tasks(results, spec.lm_eval_task)
                       if leaf in expert_use_by_task]
            outcome.expert_use = sum(counted[1:], counted[0]) if counted else None
            outcomes.append(outcome)
    return outcomes


def _task_manager(tasks_dir: str | None, include_path: str | None):
    """lm-eval's task index: a benchmark's own task folder alone when it names one, so that its local tasks
    stand in for the Hub tasks of the same name (and the thousands of registry YAMLs are not indexed); else
    lm-eval's registry, plus `include_path`."""
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None:
        if not os.path.isdir(tasks_dir):
            raise ValueError(f"lm-eval task folder not found: {tasks_dir}")
        return TaskManager(include_path=tasks_dir, include_defaults=False)
    return TaskManager(include_path=include_path) if include_path else TaskManager()


@contextlib.contextmanager
def _code_task_modules_loadable(enabled: bool) -> Iterator[None]:
    """lm-eval's humaneval and mbpp task modules load Hugging Face `evaluate`'s code_eval metric on import and run
    its self-check, which `evaluate` refuses unless HF_ALLOW_CODE_EVAL=1. Only that fixed self-check runs: the
    tasks are evaluated with `predict_only`, and the model's programs run in our sandbox."""
    if not enabled:
        yield
        return
    saved = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_ALLOW_CODE_EVAL"]
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = saved


def outcome_from_lm_eval(results: Mapping[str, Any], spec: BenchmarkSpec, lm: MoCELM | None = None) -> BenchmarkOutcome:
    """One benchmark's metrics from lm-eval's results dict (a task or a group such as mmlu).

    Metric keys look like 'acc,none' / 'exact_match,strict-match'; the filter name is kept when it is
    not 'none'. n_items is the number of evaluated documents (summed over a group's subtasks). With logged
    samples (`log_samples=True`) each metric also carries its per-document scores, which lm-eval logs under the
    metric's name in every sample of that filter; lm-eval's own stderr is kept as the metric's stderr.
    """
    task = spec.lm_eval_task or spec.name
    table = dict(results.get("groups", {})).get(task) or results.get("results", {}).get(task)
    if table is None:
        raise KeyError(f"lm-eval results hold no task or group {task!r}; have {sorted(results.get('results', {}))}")
    metrics = []
    for key, value in table.items():
        # metric keys are "<metric>,<filter>"; other keys (alias, name, sample_len) describe the task
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filter_name = key.partition(",")
        stderr = table.get(f"{name}_stderr,{filter_name}")
        metric = name if filter_name in ("", "none") else f"{name} ({filter_name})"
        stderr = float(stderr) if isinstance(stderr, (int, float)) else None
        item_ids, item_scores = _sample_scores(results, task, name, filter_name)
        # Per-document scores describe the metric only when it aggregates by the mean (acc, exact_match); a
        # corpus-level metric (bleu, perplexity) keeps its aggregate and lm-eval's stderr alone.
        if item_scores and math.isclose(sum(item_scores) / len(item_scores), float(value), rel_tol=1e-6, abs_tol=1e-9):
            metrics.append(MetricValue(metric, float(value), stderr, len(item_scores), item_ids, item_scores))
        else:
            metrics.append(MetricValue(metric, float(value), stderr))
    if not metrics:
        raise ValueError(f"lm-eval results for {task!r} hold no numeric metric: {sorted(table)}")
    n_items = _n_items(results, task)
    logged: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for name in _leaf_tasks(results, task):
        for sample in results.get("samples", {}).get(name, []):
            logged.setdefault(f"{name}/{sample['doc_id']}", (name, sample))  # a task logs each document once per filter
    contexts = [_sample_context(sample) or "" for _, sample in logged.values()]
    # Each item's cluster as its requests were routed: by its own document.
    clusters = (lm.clusters_for_documents([(name, sample["doc"]) for name, sample in logged.values()])
                if lm is not None else [None] * len(contexts))
    items = [
        ItemRecord(item_id, context, "", None, cluster)
        for item_id, context, cluster in zip(logged, contexts, clusters)
    ]
    return BenchmarkOutcome(spec.name, metrics, n_items, items,
                            note=f"lm-eval {task}, {spec.num_fewshot}-shot")


def score_code_samples(
    lm: MoCELM | None, spec: BenchmarkSpec, samples: Sequence[Mapping[str, Any]]
) -> BenchmarkOutcome:
    """pass@1 of lm-eval's code generations, each document's program (`code_program`) run in the sandbox."""
    programs, contexts, completions = [], [], []
    for sample in samples:
        completion = _first_text(sample.get("resps")) or ""
        programs.append(code_program(sample["doc"], completion, f"{spec.lm_eval_task}/{sample['doc_id']}"))
        contexts.append(_sample_context(sample) or "")
        completions.append(completion)
    correct = [r.passed for r in run_sandboxed_many(programs, CODE_TIMEOUT_S, CODE_MEMORY_MB)]
    clusters = (lm.clusters_for_documents([(spec.lm_eval_task, s["doc"]) for s in samples]) if lm is not None
                else [None] * len(samples))
    ids = [f"{spec.lm_eval_task}/{s['doc_id']}" for s in samples]
    items = [ItemRecord(i, p, c, k, cl) for i, p, c, k, cl in zip(ids, contexts, completions, correct, clusters)]
    return BenchmarkOutcome(spec.name, [item_metric("pass@1", ids, [float(c) for c in correct])], len(samples), items,
                            note=f"lm-eval {spec.lm_eval_task} generations, {spec.num_fewshot}-shot, sandboxed")


def code_program(doc: Mapping[str, Any], completion: str, where: str) -> str:
    """The program that checks one generation: HumanEval (the prompt, the generated body or function, the
    tests and `check(entry_point)`) or MBPP (setup code, the generated code, the asserts)."""
    if {"prompt", "test", "entry_point"} <= set(doc):
        return humaneval_program(doc, completion)
    if "test_list" in doc:
        tests = "\n".join(doc["test_list"])
        return f"{doc.get('test_setup_code') or ''}\n{completion}\n\n{tests}\n"
    raise ValueError(
        f"{where}: a code task's document needs HumanEval's prompt/test/entry_point or MBPP's test_list; "
        f"it has {sorted(doc)}"
    )


def _sample_scores(results: Mapping[str, Any], task: str, metric: str, filter_name: str
                   ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(item ids, scores) of `metric` under `filter_name` from the logged samples of `task`'s leaf tasks; empty
    unless every leaf task logged a numeric score for every one of its documents."""
    ids: list[str] = []
    scores: list[float] = []
    for leaf in _leaf_tasks(results, task):
        samples = [s for s in results.get("samples", {}).get(leaf, []) if s.get("filter", "none") == filter_name]
        if not samples:
            return (), ()
        for sample in samples:
            score = sample.get(metric)
            if not isinstance(score, (int, float)):  # bool counts: some tasks score a document True/False
                return (), ()
            ids.append(f"{leaf}/{sample['doc_id']}")
            scores.append(float(score))
    return tuple(ids), tuple(scores)


def _n_items(results: Mapping[str, Any], task: str) -> int:
    counts = results.get("n-samples", {})
    return sum(int(counts[name]["effective"]) for name in _leaf_tasks(results, task) if name in counts)


def _leaf_tasks(results: Mapping[str, Any], task: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(task)
    if not children:
        return [task]
    leaves: list[str] = []
    for child in children:
        leaves.extend(_leaf_tasks(results, child))
    return leaves


def _sample_context(sample: Mapping[str, Any]) -> str | None:
    arguments = sample.get("arguments") or []
    if arguments and isinstance(arguments[0], (list, tuple)) and arguments[0] and isinstance(arguments[0][0], str):
        return arguments[0][0]
    return None


def _first_text(value: Any) -> str | None:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, str) else None
