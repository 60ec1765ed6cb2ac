"""The model card (README.md) of a merged model directory, made with `huggingface_hub.ModelCard`.

The card is written from what the directory holds: `config.json` (variant, expert layout, routing, the base
model's Hub id), `centroids.npy`, `embedder.json`, `training.json` (the training record) and, once the model has
been evaluated, the benchmark scores, each with its n and 95% interval. `write_model_card` (re)writes it: the merge
writes the card without scores, the evaluation again with them. The card is published with the model, so it names
no file of the machine the model was made on (a path keeps only its last part).

Scores go into a table in the card's text, not into the `model-index` metadata: that needs each benchmark's Hub
dataset id and has no field for an interval or its n.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from huggingface_hub import ModelCard, ModelCardData

from moce_model.clustering.router import (
    CENTROIDS_FILE,
    EMBEDDER_COPY_DIR,
    EMBEDDER_FILE,
)
from moce_model.common.io import atomic_write_text
from moce_model.model.adapters import TRAINING_RECORD_FILE
from moce_model.model.config import MoCEConfig
from moce_model.model.remote_code import (
    CONFIG_MODULE,
    MODELING_MODULE,
    REMOTE_FILE_NAMES,
)
from moce_model.variants import GroupChoice

README_FILE = "README.md"
# A benchmark score as the evaluation reports it (`moce_model.evaluation.runner.RESULTS_SCHEMA`).
RESULT_KEYS: tuple[str, ...] = ("benchmark", "metric", "value", "n_items", "ci_low", "ci_high")
CARD_TAGS: tuple[str, ...] = ("moce", "mixture-of-experts", "mixture-of-clustered-experts", "custom_code")

# How to load the directory, for the card's readers (text, kept beside this module as markdown).
LOAD_SECTION = (Path(__file__).with_name("card_load.md")).read_text(encoding="utf-8").strip()


def without_machine_paths(value: Any) -> Any:
    """`value` (a JSON-like record) with every absolute path cut to its last part: such a path names a file of
    the machine the model was made on, which means nothing where the model is published."""
    if isinstance(value, str):
        for pure in (PurePosixPath(value), PureWindowsPath(value)):
            if pure.is_absolute():
                return pure.name
        return value
    if isinstance(value, Mapping):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_machine_paths(item) for item in value]
    return value


def checked_results(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The score rows, each with `RESULT_KEYS` (and optionally `stderr`, `ci_method`). A score without an interval
    (an aggregate metric with neither per-item scores nor a standard error) has both bounds null and is shown as
    such; a row without a key, with a null value or n, an n that is not a whole number >= 0, or one bound only, is
    refused naming the row and the key."""
    rows = []
    for index, row in enumerate(results):
        missing = [key for key in RESULT_KEYS if key not in row]
        missing += [key for key in ("benchmark", "metric", "value", "n_items") if key in row and row[key] is None]
        if missing:
            raise ValueError(f"results row {index} ({dict(row)!r}): missing {missing}; each score needs "
                             f"{list(RESULT_KEYS)}")
        n_items = row["n_items"]
        if isinstance(n_items, bool) or not float(n_items).is_integer() or n_items < 0:
            raise ValueError(f"results row {index}: n_items is {n_items!r}, expected a whole number >= 0")
        if (row["ci_low"] is None) != (row["ci_high"] is None):
            raise ValueError(f"results row {index}: ci_low is {row['ci_low']!r} and ci_high {row['ci_high']!r}; an "
                             "interval has both bounds or neither")
        rows.append(dict(row))
    return rows


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.4g}"


def _results_lines(results: list[dict[str, Any]] | None) -> list[str]:
    if not results:
        return ["Not evaluated yet: the pipeline's evaluation writes each benchmark score here, with its n and 95% "
                "interval."]
    lines = ["| benchmark | metric | value | n | stderr | 95% interval | interval method |",
             "|---|---|---|---|---|---|---|"]
    for row in results:
        interval = ("none" if row["ci_low"] is None
                    else f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}]")
        lines.append(f"| {row['benchmark']} | {row['metric']} | {_number(row['value'])} | {int(row['n_items'])} | "
                     f"{_number(row.get('stderr'))} | {interval} | {row.get('ci_method') or '–'} |")
    return lines


def _training_lines(record: Mapping[str, Any] | None) -> list[str]:
    if not record:
        return ["No training record in this directory."]
    lines = [f"{record.get('n_examples', '?')} training examples, {record.get('global_step', '?')} optimiser steps, "
             f"prompt format `{record.get('prompt_format', '?')}`.", "", "| setting | value |", "|---|---|"]
    for key, value in sorted((record.get("training_config") or {}).items()):
        lines.append(f"| {key} | `{json.dumps(value)}` |")
    return lines


