"""Tests that need a CUDA GPU: every test in this folder is marked `gpu` and skipped without one.

Run them on a GPU machine with `python -m pytest -m gpu tests/gpu` (docs/benchmarks-gpu.md, "GPU tests")."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(no_cuda)
