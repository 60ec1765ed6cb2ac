"""Fixtures of the `paper-rehearsal` experiment: the paper profile's inputs at toy scale, offline.

`build_rehearsal_fixtures(directory)` writes, deterministically:

- ``base_model/``: a random-init small Llama (LLaMA-2's layout: untied head, full multi-head attention) saved
  with ``save_pretrained``, with the demo's SmolLM2 tokenizer stripped of its chat template and given the
  base model's ``<|endoftext|>`` as BOS/EOS and no pad token, as LLaMA-2-7B base has none of either. So the
  pipeline takes the path of a base model without a chat template (the `human_assistant` prompt format).
- ``datasets/<source>/<file>``: the paper's four Hub datasets in their own files' names and column schemas
  (SlimOrca's ShareGPT ``conversations`` JSONL, MetaMathQA's JSON array, Magicoder OSS and Evol JSONL), laid
  out as local mirrors (`mirror:` of each source in configs/experiments/paper-rehearsal.yaml) read through `datasets`.
- ``lm_eval_tasks/``: lm-eval task YAMLs over local JSONL files that carry the names of the paper's tasks
  (``mmlu`` and ``minerva_math`` as groups of subtasks, ``gsm8k``, ``hellaswag``, ``arc_challenge``, ``mbpp``,
  ``humaneval``) with their datasets' fields and enough few-shot documents for the paper's shot counts, so
  `moce_model.evaluation.suites.paper_benchmarks(lm_eval_tasks_dir=...)` runs them with the paper's settings.

The rows are made from templates with a seeded generator: the same seed gives byte-identical files (the
model weights come from ``torch.manual_seed``). ``python -m moce_model.rehearsal DIR`` builds them from a shell.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moce_model.common.io import atomic_dir
from moce_model.experiment import load_experiment
from moce_model.model.base_model import find_smollm2_gguf

FIXTURE_VERSION = "2"
MANIFEST_NAME = "rehearsal_fixtures.json"
# The SmolLM2 base checkpoint's special token: the instruct tokenizer's ChatML markers have no place in a
# base model's text.
BASE_SPECIAL_TOKEN = "<|endoftext|>"
ROWS_PER_SOURCE = 40

# Each source's file, named as in its Hub repository.
SOURCE_FILES: dict[str, str] = {
    "slimorca": "oo-labeled_correct.gpt4.sharegpt.jsonl",
    "metamathqa": "MetaMathQA-395K.json",
    "magicoder_oss": "data-oss_instruct-decontaminated.jsonl",
    "magicoder_evol": "data-evol_instruct-decontaminated.jsonl",
}


@dataclass(frozen=True)
class RehearsalFixtures:
    """Where the rehearsal's inputs are inside the fixture directory."""

    root: Path

    @property
    def base_model_dir(self) -> Path:
        return self.root / "base_model"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def lm_eval_tasks_dir(self) -> Path:
        return self.root / "lm_eval_tasks"

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME


# ------------------------------------------------------------------------------------------------ base model


