"""Expert-use statistics: which experts of which group the tokens were routed to (the paper's analysis)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moce_model.common.io import atomic_write_bytes
from moce_model.model.adapters import moce_model_of


@torch.no_grad()
def expert_use_counts(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """Run `model` on `batches` (dicts as passed to `model(**batch)`, with `cluster_ids` where the variant
    needs them) and return the (G, E) number of (token, expert) assignments summed over layers; padding
    tokens (attention_mask == 0) are not counted."""
    moce = moce_model_of(model)
    was_training = model.training
    previous = moce.routing_context.record_expert_use
    model.eval()
    moce.reset_expert_use()
    moce.set_expert_use_recording(True)
    # A QLoRA model is placed on its GPU when it is loaded; the batches come from the CPU collator.
    device = next(model.parameters()).device
    try:
        for batch in batches:
            # No KV cache: counting needs none, and a cache passed to compiled decoder layers specialises them
            # per layer index (a recompile per layer).
            model(use_cache=False, **{key: value.to(device) if isinstance(value, torch.Tensor) else value
                                      for key, value in batch.items() if key != "labels"})
        counts = moce.expert_use_counts().numpy().astype(np.int64)
    finally:
        moce.set_expert_use_recording(previous)
        model.train(was_training)
    return counts


def expert_use_share(counts: np.ndarray) -> np.ndarray:
    """Per group, the share of its routed tokens that went to each expert (rows sum to 1; unused groups 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"expert-use counts must be (groups, experts), got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def expert_use_heatmap_png(
    use: np.ndarray, title: str = "expert use per group", path: str | Path | None = None
) -> bytes:
    """Heatmap (groups x experts) of the per-group token share; returns the PNG bytes and writes `path` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = expert_use_share(use)
    groups, experts = share.shape
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * experts, 1.0 + 0.6 * groups), dpi=110)
    image = axes.imshow(share, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(experts), [f"e{e}" for e in range(experts)])
    axes.set_yticks(range(groups), [f"group {g}" for g in range(groups)])
    axes.set_xlabel("expert")
    axes.set_title(title)
    for g in range(groups):
        for e in range(experts):
            axes.text(e, g, f"{share[g, e]:.2f}", ha="center", va="center",
                      color="white" if share[g, e] < 0.6 else "black", fontsize=8)
    figure.colorbar(image, ax=axes, label="share of group's tokens")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    png = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(png, path)
    return png
