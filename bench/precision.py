"""The same study layout trained in two precisions, compared run by run: held-out loss and GSM8K exact match
paired on seeds and items (two-level bootstrap, as the study table), and the runs' training times.

    moce study --experiment realmix-bf16 --runs moce/e4/s0,moce/e4/s1,moce/e4/s2
    python -m bench.precision .moce_data/realmix .moce_data/realmix-bf16 --layout moce/e4

The two storage roots must hold the same layout at the same seeds on the same held-out items (two experiments
over the same sources: the held-out split and each seed's training sample depend only on the data). The first
root is the reference: a difference is second - first, so a positive held-out loss difference means the second
precision is worse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

from moce_model.evaluation.metrics import HELDOUT_LOSS
from moce_model.study.config import STUDY_SCORES_SCHEMA
from moce_model.study.table import paired_differences

POOLED = "heldout_all_sources"


def run_dirs(storage_root: Path, layout: str) -> dict[int, Path]:
    """Seed -> the run directory of `layout` under a study's storage root (those with their scores written)."""
    layout_dir = storage_root / "artifacts" / "study_runs" / layout
    runs = {}
    for path in sorted(layout_dir.glob("s*")):
        if path.name[1:].isdigit() and (path / "item_scores.parquet").is_file():
            runs[int(path.name[1:])] = path
    return runs


def labelled_scores(runs: dict[int, Path], label: str) -> pl.DataFrame:
    """The runs' item scores as rows of `label`, plus the held-out loss of every source pooled as one benchmark
    (a held-out item's id names its source, so the pooled items stay distinct and paired)."""
    scores = pl.concat([pl.read_parquet(path / "item_scores.parquet") for path in runs.values()])
    scores = scores.with_columns(pl.lit(label).alias("layout")).select(list(STUDY_SCORES_SCHEMA))
    pooled = scores.filter(pl.col("metric") == HELDOUT_LOSS).with_columns(pl.lit(POOLED).alias("benchmark"))
    return pl.concat([scores, pooled])


def training_record(run: Path) -> dict:
    """Seconds and precision of one run (its run.json and the training record of its adapters)."""
    record = json.loads((run / "run.json").read_text())
    training = json.loads((run / "training" / "adapter" / "training.json").read_text())
    config = training.get("training_config") or {}
    return {"train_seconds": record.get("train_seconds"), "cpu_seconds": record.get("cpu_seconds"),
            "bf16": config.get("bf16"), "steps": training.get("global_step")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="storage root of the reference study (e.g. float32)")
    parser.add_argument("other", type=Path, help="storage root of the study compared with it (e.g. bf16)")
    parser.add_argument("--layout", default="moce/e4")
    parser.add_argument("--resamples", type=int, default=4_000)
    args = parser.parse_args(argv)

    reference_runs, other_runs = run_dirs(args.reference, args.layout), run_dirs(args.other, args.layout)
    seeds = sorted(set(reference_runs) & set(other_runs))
    if not seeds:
        print(f"no seed of {args.layout} has scores under both {args.reference} ({sorted(reference_runs)}) and "
              f"{args.other} ({sorted(other_runs)})", file=sys.stderr)
        return 2
    labels = (args.reference.name, args.other.name)
    if labels[0] == labels[1]:
        labels = ("reference", "other")
    print(f"{args.layout}, seeds {seeds}: {labels[1]} - {labels[0]}, paired on seeds and items, 95% two-level "
          f"bootstrap ({args.resamples} resamples)")
    for label, runs in zip(labels, (reference_runs, other_runs)):
        for seed in seeds:
            print(f"  {label} s{seed}: {training_record(runs[seed])}")
    scores = pl.concat([labelled_scores({s: reference_runs[s] for s in seeds}, labels[0]),
                        labelled_scores({s: other_runs[s] for s in seeds}, labels[1])])
    differences = paired_differences(scores, args.resamples, references=(), counterparts={labels[1]: labels[0]})
    differences = differences.filter(pl.col("reference") != pl.col("layout"))
    print(f"{'benchmark':<32}{'metric':<14}{'seeds':>6}{'items':>6}{'difference':>12}  95% interval  verdict")
    for row in differences.iter_rows(named=True):
        print(f"{row['benchmark']:<32}{row['metric']:<14}{row['n_seeds']:>6}{row['n_items']:>6}"
              f"{row['difference']:>+12.4f}  [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]  {row['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