def save_base_model_without_chat_template(directory: Path, seed: int = 0) -> None:
    """A random-init small Llama and the SmolLM2 tokenizer without its chat template, at `directory`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    token_id = tokenizer.convert_tokens_to_ids(BASE_SPECIAL_TOKEN)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != BASE_SPECIAL_TOKEN:
        raise ValueError(f"the SmolLM2 tokenizer in {gguf} has no {BASE_SPECIAL_TOKEN!r} token")
    tokenizer.chat_template = None
    tokenizer.bos_token = BASE_SPECIAL_TOKEN
    tokenizer.eos_token = BASE_SPECIAL_TOKEN
    tokenizer.unk_token = BASE_SPECIAL_TOKEN
    tokenizer.pad_token = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    # save_pretrained writes the template as chat_template.jinja when one is set: make sure none survived.
    leftovers = [p.name for p in directory.glob("chat_template*")]
    config_file = json.loads((directory / "tokenizer_config.json").read_text())
    if leftovers or config_file.get("chat_template"):
        raise RuntimeError(f"{directory}: the saved tokenizer still carries a chat template ({leftovers})")


# ------------------------------------------------------------------------------------------- source datasets

_TOPICS = ["photosynthesis", "the water cycle", "volcanoes", "the printing press", "plate tectonics",
           "the Roman Empire", "honey bees", "the moon's phases", "rainbows", "the immune system"]
_LANGUAGES = ["French", "German", "Spanish", "Italian"]
_PHRASES = ["good morning", "thank you very much", "where is the station", "the weather is nice today",
            "I like to read books"]
_SYSTEMS = [
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "",
]
_ITEMS = ["apples", "pencils", "notebooks", "oranges", "stickers", "marbles"]
_NAMES = ["Janet", "Tom", "Maria", "Ken", "Aisha", "Luis"]
_FUNCTIONS = [
    ("count_vowels", "text", "returns the number of vowels in `text`",
     "    return sum(1 for c in text.lower() if c in 'aeiou')"),
    ("is_palindrome", "text", "tells whether `text` reads the same backwards",
     "    return text == text[::-1]"),
    ("running_total", "values", "returns the running totals of the list `values`",
     "    out, total = [], 0\n    for v in values:\n        total += v\n        out.append(total)\n    return out"),
    ("dedupe", "values", "removes duplicates from `values`, keeping the first occurrence",
     "    seen = set()\n    return [v for v in values if not (v in seen or seen.add(v))]"),
    ("word_lengths", "text", "maps every word of `text` to its length",
     "    return {w: len(w) for w in text.split()}"),
]
_EVOL_TASKS = [
    "Develop a {lang} class `{name}` that manages a queue of tasks with priorities and supports peeking.",
    "Write a {lang} function that parses a CSV line with quoted fields into a list of strings; name it `{name}`.",
    "Refactor the following {lang} snippet so that `{name}` runs in linear time instead of quadratic time.",
    "Explain, with a {lang} example named `{name}`, how memoization speeds up a recursive Fibonacci function.",
]


def _slimorca_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(n):
        system = _SYSTEMS[index % len(_SYSTEMS)]
        if index % 2 == 0:
            phrase, language = rng.choice(_PHRASES), rng.choice(_LANGUAGES)
            human = f"Translate \"{phrase}\" to {language}. (item {index})"
            gpt = f"In {language}, \"{phrase}\" can be said in a polite everyday way."
        else:
            topic = rng.choice(_TOPICS)
            human = f"Write a short paragraph explaining {topic} to a curious student. (item {index})"
            gpt = f"{topic.capitalize()} is a topic with a long history; here is a short explanation of how it works."
        turns = ([{"from": "system", "value": system, "weight": None}] if system else [])
        turns += [{"from": "human", "value": human, "weight": 0.0}, {"from": "gpt", "value": gpt, "weight": 1.0}]
        rows.append({"conversations": turns})
    return rows


def _metamathqa_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(n):
        name, item = _NAMES[index % len(_NAMES)], rng.choice(_ITEMS)
        a, b, price = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 12)
        question = f"{name} buys {a} boxes with {b} {item} in each box, and pays ${price} per box. " \
                   f"How many {item} does {name} have, and how much did they cost? (problem {index})"
        response = f"{name} has {a} * {b} = {a * b} {item}. The boxes cost {a} * {price} = ${a * price}.\n" \
                   f"The answer is: {a * b}"
        kind = ("GSM_Rephrased", "GSM_AnsAug", "MATH_AnsAug", "GSM_SV")[index % 4]
        rows.append({"query": question, "response": response, "type": kind, "original_question": question})
    return rows


def _magicoder_oss_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(n):
        name, argument, does, body = _FUNCTIONS[index % len(_FUNCTIONS)]
        variant = f"{name}_{index}"
        seed_code = f"def {variant}({argument}):\n    # TODO\n    pass\n"
        rows.append({
            "lang": "python",
            "raw_index": 1000 + index,
            "index": index,
            "seed": seed_code,
            "openai_fingerprint": "fp_" + "".join(rng.choice("0123456789abcdef") for _ in range(10)),
            "problem": f"You are tasked with implementing a Python function `{variant}({argument})` that {does}. "
                       f"Complete the function below.\n\n```python\n{seed_code}```",
            "solution": f"```python\ndef {variant}({argument}):\n{body}\n```",
        })
    return rows


def _magicoder_evol_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(n):
        lang = rng.choice(["Python", "JavaScript", "Java", "Rust"])
        name = f"solver{index}"
        instruction = _EVOL_TASKS[index % len(_EVOL_TASKS)].format(lang=lang, name=name)
        response = f"Here is a {lang} implementation of `{name}` with an explanation of each step."
        rows.append({"instruction": instruction, "response": response})
    return rows


def write_source_mirrors(datasets_dir: Path, seed: int = 0, rows_per_source: int = ROWS_PER_SOURCE) -> None:
    """Each paper dataset as a mirror directory holding its file, in the Hub file's layout."""
    makers = {"slimorca": _slimorca_rows, "metamathqa": _metamathqa_rows,
              "magicoder_oss": _magicoder_oss_rows, "magicoder_evol": _magicoder_evol_rows}

    paper = sorted(source.name for source in load_experiment("paper").sources)
    if sorted(makers) != paper:
        raise RuntimeError(f"rehearsal sources {sorted(makers)} do not match the paper experiment's {paper}")
    for offset, (source, make) in enumerate(makers.items()):
        rows = make(random.Random(seed * 1000 + offset), rows_per_source)
        path = datasets_dir / source / SOURCE_FILES[source]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":  # MetaMathQA ships one JSON array, not JSON Lines
            path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
        else:
            _write_jsonl(path, rows)


