"""Progress lines for a person watching a long step (training, evaluation) in the terminal or the event log."""

from __future__ import annotations


def clock(seconds: float) -> str:
    """`4m07s`, or `1h02m` past an hour."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def evaluation_progress(model: str, done: int, total: int, benchmark: str, items: int, seconds: float,
                        elapsed_seconds: float) -> str:
    """One line per finished benchmark: which of how many, its items and time, the time so far. No ETA: the
    benchmarks differ in kind (one forward pass per item against generation and execution), so the pace of
    the first ones does not predict the rest."""
    return (f"{model}: benchmark {done}/{total} {benchmark} done ({items} items in {seconds:.1f} s), "
            f"elapsed {clock(elapsed_seconds)}")
