"""PNG plots (matplotlib, Agg backend) for asset metadata, and their inline Markdown form."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in tests

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

_MAX_LEGEND_ENTRIES = 20


def _to_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str = "plot") -> str:
    """Inline Markdown image (``data:`` URI), displayable in the Dagster UI metadata."""
    encoded = base64.b64encode(png).decode("ascii")
    return f"![{alt}](data:image/png;base64,{encoded})"


def elbow_plot(curve: pl.DataFrame, knee: int | None = None) -> bytes:
    """Inertia (left axis) and silhouette (right axis) against k, with the chosen k marked."""
    ks = curve["k"].to_numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, curve["inertia"].to_numpy(), "o-", color="tab:blue", label="inertia")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("inertia (sum of cosine distances)", color="tab:blue")
    ax.set_xticks(ks)
    if "silhouette" in curve.columns:
        ax2 = ax.twinx()
        ax2.plot(ks, curve["silhouette"].to_numpy(), "s--", color="tab:orange", label="silhouette")
        ax2.set_ylabel("silhouette (cosine, sample)", color="tab:orange")
    if knee is not None:
        ax.axvline(knee, color="tab:red", linestyle=":", label=f"k = {knee}")
        ax.legend(loc="upper right")
    ax.set_title("Elbow curve of spherical k-means")
    return _to_png(fig)


def _project_2d(X: np.ndarray) -> np.ndarray:
    centred = X - X.mean(axis=0, keepdims=True)
    # The first two right singular vectors are the top principal axes.
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _scatter_by(ax: Any, points: np.ndarray, groups: Sequence[Any], title: str) -> None:
    names = sorted({str(g) for g in groups}, key=lambda s: (len(s), s))
    labels = np.asarray([str(g) for g in groups])
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        mask = labels == name
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, color=cmap(i % cmap.N), label=name)
    if len(names) <= _MAX_LEGEND_ENTRIES:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def cluster_projection_plot(
    X: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    sources: Sequence[str] | None = None,
    seed: int = 0,
    sample: int = 5_000,
    title: str = "Embeddings",
) -> bytes:
    """2-D PCA projection of (a sample of) the embeddings: one panel by cluster, one by source."""
    X = np.asarray(X, dtype=np.float32)
    labels = np.asarray(labels)
    if X.shape[0] != labels.shape[0] or (sources is not None and len(sources) != X.shape[0]):
        raise ValueError("cluster_projection_plot: X, labels and sources must have the same number of rows")
    rows = np.arange(X.shape[0])
    if X.shape[0] > sample:
        rows = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=sample, replace=False))
    points = _project_2d(X[rows].astype(np.float64))
    panels = 2 if sources is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    _scatter_by(axes[0, 0], points, [f"cluster {c}" for c in labels[rows]], "by cluster")
    if sources is not None:
        picked = [sources[i] for i in rows]
        _scatter_by(axes[0, 1], points, picked, "by source")
    fig.suptitle(f"{title} projected on 2 principal axes ({len(rows)} of {X.shape[0]} rows)")
    return _to_png(fig)


def loss_curve_plot(losses: pl.DataFrame) -> bytes:
    """Training loss against step (``step``, ``loss`` columns)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if losses.height:
        ax.plot(losses["step"].to_numpy(), losses["loss"].to_numpy(), color="tab:blue", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    return _to_png(fig)


def heatmap_plot(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    value_format: str = "{:.2f}",
) -> bytes:
    """A labelled heatmap (e.g. expert use per cluster), with values written in the cells when small."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(row_labels), len(column_labels)):
        raise ValueError(f"heatmap_plot: matrix {matrix.shape} vs {len(row_labels)} x {len(column_labels)} labels")
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(column_labels) + 2), max(3, 0.45 * len(row_labels) + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(column_labels)), labels=list(column_labels), rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    if matrix.size <= 400:
        middle = np.nanmean(matrix) if matrix.size else 0.0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, value_format.format(value), ha="center", va="center", fontsize=7,
                    color="white" if value < middle else "black")
    ax.set_title(title)
    return _to_png(fig)