# ------------------------------------------------------------------------------------------- lm-eval tasks


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


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
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
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
        name, argument, does, body = _FUNCTIONS[index % len(_FUNCTIONS)]
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
    """Task YAMLs (and their JSONL files) under the paper's task names; returns each leaf task's test size."""
    import yaml

    rng = random.Random(seed + 7)
    data_dir = tasks_dir / "data"
    configs: list[dict[str, Any]] = []
    test_sizes: dict[str, int] = {}

    def files(task: str, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
        paths = {}
        for split, docs in splits.items():
            paths[split] = data_dir / task / f"{split}.jsonl"
            _write_jsonl(paths[split], docs)
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


# --------------------------------------------------------------------------------------------------- public


def build_rehearsal_fixtures(directory: str | Path, seed: int = 0) -> RehearsalFixtures:
    """Write the base model, the source mirrors and the lm-eval tasks at `directory` (replaced as a whole)."""
    target = Path(directory).resolve()
    fixtures = RehearsalFixtures(target)
    with atomic_dir(target) as staging:
        save_base_model_without_chat_template(staging / "base_model", seed=seed)
        write_source_mirrors(staging / "datasets", seed=seed)
        # The task YAMLs name their data files by absolute path, so they are written with the final location
        # (the staging directory is renamed to it) and refer to the staging copy only until then.
        test_sizes = write_lm_eval_tasks(staging / "lm_eval_tasks", seed=seed)
        for task_yaml in (staging / "lm_eval_tasks").glob("*.yaml"):
            task_yaml.write_text(task_yaml.read_text().replace(str(staging), str(target)))
        (staging / MANIFEST_NAME).write_text(json.dumps(
            {"version": FIXTURE_VERSION, "seed": seed, "root": str(target), "lm_eval_test_documents": test_sizes},
            indent=1) + "\n")
    return fixtures


def ensure_rehearsal_fixtures(directory: str | Path, seed: int = 0) -> RehearsalFixtures:
    """The fixtures at `directory`, built first when they are missing, from another fixture version or seed,
    or were moved (the task YAMLs hold absolute paths)."""
    fixtures = RehearsalFixtures(Path(directory).resolve())
    try:
        manifest = json.loads(fixtures.manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    if manifest.get("version") != FIXTURE_VERSION or manifest.get("seed") != seed \
            or manifest.get("root") != str(fixtures.root):
        return build_rehearsal_fixtures(fixtures.root, seed=seed)
    return fixtures


def lm_eval_test_documents(fixtures: RehearsalFixtures) -> dict[str, int]:
    """How many test documents each leaf lm-eval task of the fixtures has (from the manifest)."""
    return dict(json.loads(fixtures.manifest_path.read_text())["lm_eval_test_documents"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the paper-rehearsal fixtures (base model, datasets, tasks).")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fixtures = build_rehearsal_fixtures(args.directory, seed=args.seed)
    print(f"rehearsal fixtures written to {fixtures.root}")


if __name__ == "__main__":
    main()
