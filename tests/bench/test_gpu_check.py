"""bench/gpu_check.sh refuses to run without a GPU, saying why, before any part runs (on a machine with CUDA it
is the GPU check itself, not run by the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script is the GPU check itself")
def test_without_a_gpu_the_check_refuses_before_any_part(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 2, result
    assert "no CUDA device" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.txt"]  # no part's output
