"""Training rows → tokenised examples in the experiment's prompt format (loss on the response only), with each
row's cluster id carried through the batch for the variants that route by cluster."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from moce_model.data.prompt_format import IGNORE_INDEX, PromptFormat, tokenize_example
from moce_model.model.config import MoCEConfig

if TYPE_CHECKING:  # polars is needed for the data, not for building or stepping a model (GPU scripts)
    import polars as pl

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "system", "instruction", "input", "response")


def resolve_cluster_ids(
    row_ids: Sequence[str],
    cluster_ids: Mapping[str, int] | None,
    moce_config: MoCEConfig | None,
    num_clusters: int | None = None,
) -> list[int]:
    """Per-row `cluster_ids` of the batch: the row's cluster for variants that route by cluster, 0 for the others
    (they have one group, or the model hashes the prompt itself).

    `num_clusters` (the clustering's k) is checked against the model's groups; errors name the missing ids
    (with a count) and cluster ids outside the model's groups.
    """
    if moce_config is None or not moce_config.needs_centroids:
        return [0] * len(row_ids)
    if cluster_ids is None:
        raise ValueError(f"variant {moce_config.variant!r} routes by cluster but no cluster assignments were given")
    if num_clusters is not None:
        moce_config.check_num_clusters(num_clusters, where="training")
    num_groups = moce_config.num_groups
    missing = [row_id for row_id in row_ids if row_id not in cluster_ids]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        raise ValueError(
            f"{len(missing)} of {len(row_ids)} training rows have no cluster assignment "
            f"(ids: {shown}{', ...' if len(missing) > 10 else ''}); re-run cluster_assignments on these instructions"
        )
    groups = [int(cluster_ids[row_id]) for row_id in row_ids]
    out_of_range = sorted({g for g in groups if not 0 <= g < num_groups})
    if out_of_range:
        raise ValueError(
            f"cluster ids {out_of_range[:10]} are outside 0..{num_groups - 1}: the clustering has more clusters "
            f"than the model's num_groups={num_groups}"
        )
    return groups


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenised instruction rows with their expert group id."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def build_dataset(
    rows: pl.DataFrame,
    fmt: PromptFormat,
    max_length: int,
    group_ids: Sequence[int],
) -> tuple[InstructionDataset, dict[str, int]]:
    """Tokenise rows in the prompt format `fmt`; rows whose response is cut away entirely by max_length are
    dropped and counted."""
    check_columns(rows)
    examples = []
    n_truncated = 0
    dropped: list[str] = []
    for row, group in zip(rows.iter_rows(named=True), group_ids):
        untruncated = tokenize_example(
            fmt, row["system"] or "", row["instruction"], row["input"] or "", row["response"], 10**9
        )
        if len(untruncated["input_ids"]) > max_length:
            n_truncated += 1
        example = {key: value[:max_length] for key, value in untruncated.items()}
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped.append(row["id"])
            continue
        example["cluster_ids"] = int(group)
        examples.append(example)
    if dropped:
        logger.warning(
            "%d rows dropped: their prompt alone fills max_length=%d (ids %s)", len(dropped), max_length, dropped[:5]
        )
    if not examples:
        raise ValueError(f"no training example left after tokenisation with max_length={max_length}")
    return InstructionDataset(examples), {"n_truncated": n_truncated, "n_dropped_no_response": len(dropped)}


def check_columns(rows: pl.DataFrame) -> None:
    import polars as pl

    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"training rows lack column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    for column in ("id", "instruction", "response"):
        empty = rows.filter(pl.col(column).is_null() | (pl.col(column).cast(pl.Utf8).str.len_chars() == 0))
        if empty.height:
            raise ValueError(
                f"{empty.height} training rows have an empty {column!r} (first id: {empty['id'][0]!r})"
            )
    duplicated = rows.filter(pl.col("id").is_duplicated())["id"].unique().to_list()
    if duplicated:
        raise ValueError(f"duplicate training row ids: {duplicated[:10]}")


class InstructionCollator:
    """Pads a batch to its longest sequence (rounded up to `pad_to_multiple_of` when given) and keeps the
    per-sequence `cluster_ids`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive number of tokens, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "cluster_ids": torch.tensor([f["cluster_ids"] for f in features], dtype=torch.long),
        }


