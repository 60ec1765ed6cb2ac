"""Generation from a merged MoCE directory that routes by itself: embed the prompt, nearest centroid, group.

CLI: ``python -m moce_model.generate --model DIR "prompt" ["prompt" ...]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moce_model.clustering.router import (
    CENTROIDS_FILE,
    ClusterRouter,
    check_routing_files,
    load_model_router,
)
from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.data.instructions import routing_text
from moce_model.data.prompt_format import AUTO, PROMPT_FORMATS, make_prompt_format
from moce_model.model.modeling import MoCEForCausalLM


def check_prompts(texts: Sequence[str]) -> list[str]:
    """The prompts as a list; a prompt that is not a string, or is empty or only whitespace, is an error: there
    is nothing to route and nothing to answer."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of prompts, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("no prompts given")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {index} is {type(text).__name__}, not str")
        if not text.strip():
            raise ValueError(f"prompt {index} is empty or only whitespace: there is nothing to answer")
    return texts


def load_model(model_dir: str | Path) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(model_dir)`, with the routing files checked first and a load
    error (a truncated or damaged weights file, an unreadable config) reported with the directory."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    if (model_dir / CENTROIDS_FILE).is_file():
        check_routing_files(model_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as err:  # transformers and safetensors raise many error types for a damaged directory
        files = ", ".join(sorted(p.name for p in model_dir.glob("*.safetensors"))) or "no *.safetensors"
        raise ValueError(
            f"{model_dir}: cannot load the model ({type(err).__name__}: {err}); weights: {files}"
        ) from err


@dataclass(frozen=True)
class RoutedAnswer:
    """A greedy answer and where its prompt was routed: `cluster` (None for a variant that does not route by
    cluster) and, for a prompt a soft assignment answered with two groups, `second_cluster` and its weight
    `second_weight` (the nearest cluster has 1 - second_weight)."""

    text: str
    cluster: int | None
    second_cluster: int | None = None
    second_weight: float = 0.0

    def route(self, variant: str | None) -> str:
        """How the prompt was routed, in words."""
        if self.cluster is None:
            return f"no cluster routing (variant {variant or 'none'})"
        if self.second_cluster is None:
            return f"cluster {self.cluster} -> expert group {self.cluster}"
        return (f"clusters {self.cluster} and {self.second_cluster} (near their boundary) -> expert groups "
                f"{self.cluster} x {1 - self.second_weight:.3f} + {self.second_cluster} x {self.second_weight:.3f}")


def generate(
    model_dir: str | Path,
    texts: Sequence[str],
    max_new_tokens: int = 128,
    router: ClusterRouter | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    batch_size: int = 8,
    prompt_format_name: str = AUTO,
    soft_assignment: SoftAssignmentRule | None = None,
) -> list[tuple[str, int | None]]:
    """Greedy answers to `texts` (the instruction of each request) with each text routed to its cluster.

    Each text is asked in the prompt format the model was trained with (`prompt_format_name`, see
    `moce_model.data.prompt_format`) and routed by its routing text, as training rows were.
    Returns (answer, cluster) per text; cluster is None for variants that do not route by cluster, and the nearest
    cluster for a text a soft assignment answers with two groups (`answer_prompts` says which). The soft
    assignment is the model config's (`soft_assignment`, off by default) unless `soft_assignment` gives a rule.
    `model`/`tokenizer`/`router` may be passed in to avoid reloading them from `model_dir`.
    """
    answers = answer_prompts(model_dir, texts, max_new_tokens, router, model, tokenizer, batch_size,
                             prompt_format_name, soft_assignment)
    return [(answer.text, answer.cluster) for answer in answers]


@torch.no_grad()
def answer_prompts(
    model_dir: str | Path,
    texts: Sequence[str],
    max_new_tokens: int = 128,
    router: ClusterRouter | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
    batch_size: int = 8,
    prompt_format_name: str = AUTO,
    soft_assignment: SoftAssignmentRule | None = None,
) -> list[RoutedAnswer]:
    """`generate`, with each prompt's whole route (`RoutedAnswer`)."""
    texts = check_prompts(texts)
    if model is None:
        model = load_model(model_dir)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    routes = isinstance(model, MoCEForCausalLM) and model.config.needs_centroids
    clusters: list[int | None] = [None] * len(texts)
    soft = None
    if routes:
        if router is None:
            router = load_model_router(model_dir)
        if router is None:
            raise FileNotFoundError(f"{model_dir}: the {model.config.variant!r} model needs centroids.npy to route")
        model.config.check_num_clusters(router.num_clusters, where=f"the router of {model_dir}")
        routing_texts = [routing_text("", text, "") for text in texts]
        rule = soft_assignment if soft_assignment is not None else model.config.soft_assignment_rule
        if rule is None:
            clusters = [int(c) for c in router.assign(routing_texts)]
        else:
            soft = router.assign_soft(routing_texts, rule)
            clusters = [int(c) for c in soft.nearest]
    fmt = make_prompt_format(prompt_format_name, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    answers: list[RoutedAnswer] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        prompts = [fmt.prompt("", text, "") for text in chunk]
        # The rendered prompts hold their special tokens (BOS included), as in training.
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        extra = {}
        # A batch without a boundary prompt passes one cluster per row: the model's hard path, unchanged.
        if soft is not None and soft.soft[start : start + batch_size].any():
            extra["cluster_ids"] = torch.as_tensor(soft.clusters[start : start + batch_size])
            extra["cluster_weights"] = torch.as_tensor(soft.weights[start : start + batch_size], dtype=torch.float32)
        elif routes:
            extra["cluster_ids"] = torch.tensor(clusters[start : start + batch_size], dtype=torch.long)
        output = model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            **extra,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        for offset, row in enumerate(new_tokens):
            index = start + offset
            mixed = soft is not None and bool(soft.soft[index])
            answers.append(RoutedAnswer(
                text=tokenizer.decode(row, skip_special_tokens=True).strip(), cluster=clusters[index],
                second_cluster=int(soft.clusters[index, 1]) if mixed else None,
                second_weight=float(soft.weights[index, 1]) if mixed else 0.0,
            ))
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer prompts with a merged MoCE model, routed by cluster.")
    parser.add_argument("--model", required=True, help="merged model directory")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--prompt-format", default=AUTO, choices=[AUTO, *PROMPT_FORMATS],
        help="the experiment's prompt format (default: the tokenizer's chat template, else human_assistant)",
    )
    parser.add_argument("prompts", nargs="+", help="prompt text(s): the input side of each request")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        parser.error(f"{model_dir}: not a model directory (no config.json)")
    try:
        check_prompts(args.prompts)
    except ValueError as err:
        parser.error(str(err))
    model = load_model(model_dir)
    variant = getattr(model.config, "variant", None)
    for prompt, answer in zip(
        args.prompts, answer_prompts(model_dir, args.prompts, args.max_new_tokens, model=model,
                                     prompt_format_name=args.prompt_format)
    ):
        print(f"### prompt: {prompt}\n### routed: {answer.route(variant)}\n{answer.text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
