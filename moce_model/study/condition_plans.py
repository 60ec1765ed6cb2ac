"""What each evaluation-only condition of the study does to a run's held-out items (`noised`, `adaptive`,
`soft`, `blended`): the plan of which rows to score, routed how; `conditions` registers and scores them."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from moce_model.clustering.kmeans import CentroidUpdate, ClusterState, update_centroids
from moce_model.clustering.router import ClusterRouter, TextEncoder
from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.data.instructions import routing_text
from moce_model.evaluation.benchmarks import blend_rows, instruction_row_item_id
from moce_model.evaluation.metrics import (
    HELDOUT_LOSS,
    PARTS_LOSS,
    ROUTED_AS_FIRST_PART,
    ROUTED_AS_SECOND_PART,
)
from moce_model.study.config import ADAPTIVE, BLENDED, NOISED, SOFT, StudyConfig

if TYPE_CHECKING:
    from moce_model.model.config import MoCEConfig


# The loss the conditions score: the held-out loss of the `instruction_rows` benchmarks of `study_runs`.
HELDOUT_METRIC = HELDOUT_LOSS
PROMPT_FIELDS: tuple[str, ...] = ("system", "instruction", "input")

# A word: a maximal run of letters, digits or underscores; what lies between words (spaces, punctuation, markup)
# is kept, so a corrupted prompt has the shape of the original.
WORD = re.compile(r"\w+")

# Columns of what a condition scores and of the scores it carries over (the study's score columns without
# layout and seed, which the run gives).
SCORE_COLUMNS: tuple[str, ...] = ("benchmark", "metric", "item_id", "score")


@dataclass(frozen=True)
class ConditionInputs:
    """What a condition may use for one run.

    `heldout`: benchmark name -> the run's held-out rows (id, system, instruction, input, response), the rows its
    clean `heldout_loss` was measured on; `clean_scores`: the run's own item scores (SCORE_COLUMNS, every
    benchmark); `moce_config`: the run's layout (None for the base model). For a layout that routes by centroids:
    `centroids`, the clustering it was trained with, `encoder`, the router's embedder, and `embeddings`, the
    (ids, vectors) of every instruction the clustering was fit on; None otherwise."""

    layout: str
    config: StudyConfig
    heldout: Mapping[str, pl.DataFrame]
    clean_scores: pl.DataFrame
    moce_config: MoCEConfig | None = None
    centroids: np.ndarray | None = None
    encoder: TextEncoder | None = None
    embeddings: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class ConditionPlan:
    """What to score for one run under a condition: `rows` (benchmark -> held-out rows, ids kept, as changed by
    the condition) routed by `router` (None: the model's own routing), plus `kept_scores` (SCORE_COLUMNS), the
    scores that need no forward pass: clean scores that the condition provably leaves unchanged, or scores
    computed from clean scores and from the routing; `details`: a table about the condition on this run (the
    table asset gathers it over the runs, `StudyCondition.summarize`)."""

    rows: Mapping[str, pl.DataFrame]
    router: Any = None
    # How the model routes prompts near a cluster boundary (`MoCELM`'s argument); None: as its config says.
    soft_assignment: Any = None
    kept_scores: pl.DataFrame | None = None
    details: pl.DataFrame | None = None


@dataclass(frozen=True)
class StudyCondition:
    name: str
    prepare: Callable[[ConditionInputs], ConditionPlan | None]
    # What the condition does, with the study's settings, for the table's note (markdown).
    describe: Callable[[StudyConfig], str]
    # A few lines about the `details` of every run (with a `run` column), for the table's note.
    summarize: Callable[[pl.DataFrame], str] | None = None
    # The condition scores items of its own, not the clean rows' items: the table does not pair it with the
    # clean runs (`moce_model.study.table.comparisons`).
    own_items: bool = False


def clean_heldout_scores(inputs: ConditionInputs, benchmarks: Sequence[str], row_ids: Sequence[str]
                         ) -> pl.DataFrame:
    """The run's clean held-out loss (SCORE_COLUMNS) of each held-out row (benchmark, row id), in that order;
    an error naming the items the run's clean scores lack."""

    if len(benchmarks) != len(row_ids):
        raise ValueError(f"{len(benchmarks)} benchmark names for {len(row_ids)} row ids")
    wanted = pl.DataFrame({
        "benchmark": list(benchmarks), "metric": HELDOUT_METRIC,
        "item_id": [instruction_row_item_id(b, r) for b, r in zip(benchmarks, row_ids)],
    }, schema={"benchmark": pl.String(), "metric": pl.String(), "item_id": pl.String()}).with_row_index("order")
    scores = wanted.join(inputs.clean_scores.select(SCORE_COLUMNS), on=["benchmark", "metric", "item_id"],
                         how="left").sort("order").drop("order")
    lacking = scores.filter(pl.col("score").is_null())
    if lacking.height:
        raise ValueError(f"{inputs.layout}: the run's clean scores lack {lacking.height} held-out item(s), e.g. "
                         f"{lacking['item_id'].head(3).to_list()}: materialize its study_runs partition again")
    if scores.height != wanted.height:
        raise ValueError(f"{inputs.layout}: the run's clean scores hold some held-out item more than once")
    return scores


def prompt_vocabulary(frames: Iterable[pl.DataFrame]) -> list[str]:
    """The distinct words of the prompts (system, instruction, input) of `frames`, sorted: the words a corrupted
    prompt draws its replacements from (real words of the same data, rather than a marker token the model may
    learn to skip)."""
    words: set[str] = set()
    for frame in frames:
        for field in PROMPT_FIELDS:
            for text in frame[field].to_list():
                words.update(WORD.findall(text or ""))
    return sorted(words)


def _item_rng(seed: int, item_id: str) -> np.random.Generator:
    # Seeded by the item's id, not its position: an item is corrupted the same way whatever else is evaluated.
    digest = hashlib.sha256(str(item_id).encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def corrupt_prompt(row: Mapping[str, Any], share: float, seed: int, vocabulary: Sequence[str]
                   ) -> tuple[dict[str, Any], int, int]:
    """(the row with round(share x n) of the n words of its prompt replaced, n, how many were replaced).

    The words are counted over system, instruction and input together and chosen uniformly without
    replacement; each is replaced by a word of `vocabulary` other than itself, drawn uniformly. The choice
    depends only on `seed` and the row's `id`. The response and every other field are untouched."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"the share of words to replace must be in (0, 1], got {share}")
    index_of = {word: index for index, word in enumerate(vocabulary)}
    if len(index_of) < 2:
        raise ValueError(f"a vocabulary of at least 2 distinct words is needed to replace words, got {len(index_of)}")
    spans = [(field, match.start(), match.end()) for field in PROMPT_FIELDS
             for match in WORD.finditer(row.get(field) or "")]
    count = int(math.floor(share * len(spans) + 0.5))
    rng = _item_rng(seed, row["id"])
    chosen = sorted(rng.choice(len(spans), size=count, replace=False).tolist()) if count else []
    replacements: dict[str, list[tuple[int, int, str]]] = {}
    for index in chosen:
        field, start, end = spans[index]
        original = row[field][start:end]
        position = index_of.get(original)
        if position is None:
            word = vocabulary[int(rng.integers(len(vocabulary)))]
        else:  # a draw among the other words: skip over the original's position
            draw = int(rng.integers(len(vocabulary) - 1))
            word = vocabulary[draw + (draw >= position)]
        replacements.setdefault(field, []).append((start, end, word))
    corrupted = dict(row)
    for field, edits in replacements.items():
        text = row[field]
        for start, end, word in reversed(edits):  # right to left: earlier offsets stay valid
            text = text[:start] + word + text[end:]
        corrupted[field] = text
    return corrupted, len(spans), count


def noised_rows(rows: pl.DataFrame, share: float, seed: int, vocabulary: Sequence[str]) -> pl.DataFrame:
    """`rows` with every prompt corrupted by `corrupt_prompt`, plus `words` and `replaced_words` per row."""
    out = []
    for row in rows.to_dicts():
        corrupted, words, replaced = corrupt_prompt(row, share, seed, vocabulary)
        out.append({**corrupted, "words": words, "replaced_words": replaced})
    return pl.DataFrame(out, schema={**rows.schema, "words": pl.Int64(), "replaced_words": pl.Int64()})


def _prepare_noised(inputs: ConditionInputs) -> ConditionPlan:
    config = inputs.config
    vocabulary = prompt_vocabulary(inputs.heldout.values())
    rows = {benchmark: noised_rows(frame, config.noise_share, config.noise_seed, vocabulary)
            for benchmark, frame in inputs.heldout.items()}
    details = pl.DataFrame(
        [{"benchmark": benchmark, "items": frame.height, "words": int(frame["words"].sum()),
          "replaced_words": int(frame["replaced_words"].sum())} for benchmark, frame in rows.items()],
        schema={"benchmark": pl.String(), "items": pl.Int64(), "words": pl.Int64(), "replaced_words": pl.Int64()})
    return ConditionPlan(rows=rows, details=details)


def _describe_noised(config: StudyConfig) -> str:
    return (f"{config.noise_share:.0%} of the words of every held-out prompt (system, instruction, input) replaced "
            f"by other words of the held-out prompts (seed {config.noise_seed}, the same for every run), the "
            "response untouched; the model routes by the corrupted prompt")


def _summarize_noised(details: pl.DataFrame) -> str:
    per_benchmark = details.unique(["benchmark", "items", "words", "replaced_words"]).sort("benchmark")
    return "; ".join(f"{r['benchmark']}: {r['replaced_words']:,} of {r['words']:,} words in {r['items']} prompts"
                     for r in per_benchmark.iter_rows(named=True))


def adapt_centroids(centroids: np.ndarray, ids: np.ndarray, vectors: np.ndarray, heldout_ids: Sequence[str]
                    ) -> CentroidUpdate:
    """The clustering's state over the rows it was fit on other than the held-out ones (each in the cluster of
    its nearest centroid: the sums and counts the centroids stand for), updated with the held-out rows by
    `update_centroids`: the centroids as they would be after taking in the held-out prompts as new data."""
    ids = np.asarray(ids, dtype=str)
    heldout = np.isin(ids, np.asarray(list(heldout_ids), dtype=str))
    missing = sorted(set(heldout_ids) - set(ids[heldout].tolist()))
    if missing:
        raise ValueError(f"{len(missing)} held-out row(s) have no embedding in the clustering's embeddings, e.g. "
                         f"{missing[:3]}: materialize instruction_embeddings for the same instructions")
    state = ClusterState.from_assignment(ids[~heldout], vectors[~heldout], centroids)
    return update_centroids(state, ids[heldout], vectors[heldout])


def _prepare_adaptive(inputs: ConditionInputs) -> ConditionPlan | None:
    if inputs.centroids is None:
        return None  # the layout does not route by centroids: nothing adapts
    if inputs.encoder is None or inputs.embeddings is None:
        raise ValueError(f"{inputs.layout}: the adaptive condition needs the router's encoder and the clustering's "
                         "embeddings")
    frames = dict(inputs.heldout)
    heldout_ids = [i for frame in frames.values() for i in frame["id"].to_list()]
    update = adapt_centroids(inputs.centroids, *inputs.embeddings, heldout_ids)
    adapted = ClusterRouter(inputs.encoder, update.state.centroids)
    fixed = ClusterRouter(inputs.encoder, inputs.centroids)

    rows, kept_benchmarks, kept_ids = {}, [], []
    rerouted_from = np.zeros(len(inputs.centroids), dtype=np.int64)
    for benchmark, frame in frames.items():
        # Routed as the model routes them: the router's embedding of each item's routing text.
        embeddings = inputs.encoder.encode([routing_text(*r) for r in frame.select(PROMPT_FIELDS).iter_rows()])
        before, after = fixed.assign_embeddings(embeddings), adapted.assign_embeddings(embeddings)
        moved = before != after
        np.add.at(rerouted_from, before[moved], 1)
        rows[benchmark] = frame.filter(pl.Series(moved))
        # An item routed to the same group reads the same text through the same experts: its clean score stands.
        stayed = frame.filter(pl.Series(~moved))["id"].to_list()
        kept_benchmarks += [benchmark] * len(stayed)
        kept_ids += stayed
    kept_scores = clean_heldout_scores(inputs, kept_benchmarks, kept_ids)
    # Cosine distance of each adapted centroid from the fitted one the run was trained and evaluated with.
    from_fitted = np.maximum(1.0 - np.einsum("kd,kd->k", np.asarray(inputs.centroids, np.float64),
                                             update.state.centroids.astype(np.float64)), 0.0)
    details = pl.DataFrame({
        "cluster": np.arange(len(inputs.centroids)), "members": update.state.counts - update.new_rows,
        "heldout_rows": update.new_rows, "drift": update.drift, "drift_from_fitted": from_fitted,
        "rerouted_items": rerouted_from,
    }).cast({"cluster": pl.Int64, "members": pl.Int64, "heldout_rows": pl.Int64, "rerouted_items": pl.Int64})
    return ConditionPlan(rows=rows, router=adapted, kept_scores=kept_scores, details=details)


def _describe_adaptive(config: StudyConfig) -> str:
    return ("for the layouts that route by centroids: the centroids updated incrementally with the held-out "
            "prompts (mini-batch spherical k-means step from the clustering's sums and counts over the other rows, "
            "as the `incremental` mode of kmeans_centroids) and the held-out items routed by them; an item routed to "
            "the same group as before keeps its clean score (same text, same experts), the others are scored again. "
            "Drift: cosine distance each centroid moved in the update (and from the fitted centroid)")


def _summarize_adaptive(details: pl.DataFrame) -> str:
    per_cluster = details.unique(["cluster", "members", "heldout_rows", "drift", "drift_from_fitted",
                                  "rerouted_items"]).sort("cluster")
    if per_cluster.height != per_cluster["cluster"].n_unique():
        # Runs trained with different clusterings: their drift is not one number per cluster.
        per_cluster = details.group_by("cluster").agg(pl.col("members").max(), pl.col("heldout_rows").max(),
                                                      pl.col("drift").max(), pl.col("drift_from_fitted").max(),
                                                      pl.col("rerouted_items").max()).sort("cluster")
        prefix = "runs differ (clusterings of several k-means fits), largest over the runs: "
    else:
        prefix = ""
    return prefix + "; ".join(
        f"cluster {r['cluster']}: {r['members']:,} rows + {r['heldout_rows']} held-out, drift {r['drift']:.2g} "
        f"({r['drift_from_fitted']:.2g} from the fitted centroid), {r['rerouted_items']} held-out item(s) moved to "
        "another group" for r in per_cluster.iter_rows(named=True))


def _prepare_soft(inputs: ConditionInputs) -> ConditionPlan | None:
    if inputs.centroids is None:
        return None  # the layout does not route by centroids: there is no boundary between groups
    if inputs.encoder is None:
        raise ValueError(f"{inputs.layout}: the soft condition needs the router's encoder")

    rule = SoftAssignmentRule(margin=inputs.config.soft_margin, temperature=inputs.config.soft_temperature)
    router = ClusterRouter(inputs.encoder, inputs.centroids)
    rows, kept_benchmarks, kept_ids, details = {}, [], [], []
    for benchmark, frame in inputs.heldout.items():
        embeddings = inputs.encoder.encode([routing_text(*r) for r in frame.select(PROMPT_FIELDS).iter_rows()])
        assigned = router.assign_soft_embeddings(embeddings, rule)
        soft = assigned.soft
        rows[benchmark] = frame.filter(pl.Series(soft))
        # A hard item goes to the nearest group alone, exactly as in the clean run: its clean score stands.
        hard = frame.filter(pl.Series(~soft))["id"].to_list()
        kept_benchmarks += [benchmark] * len(hard)
        kept_ids += hard
        second_weights = assigned.weights[soft, 1]
        details.append({"benchmark": benchmark, "items": frame.height, "soft_items": int(soft.sum()),
                        "mean_second_weight": float(second_weights.mean()) if soft.any() else 0.0})
    kept_scores = clean_heldout_scores(inputs, kept_benchmarks, kept_ids)
    return ConditionPlan(rows=rows, router=router, soft_assignment=rule, kept_scores=kept_scores,
                         details=pl.DataFrame(details, schema={"benchmark": pl.String(), "items": pl.Int64(),
                                                               "soft_items": pl.Int64(),
                                                               "mean_second_weight": pl.Float64()}))


def _describe_soft(config: StudyConfig) -> str:
    return (f"for the layouts that route by centroids: a held-out prompt whose relative distance gap between its two "
            f"nearest centroids is below {config.soft_margin} is answered by both clusters' groups, weighted by a "
            f"softmax over the distances (temperature {config.soft_temperature}); the model was trained with hard "
            "clusters; the other items keep their clean scores (same text, same single group)")


def _summarize_soft(details: pl.DataFrame) -> str:
    per_benchmark = details.group_by("benchmark").agg(pl.col("items").first(), pl.col("soft_items").min().alias("lo"),
                                                      pl.col("soft_items").max().alias("hi")).sort("benchmark")
    return "; ".join(f"{r['benchmark']}: {r['lo']}" + (f"-{r['hi']}" if r["hi"] != r["lo"] else "")
                     + f" of {r['items']} items soft" for r in per_benchmark.iter_rows(named=True))


# The benchmark of the blended prompts in the scores; the held-out benchmarks are named `heldout_<source>`.
BLENDED_BENCHMARK = "blended_heldout"
BLENDED_ROWS_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(), "system": pl.String(), "instruction": pl.String(), "input": pl.String(),
    "response": pl.String(), "first_benchmark": pl.String(), "first_id": pl.String(),
    "second_benchmark": pl.String(), "second_id": pl.String(),
}
BLENDED_DETAILS_SCHEMA: dict[str, pl.DataType] = {
    "layout": pl.String(), "first_benchmark": pl.String(), "second_benchmark": pl.String(), "items": pl.Int64(),
    "routed_as_first_part": pl.Int64(), "routed_as_second_part": pl.Int64(), "routed_as_neither": pl.Int64(),
    "parts_in_one_cluster": pl.Int64(),
}


def blended_heldout_rows(heldout: Mapping[str, pl.DataFrame], items_per_pair: int) -> pl.DataFrame:
    """The blended prompts of the held-out rows (BLENDED_ROWS_SCHEMA): for every pair of benchmarks A < B (by
    name), item i of A with item i of B (each benchmark's rows in id order), for i below `items_per_pair` and the
    size of either, built by `blend_rows`. Even i ask A's item first, odd i B's: otherwise the first part would
    always come from the source whose name sorts first, and "routed as the first part" would say as much about
    the sources as about the position. A blend's id is its parts' ids, "<first>+<second>"."""

    if items_per_pair < 1:
        raise ValueError(f"blend items per pair of sources must be at least 1, got {items_per_pair}")
    if BLENDED_BENCHMARK in heldout:
        raise ValueError(f"a held-out benchmark is named {BLENDED_BENCHMARK!r}, the name of the blended prompts")
    ordered = {name: heldout[name].sort("id").to_dicts() for name in sorted(heldout)}
    rows = []
    for a, b in itertools.combinations(ordered, 2):
        for i in range(min(items_per_pair, len(ordered[a]), len(ordered[b]))):
            parts = [(a, ordered[a][i]), (b, ordered[b][i])]
            (first, first_row), (second, second_row) = parts if i % 2 == 0 else parts[::-1]
            rows.append({"id": f"{first_row['id']}+{second_row['id']}", **blend_rows(first_row, second_row),
                         "first_benchmark": first, "first_id": first_row["id"],
                         "second_benchmark": second, "second_id": second_row["id"]})
    frame = pl.DataFrame(rows, schema=BLENDED_ROWS_SCHEMA)
    repeated = frame.filter(pl.col("id").is_duplicated())["id"].unique().to_list()
    if repeated:
        raise ValueError(f"blended prompts with the same id (held-out ids repeated across sources?): {repeated[:3]}")
    return frame


def _prepare_blended(inputs: ConditionInputs) -> ConditionPlan | None:
    rows = blended_heldout_rows(inputs.heldout, inputs.config.blend_items)
    if rows.height == 0:
        return None  # fewer than two sources: nothing to blend
    item_ids = [instruction_row_item_id(BLENDED_BENCHMARK, row_id) for row_id in rows["id"]]

    def blend_scores(metric: str, values: Sequence[float] | np.ndarray) -> pl.DataFrame:
        return pl.DataFrame({"benchmark": BLENDED_BENCHMARK, "metric": metric, "item_id": item_ids,
                             "score": np.asarray(values, dtype=np.float64)})

    # The parts asked alone are the clean run's own items: their scores are taken, not measured again.
    first_loss = clean_heldout_scores(inputs, rows["first_benchmark"].to_list(), rows["first_id"].to_list())["score"]
    second_loss = clean_heldout_scores(inputs, rows["second_benchmark"].to_list(),
                                       rows["second_id"].to_list())["score"]
    derived = [blend_scores(PARTS_LOSS, ((first_loss + second_loss) / 2).to_numpy())]
    router = details = None
    if inputs.centroids is not None:
        if inputs.encoder is None:
            raise ValueError(f"{inputs.layout}: the blended condition needs the router's encoder")
        # The blends are scored under this very router, so the routing metrics describe the scored forward passes.
        router = ClusterRouter(inputs.encoder, inputs.centroids)

        def clusters(frame: pl.DataFrame) -> np.ndarray:
            return router.assign_embeddings(inputs.encoder.encode(
                [routing_text(*r) for r in frame.select(PROMPT_FIELDS).iter_rows()]))

        part_cluster = {(benchmark, row_id): int(cluster) for benchmark, frame in inputs.heldout.items()
                        for row_id, cluster in zip(frame["id"].to_list(), clusters(frame))}
        blend = clusters(rows)
        first = np.array([part_cluster[key] for key in zip(rows["first_benchmark"], rows["first_id"])])
        second = np.array([part_cluster[key] for key in zip(rows["second_benchmark"], rows["second_id"])])
        as_first, as_second = blend == first, blend == second
        derived += [blend_scores(ROUTED_AS_FIRST_PART, as_first.astype(np.float64)),
                    blend_scores(ROUTED_AS_SECOND_PART, as_second.astype(np.float64))]
        details = (rows.select("first_benchmark", "second_benchmark")
                   .with_columns(first=pl.Series(as_first), second=pl.Series(as_second),
                                 one_cluster=pl.Series(first == second))
                   .group_by("first_benchmark", "second_benchmark", maintain_order=True)
                   .agg(pl.len().alias("items"), pl.col("first").sum().alias("routed_as_first_part"),
                        pl.col("second").sum().alias("routed_as_second_part"),
                        (~pl.col("first") & ~pl.col("second")).sum().alias("routed_as_neither"),
                        pl.col("one_cluster").sum().alias("parts_in_one_cluster"))
                   .select(pl.lit(inputs.layout).alias("layout"), pl.all())
                   .cast(BLENDED_DETAILS_SCHEMA).select(list(BLENDED_DETAILS_SCHEMA)))
    return ConditionPlan(rows={BLENDED_BENCHMARK: rows}, router=router, kept_scores=pl.concat(derived),
                         details=details)


def _describe_blended(config: StudyConfig) -> str:
    return (f"items of their own: for every pair of sources, up to {config.blend_items} prompts that ask held-out "
            "item i of one source, then (\"Then: \") item i of the other (the first source alternating with i), "
            "the reference answer both answers in order; `heldout_loss` is the loss of that answer, "
            f"`{PARTS_LOSS}` the mean clean loss of the two parts asked alone (compared within each row); for the "
            f"layouts that route by centroids, `{ROUTED_AS_FIRST_PART}` / `{ROUTED_AS_SECOND_PART}`: the share of "
            "blends routed to the cluster of their first / second part (both where the parts share a cluster), "
            "where prompts went rather than how well they were answered")


def _summarize_blended(details: pl.DataFrame) -> str:
    """The routing distribution of each layout over its runs; layouts with the same distribution (the same
    clustering routes them alike) are named together."""
    counts = ("routed_as_first_part", "routed_as_second_part", "routed_as_neither", "parts_in_one_cluster")
    per_layout = details.group_by("layout", maintain_order=True).agg(
        pl.col("items", *counts).sum(), pl.col("run").n_unique().alias("runs"))
    alike: dict[tuple, list[str]] = {}
    for r in per_layout.iter_rows(named=True):
        alike.setdefault((r["items"], r["runs"], *(r[c] for c in counts)), []).append(r["layout"])
    lines = []
    for (items, runs, first, second, neither, one_cluster), layouts in alike.items():
        lines.append(f"{', '.join(layouts)}: routed as the first part {first / items:.0%}, as the second "
                     f"{second / items:.0%}, neither {neither / items:.0%} (parts in one cluster "
                     f"{one_cluster / items:.0%}; {items} blends over {runs} run(s))")
    return "; ".join(lines)


STUDY_CONDITIONS: tuple[StudyCondition, ...] = (
    StudyCondition(NOISED, _prepare_noised, _describe_noised, _summarize_noised),
    StudyCondition(SOFT, _prepare_soft, _describe_soft, _summarize_soft),
    StudyCondition(ADAPTIVE, _prepare_adaptive, _describe_adaptive, _summarize_adaptive),
    StudyCondition(BLENDED, _prepare_blended, _describe_blended, _summarize_blended, own_items=True),
)
