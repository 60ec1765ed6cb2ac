"""bench.precision: two studies' runs of one layout, paired on seeds and items, second minus first."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from bench.precision import main


def write_run(root: Path, seed: int, losses: list[float], bf16: bool) -> None:
    run = root / "artifacts" / "study_runs" / "moce" / "e4" / f"s{seed}"
    (run / "training" / "adapter").mkdir(parents=True)
    rows = [{"layout": "moce/e4", "seed": seed, "benchmark": source, "metric": "heldout_loss",
             "item_id": f"{source}/{i}", "score": loss + (0.5 if source == "heldout_b" else 0.0)}
            for source in ("heldout_a", "heldout_b") for i, loss in enumerate(losses)]
    pl.DataFrame(rows).write_parquet(run / "item_scores.parquet")
    (run / "run.json").write_text(json.dumps({"train_seconds": 10.0 if bf16 else 5.0, "cpu_seconds": 9.0}))
    (run / "training" / "adapter" / "training.json").write_text(
        json.dumps({"training_config": {"bf16": bf16}, "global_step": 16}))


def test_the_second_study_is_compared_with_the_first_item_by_item(tmp_path, capsys):
    losses = [1.0, 2.0, 1.5, 0.7, 1.2, 2.2, 0.9, 1.8]
    for seed in (0, 1, 2):
        write_run(tmp_path / "fp32", seed, losses, bf16=False)
        # bf16 worse by 0.1 on every item of one seed, equal on the others; seed 3 has no fp32 counterpart.
        write_run(tmp_path / "bf16", seed, [loss + (0.1 if seed == 1 else 0.0) for loss in losses], bf16=True)
    write_run(tmp_path / "bf16", 3, losses, bf16=True)
    assert main([str(tmp_path / "fp32"), str(tmp_path / "bf16"), "--resamples", "400"]) == 0
    out = capsys.readouterr().out
    assert "seeds [0, 1, 2]" in out and "'bf16': True" in out and "'bf16': False" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("heldout_")}
    assert set(rows) == {"heldout_a", "heldout_b", "heldout_all_sources"}
    assert rows["heldout_all_sources"][2:4] == ["3", "16"]
    assert rows["heldout_all_sources"][4] == "+0.0333"  # 0.1 on one seed of three


def test_no_shared_seed_is_an_error(tmp_path, capsys):
    write_run(tmp_path / "fp32", 0, [1.0, 2.0], bf16=False)
    write_run(tmp_path / "bf16", 1, [1.0, 2.0], bf16=True)
    assert main([str(tmp_path / "fp32"), str(tmp_path / "bf16")]) == 2
    assert "no seed of moce/e4" in capsys.readouterr().err
