"""Toy stand-ins for the paper's four training datasets (SlimOrca, MetaMathQA, Magicoder OSS and Evol), each
written as a mirror directory in its Hub file's layout."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

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


ITEMS = ["apples", "pencils", "notebooks", "oranges", "stickers", "marbles"]


NAMES = ["Janet", "Tom", "Maria", "Ken", "Aisha", "Luis"]


FUNCTIONS = [
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
        name, item = NAMES[index % len(NAMES)], rng.choice(ITEMS)
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
        name, argument, does, body = FUNCTIONS[index % len(FUNCTIONS)]
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

    for offset, (source, make) in enumerate(makers.items()):
        rows = make(random.Random(seed * 1000 + offset), rows_per_source)
        path = datasets_dir / source / SOURCE_FILES[source]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":  # MetaMathQA ships one JSON array, not JSON Lines
            path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
        else:
            write_jsonl(path, rows)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