def _routing_lines(config: MoCEConfig, embedder: Mapping[str, Any] | None, has_copy: bool) -> list[str]:
    if config.needs_centroids:
        needs = ("The model routes by itself: at prefill it decodes each prompt, takes the request (system and user turn) "
                 "out of the prompt format's markup, embeds it with the embedder and picks the group of the nearest "
                 "centroid; the decoding steps keep that group. Embedding needs `sentence-transformers`.")
        if embedder is not None and not has_copy:
            needs += f" The embedder `{embedder.get('model')}` is fetched from the Hub on first use."
        needs += (" The router reads `centroids.npy`, `embedder.json` and the embedder's copy from the model's "
                  "directory: from the Hub, download the repository first (`huggingface_hub.snapshot_download`) "
                  "and load that directory.")
        return [needs]
    if config.group_choice is GroupChoice.HASH:
        return ["The model picks each prompt's expert group by a hash of the prompt's tokens: no embedder is needed."]
    return ["The model has one expert group: it needs no routing by prompt."]


def model_card(model_dir: str | Path, results: Sequence[Mapping[str, Any]] | None = None) -> ModelCard:
    """The card of a merged model directory (see the module docstring), with `results` as its scores."""
    model_dir = Path(model_dir)
    config = MoCEConfig.from_pretrained(model_dir)
    base_config = config.base_config or {}
    base_id = without_machine_paths(base_config.get("_name_or_path") or "")
    record_path = model_dir / TRAINING_RECORD_FILE
    record = without_machine_paths(json.loads(record_path.read_text())) if record_path.is_file() else None
    embedder_path = model_dir / EMBEDDER_FILE
    embedder = without_machine_paths(json.loads(embedder_path.read_text())) if embedder_path.is_file() else None
    has_copy = (model_dir / EMBEDDER_COPY_DIR).is_dir()
    rows = checked_results(results) if results is not None else None

    layout = (f"{config.num_groups} group(s) x {config.experts_per_group} adapter expert(s) of dim "
              f"{config.adapter_dim} in every MLP block")
    if config.token_routing:
        layout += f", token top-{config.router_top_k} inside the group"
        if config.adaptive_clustering_router:
            layout += " by the adaptive-clustering (AC) router (Nielsen et al., ICLR 2025)"
    routing = config.semantics.description
    rule = config.soft_assignment_rule
    if rule is not None:
        routing += (f"; a prompt near the boundary of two clusters (relative distance gap below {rule.margin}) "
                    f"is answered by both clusters' groups, weighted by distance (temperature {rule.temperature})")
    base = f"`{base_id}`" if base_id else f"a local `{base_config.get('model_type', '?')}` checkpoint"
    lines = [
        f"# MoCE model: `{config.variant}`",
        "",
        "Mixture-of-Clustered-Experts (Eo et al., EMNLP 2025): a dense causal LM with routed parallel-adapter "
        "experts, LoRA merged into the base weights.",
        "",
        f"- base model: {base}",
        f"- experts: {layout}",
        f"- routing: {routing}",
    ]
    centroids_path = model_dir / CENTROIDS_FILE
    if centroids_path.is_file():
        shape = np.load(centroids_path, mmap_mode="r", allow_pickle=False).shape
        lines.append(f"- clusters: k = {shape[0]} centroids of dimension {shape[1]} (`{CENTROIDS_FILE}`)")
    if embedder is not None:
        copy = f", a copy in `{EMBEDDER_COPY_DIR}/`" if has_copy else ""
        lines.append(f"- embedder: `{embedder.get('model')}` ({embedder.get('kind', 'sentence-transformers')}, "
                     f"`{EMBEDDER_FILE}`{copy})")
    modeling, configuration = REMOTE_FILE_NAMES[MODELING_MODULE], REMOTE_FILE_NAMES[CONFIG_MODULE]
    lines += [
        "",
        *LOAD_SECTION.format(configuration=configuration, modeling=modeling).splitlines(),
        "",
        *_routing_lines(config, embedder, has_copy),
        "",
        "## Training",
        "",
        *_training_lines(record),
        "",
        "## Results",
        "",
        *_results_lines(rows),
        "",
    ]
    data = ModelCardData(base_model=base_id or None, library_name="transformers", pipeline_tag="text-generation",
                         tags=[*CARD_TAGS, config.variant])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(model_dir: str | Path, results: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """(Re)write the directory's README.md (atomically); returns its path."""
    path = Path(model_dir) / README_FILE
    atomic_write_text(str(model_card(model_dir, results)), path)
    return path
