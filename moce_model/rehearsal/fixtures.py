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
from dataclasses import dataclass
from pathlib import Path

from moce_model.common.io import atomic_dir
from moce_model.model.base_model import find_smollm2_gguf
from moce_model.rehearsal.lm_eval_tasks import write_lm_eval_tasks
from moce_model.rehearsal.sources import BASE_SPECIAL_TOKEN, write_source_mirrors

FIXTURE_VERSION = "2"


MANIFEST_NAME = "rehearsal_fixtures.json"




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
