"""The expert-layer benchmark checks that both implementations agree before it times them."""

from __future__ import annotations

import pytest
import torch

from bench.moe_layer import (
    LayerShape,
    time_decode_paths,
    time_layer,
    time_token_routers,
)

TINY = LayerShape("tiny", hidden=32, intermediate=64, groups=2, experts=4, top_k=2, adapter_dim=4, batch=4, seq_len=8)


@pytest.mark.parametrize("bf16_autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("include_base_mlp", [False, True], ids=["experts", "block"])
def test_time_layer_times_both_implementations(bf16_autocast: bool, include_base_mlp: bool) -> None:
    batched, reference = time_layer(TINY, repeats=1, include_base_mlp=include_base_mlp, bf16_autocast=bf16_autocast)
    assert batched > 0 and reference > 0


def test_time_layer_refuses_implementations_that_disagree(monkeypatch) -> None:
    import bench.moe_layer

    original = bench.moe_layer.reference_expert_forward
    monkeypatch.setattr(bench.moe_layer, "reference_expert_forward", lambda *args: original(*args) + 1e-2)
    with pytest.raises(AssertionError):
        time_layer(TINY, repeats=1, include_base_mlp=False)


@pytest.mark.parametrize("bf16_autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_time_token_routers_times_linear_and_ac(bf16_autocast: bool) -> None:
    linear, adaptive = time_token_routers(TINY, repeats=1, bf16_autocast=bf16_autocast)
    assert linear > 0 and adaptive > 0


def test_time_token_routers_refuses_an_ac_side_without_effect(monkeypatch) -> None:
    import bench.moe_layer

    monkeypatch.setattr(bench.moe_layer, "adaptive_clustering_token_weights", lambda x, *args: torch.ones_like(x))
    with pytest.raises(AssertionError, match="had no effect"):
        time_token_routers(TINY, repeats=1)


@pytest.mark.parametrize("rows", [1, 4])
def test_time_decode_paths_times_gathered_and_all_groups(rows: int) -> None:
    gathered, all_groups = time_decode_paths(TINY, rows, repeats=1, dtype=torch.float32, device=torch.device("cpu"))
    assert gathered > 0 and all_groups > 0


def test_time_decode_paths_refuses_paths_that_disagree(monkeypatch) -> None:
    from moce_model.model.experts import AdapterExperts

    original = AdapterExperts._one_token_rows
    monkeypatch.setattr(AdapterExperts, "_one_token_rows",
                        lambda self, *args: (original(self, *args)[0] + 1e-2, None))
    with pytest.raises(AssertionError):
        time_decode_paths(TINY, 4, repeats=1, dtype=torch.float32, device=torch.device("cpu"))
