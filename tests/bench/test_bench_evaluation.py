"""bench.evaluation runs end to end at a tiny shape: per item and batched score the same items to the same losses;
bf16 autocast to nearly the same."""

from __future__ import annotations

from bench import evaluation


def test_evaluation_bench_prints_both_ways_their_ratio_and_the_loss_difference(capsys) -> None:
    assert evaluation.main(["--shape", "tiny", "--items", "6", "--batch-size", "4", "--repeats", "1",
                            "--threads", "1", "--autocast"]) == 0
    out = capsys.readouterr().out
    rates = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
             if line.startswith(("per_item ", "batched ", "batched_bf16_autocast "))}
    assert set(rates) == {"per_item", "batched", "batched_bf16_autocast"} and all(r > 0 for r in rates.values())
    autocast_diff = float(next(line for line in out.splitlines() if line.startswith("batched_bf16_")).split()[-1])
    assert 0 < autocast_diff < 0.2, "bf16 matmuls round the losses, a little"
    ratio = float(next(line for line in out.splitlines() if line.startswith("batched_over_per_item")).split()[-1])
    assert abs(ratio - rates["batched"] / rates["per_item"]) < 0.02
    assert float(next(line for line in out.splitlines() if line.startswith("max_abs_loss_diff")).split()[-1]) < 1e-5
    assert "1 threads" in out and "6 held-out items" in out and "clusters [" in out and "load_average_1_5_15" in out
