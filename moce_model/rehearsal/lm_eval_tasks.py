"""Toy lm-eval tasks under the paper's task names (MMLU, GSM8K, MATH, HellaSwag, ARC, MBPP, HumanEval): task
YAMLs and their JSONL files, run by the rehearsal instead of the Hub's tasks with the same settings."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from moce_model.rehearsal.sources import (
    BASE_SPECIAL_TOKEN,
    FUNCTIONS,
    ITEMS,
    NAMES,
    write_jsonl,
)


def _mmlu_docs(rng: random.Random, subject: str, n: int) -> list[dict[str, Any]]:
    docs = []
    for index in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if subject == "high_school_mathematics":
            question, right = f"What is {a} + {b}?", a + b
            wrong = [right + 1, right - 1, right + 10]
        else:
            question, right = f"A password of {a} bits has how many possible values? Give the exponent of 2.", a
            wrong = [a + 1, 2 * a, a - 1]
        choices = [str(v) for v in [right, *wrong]]
        rng.shuffle(choices)
        docs.append({"question": question, "subject": subject, "choices": choices, "answer": choices.index(str(right))})
    return docs


def _gsm8k_docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    docs = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        docs.append({"question": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                     "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"})
    return docs


def _math_docs(rng: random.Random, subject: str, n: int) -> list[dict[str, Any]]:
    docs = []
    for _ in range(n):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        if subject == "algebra":
            problem, answer = f"Solve for $x$: ${a}x = {a * b}$.", str(b)
        else:
            problem, answer = f"What is ${a} \\cdot {b}$?", str(a * b)
        # lm-eval's minerva_math derives `answer` from the solution's \boxed{} in Python (process_docs); the
        # rehearsal's task is plain YAML, so the file carries it beside the MATH columns.
        docs.append({"problem": problem, "level": "Level 1", "type": subject.capitalize(),
                     "solution": f"The result is $\\boxed{{{answer}}}$.", "answer": answer})
    return docs


def _hellaswag_docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    activities = [("Baking cookies", "A person mixes flour and butter in a bowl.", "then puts the dough in the oven"),
                  ("Washing a car", "A man sprays water on a red car.", "then scrubs the doors with a sponge"),
                  ("Playing guitar", "A girl sits down holding a guitar.", "then strums a few chords"),
                  ("Painting a fence", "A woman dips a brush into white paint.", "then paints the wooden fence")]
    docs = []
    for index in range(n):
        label, ctx, right = activities[index % len(activities)]
        wrong = [other[2] for other in activities if other[2] != right][:3]
        endings = [right, *wrong]
        rng.shuffle(endings)
        ctx_a, ctx_b = ctx, "She" if "woman" in ctx or "girl" in ctx else "He"
        docs.append({"ind": index, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"rehearsal~{index}",
                     "split": "val", "split_type": "indomain", "label": str(endings.index(right))})
    return docs


def _arc_docs(rng: random.Random, n: int, prefix: str) -> list[dict[str, Any]]:
    facts = [("Which of these is a source of light?", "the Sun", ["a rock", "a shadow", "a puddle"]),
             ("Which state of matter has a fixed shape?", "solid", ["liquid", "gas", "steam"]),
             ("What do plants need to make food?", "sunlight", ["darkness", "sand", "plastic"]),
             ("Which force pulls objects toward Earth?", "gravity", ["magnetism", "friction", "wind"])]
    docs = []
    for index in range(n):
        question, right, wrong = facts[index % len(facts)]
        texts = [right, *wrong]
        rng.shuffle(texts)
        labels = ["A", "B", "C", "D"]
        docs.append({"id": f"{prefix}_{index}", "question": f"{question} (case {index})",
                     "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(right)]})
    return docs


def _mbpp_docs(start: int, n: int) -> list[dict[str, Any]]:
    docs = []
    for offset in range(n):
        task_id = start + offset
        a = offset + 2
        docs.append({
            "task_id": task_id,
            "text": f"Write a function to multiply a number by {a}.",
            "code": f"def times_{a}(x):\n    return x * {a}",
            "test_list": [f"assert times_{a}(1) == {a}", f"assert times_{a}(3) == {3 * a}",
                          f"assert times_{a}(0) == 0"],
            "test_setup_code": "",
            "challenge_test_list": [],
        })
    return docs


def _humaneval_docs(n: int) -> list[dict[str, Any]]:
    docs = []
    for index in range(n):
        name, argument, does, body = FUNCTIONS[index % len(FUNCTIONS)]
        checks = {
            "count_vowels": "    assert candidate('banana') == 3\n",
            "is_palindrome": "    assert candidate('level')\n    assert not candidate('abc')\n",
            "running_total": "    assert candidate([1, 2, 3]) == [1, 3, 6]\n",
            "dedupe": "    assert candidate([1, 1, 2]) == [1, 2]\n",
            "word_lengths": "    assert candidate('a bb') == {'a': 1, 'bb': 2}\n",
        }
        docs.append({
            "task_id": f"HumanEval/{index}",
            "prompt": f"def {name}({argument}):\n    \"\"\"{does.capitalize()}.\"\"\"\n",
            "canonical_solution": body + "\n",
            "test": f"def check(candidate):\n{checks[name]}",
            "entry_point": name,
        })
    return docs


def _task(name: str, files: dict[str, Path], **settings: Any) -> dict[str, Any]:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}}, **settings}


_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


_GREEDY = {"do_sample": False, "temperature": 0.0}


def write_lm_eval_tasks(tasks_dir: Path, seed: int = 0) -> dict[str, int]:
    """Task YAMLs (and their JSONL files) under the paper's task names; returns each leaf task's test size.

    Long: one block per paper task, each its data files and its task YAML."""
    import yaml

    rng = random.Random(seed + 7)
    data_dir = tasks_dir / "data"
    configs: list[dict[str, Any]] = []
    test_sizes: dict[str, int] = {}

    def files(task: str, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
        paths = {}
        for split, docs in splits.items():
            paths[split] = data_dir / task / f"{split}.jsonl"
            write_jsonl(paths[split], docs)
        test_sizes[task] = len(splits.get("test") or splits.get("validation") or [])
        return paths

    # MMLU: a group of subjects, 5-shot from each subject's 5 dev questions, letters as choices.
    mmlu_subtasks = []
    for subject in ("high_school_mathematics", "computer_security"):
        name = f"mmlu_{subject}"
        mmlu_subtasks.append(name)
        configs.append(_task(
            name, files(name, {"dev": _mmlu_docs(rng, subject, 5), "test": _mmlu_docs(rng, subject, 3)}),
            fewshot_split="dev", test_split="test", output_type="multiple_choice",
            description=f"The following are multiple choice questions (with answers) about "
                        f"{subject.replace('_', ' ')}.\n\n",
            doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                        "D. {{choices[3]}}\nAnswer:",
            doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer",
            fewshot_config={"sampler": "first_n"}, metric_list=_MC_METRICS))
    configs.append({"group": "mmlu", "task": mmlu_subtasks,
                    "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]})

    # GSM8K: lm-eval's prompt, stop sequences, and strict / flexible answer extraction.
    configs.append(_task(
        "gsm8k", files("gsm8k", {"train": _gsm8k_docs(rng, 6), "test": _gsm8k_docs(rng, 4)}),
        fewshot_split="train", test_split="test", output_type="generate_until",
        doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{answer}}",
        generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>", BASE_SPECIAL_TOKEN], "max_gen_toks": 24,
                           **_GREEDY},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
                      "ignore_punctuation": False, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
        filter_list=[
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                    {"function": "take_first"}]},
        ]))

    # MATH (minerva_math): a group of subjects, answers after "Final Answer: The final answer is".
    math_subtasks = []
    for subject in ("algebra", "prealgebra"):
        name = f"minerva_math_{subject}"
        math_subtasks.append(name)
        configs.append(_task(
            name, files(name, {"train": _math_docs(rng, subject, 4), "test": _math_docs(rng, subject, 2)}),
            fewshot_split="train", test_split="test", output_type="generate_until",
            doc_to_text="Problem:\n{{problem}}\n\nSolution:",
            doc_to_target="Final Answer: The final answer is {{answer}}. I hope it is correct.",
            generation_kwargs={"until": ["Problem:", BASE_SPECIAL_TOKEN], "max_gen_toks": 24, **_GREEDY},
            fewshot_config={"sampler": "first_n"},
            metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            filter_list=[{"name": "final-answer", "filter": [
                {"function": "regex", "regex_pattern": "The final answer is (.*?)\\. I hope"},
                {"function": "take_first"}]}]))
    configs.append({"group": "minerva_math", "task": math_subtasks,
                    "aggregate_metric_list": [{"metric": "exact_match", "filter_list": "final-answer",
                                               "weight_by_size": True}]})

    # HellaSwag: 10-shot from train, the validation split scored, acc and length-normalised acc.
    configs.append(_task(
        "hellaswag", files("hellaswag", {"train": _hellaswag_docs(rng, 10), "validation": _hellaswag_docs(rng, 4)}),
        fewshot_split="train", test_split="validation", output_type="multiple_choice",
        doc_to_text="{{activity_label}}: {{ctx}}", doc_to_choice="{{endings}}", doc_to_target="{{label}}",
        metric_list=[*_MC_METRICS, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]))

    # ARC-Challenge: 25-shot from train.
    configs.append(_task(
        "arc_challenge",
        files("arc_challenge", {"train": _arc_docs(rng, 25, "train"), "test": _arc_docs(rng, 4, "test")}),
        fewshot_split="train", test_split="test", output_type="multiple_choice",
        doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="{{choices.text}}",
        doc_to_target="{{choices.label.index(answerKey)}}", fewshot_config={"sampler": "first_n"},
        metric_list=[*_MC_METRICS, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]))

    # MBPP: up to 4-shot (the reference's) from the prompt split, lm-eval's prompt, [DONE] stop; run in our sandbox.
    configs.append(_task(
        "mbpp", files("mbpp", {"prompt": _mbpp_docs(2, 4), "test": _mbpp_docs(11, 4)}),
        fewshot_split="prompt", test_split="test", output_type="generate_until",
        doc_to_text="You are an expert Python programmer, and here is your task: {{text}} Your code should pass "
                    "these tests:\n\n{{test_list[0]}}\n{{test_list[1]}}\n{{test_list[2]}}\n[BEGIN]\n",
        doc_to_target="{{code}}\n[DONE]", target_delimiter="",
        generation_kwargs={"until": ["[DONE]", BASE_SPECIAL_TOKEN], "max_gen_toks": 32, **_GREEDY},
        fewshot_config={"sampler": "first_n"},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]))

    # HumanEval: 0-shot completion of the function whose signature and docstring are the prompt.
    configs.append(_task(
        "humaneval", files("humaneval", {"test": _humaneval_docs(4)}),
        test_split="test", output_type="generate_until", doc_to_text="{{prompt}}",
        doc_to_target="{{test}}\ncheck({{entry_point}})",
        generation_kwargs={"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint", BASE_SPECIAL_TOKEN],
                           "max_gen_toks": 32, **_GREEDY},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]))

    for config in configs:
        name = config.get("group") or config["task"]
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return test_sizes
