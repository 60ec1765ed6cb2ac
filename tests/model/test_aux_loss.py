"""The load-balancing loss reaches the routers through autograd: same objective as the explicit sum, no side
effects in the forward (compiles with fullgraph=True under activation checkpointing), and the same weight at any
gradient accumulation and world size."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from moce_model.model.balance import load_balancing_loss
from moce_model.model.config import MoCEConfig
from moce_model.training import TrainingConfig, train
from moce_model.variants import VARIANTS
from tests.model.test_modeling import batch_ids, tiny_moce
from tests.tiny_models import save_tiny_llama
from tests.training.test_training import REPO_ROOT, _subprocess_env


def router_grads(model) -> list[torch.Tensor]:
    return [block.moce_experts.router.grad.clone() for block in model.moce_blocks()]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_balance_loss_gradient_equals_the_explicit_objective(gradient_checkpointing: bool) -> None:
    model = tiny_moce(groups=3).train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = batch_ids()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding is excluded from the balance statistics
    clusters = torch.tensor([0, 1, 2])
    out = model(ids, attention_mask=mask, labels=ids, cluster_ids=clusters)
    out.loss.backward()
    injected = router_grads(model)
    injected_value = model.last_aux_loss()

    # The same objective written out: LM loss + coef * mean over layers of each layer's balance loss.
    model.zero_grad()
    routings = []
    hooks = [b.moce_experts.register_forward_hook(lambda m, i, o: routings.append(o[1])) for b in model.moce_blocks()]
    out = model(ids, attention_mask=mask, labels=ids, cluster_ids=clusters, aux_loss_weight=0.0)
    for hook in hooks:
        hook.remove()
    routings = routings[: len(model.moce_blocks())]  # checkpointing re-runs the forward in backward
    explicit_aux = torch.stack(
        [load_balancing_loss(r.logits, r.top_experts, r.group_ids, 3, mask) for r in routings]
    ).mean()
    (out.loss + model.config.aux_loss_coef * explicit_aux).backward()
    explicit = router_grads(model)

    torch.testing.assert_close(injected_value, explicit_aux.detach())
    for got, expected in zip(injected, explicit):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def test_no_balance_loss_without_gradients_or_outside_training() -> None:
    model = tiny_moce().train()
    ids = batch_ids()
    with torch.no_grad():
        model(ids, labels=ids, cluster_ids=torch.tensor([0, 1, 2]))
    assert model.routing_context.aux_request is None
    model.eval()
    model(ids, labels=ids, cluster_ids=torch.tensor([0, 1, 2])).loss.backward()
    assert model.routing_context.aux_request is None
    assert all(block.moce_experts.router.grad is not None for block in model.moce_blocks())


ROUTER_CASES = [(variant, "linear") for variant in VARIANTS] + [("moce", "ac"), ("pesc", "ac")]


@pytest.mark.parametrize(("variant", "token_router"), ROUTER_CASES)
def test_block_compiles_as_one_graph_under_checkpointing_and_matches_eager(variant: str, token_router: str) -> None:
    """fullgraph=True fails on any graph break, e.g. a write to shared state inside the checkpointed region."""
    torch._dynamo.reset()
    model = tiny_moce(variant, token_router=token_router).train()
    ids = batch_ids()
    model(ids, labels=ids, cluster_ids=torch.tensor([0, 1, 2]))  # sets the routing state of this forward
    # The AC router's first block routes plainly: the second one reads the first one's assignments.
    block_index = 1 if token_router == "ac" else 0
    block = model.moce_blocks()[block_index]
    params = [p for p in block.moce_experts.parameters()]
    slots = model.routing_context.top_expert_slots

    def run(fn):
        torch.manual_seed(0)
        x = torch.randn(3, 9, 64, requires_grad=True)
        for p in params:
            p.grad = None
        request = model.routing_context.aux_request
        if request is not None:
            request.probe.grad = None
        if slots is not None:
            slots[block_index].fill_(-1)
        out = fn(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        aux = None if request is None else request.probe.grad.clone()
        if slots is not None:
            # The block's top-1 experts reach its row of the slots in the compiled graph too.
            assert (slots[block_index] >= 0).all()
            aux = (aux, slots.clone())
        return out.detach(), x.grad, [p.grad.clone() for p in params], aux

    def checkpointed(x):
        return checkpoint(block, x, use_reentrant=False)

    eager = run(checkpointed)
    compiled = run(torch.compile(checkpointed, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    for got, expected in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, expected)
    if variant in ("dense_adapter", "cluster_only"):
        assert eager[3] is None  # no router, no balance loss
    elif token_router == "ac":
        (eager_aux, eager_slots), (compiled_aux, compiled_slots) = eager[3], compiled[3]
        assert eager_aux[1] > 0 and eager_aux[0] == 0  # block 1's slot of the probe holds its loss value
        torch.testing.assert_close(compiled_aux, eager_aux)
        assert torch.equal(compiled_slots, eager_slots)
    else:
        assert eager[3][0] > 0 and eager[3][1] == 0  # block 0's slot of the probe holds its loss value
        torch.testing.assert_close(compiled[3], eager[3])


# ------------------------------------------------------------------------------- weight at any accumulation


def identical_rows(n: int) -> pl.DataFrame:
    # Identical examples: every micro-batch has the same balance statistics, so a correctly weighted balance
    # loss gives the same gradient however the step's examples are split into micro-batches and processes.
    return pl.DataFrame([{"id": f"row{i}", "system": "", "instruction": "Add 3 and 4.", "input": "",
                          "response": "3 + 4 = 7"} for i in range(n)])


def one_sgd_step_config(**overrides) -> TrainingConfig:
    # SGD at lr 1 without clipping: the change of each router weight is its gradient.
    values = dict(lr=1.0, optim="sgd", lr_scheduler="constant", warmup_steps=0, max_steps=1, max_grad_norm=0.0,
                  lora_r=2, lora_alpha=4, lora_dropout=0.0, max_length=64, save_steps=100, logging_steps=1)
    values.update(overrides)
    return TrainingConfig.demo(**values)


def router_weights(run_dir) -> dict[str, torch.Tensor]:
    state = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    return {name: tensor for name, tensor in state.items() if "router" in name}


PESC_LAYOUT = dict(variant="pesc", experts_per_group=4, router_top_k=1, adapter_dim=4)


def test_balance_loss_weight_is_independent_of_accumulation_and_world_size(tmp_path) -> None:
    base_dir = save_tiny_llama(tmp_path / "base")
    rows = identical_rows(4)

    def run(name: str, aux_loss_coef: float, **training) -> dict[str, torch.Tensor]:
        config = MoCEConfig(aux_loss_coef=aux_loss_coef, **PESC_LAYOUT)
        train(base_dir, rows, None, config, one_sgd_step_config(**training), tmp_path / name)
        return router_weights(tmp_path / name)

    whole = run("whole", 1.0, per_device_batch_size=4, grad_accum=1)
    accumulated = run("accumulated", 1.0, per_device_batch_size=1, grad_accum=4)
    without_balance = run("no_aux", 0.0, per_device_batch_size=4, grad_accum=1)

    spec = {
        "base_model_dir": str(base_dir), "train_data": str(tmp_path / "rows.parquet"), "cluster_assignments": None,
        "moce_config": {**PESC_LAYOUT, "aux_loss_coef": 1.0},
        "training_config": one_sgd_step_config(per_device_batch_size=2, grad_accum=1).to_dict(),
        "output_dir": str(tmp_path / "two_processes"),
    }
    rows.write_parquet(tmp_path / "rows.parquet")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "moce_model.training.entry", "--spec", str(tmp_path / "spec.json")],
        env=_subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    two_processes = router_weights(tmp_path / "two_processes")

    assert whole.keys() == accumulated.keys() == two_processes.keys() and whole
    for name in whole:
        balance_effect = (whole[name] - without_balance[name]).abs().max()
        assert balance_effect > 1e-4, f"{name}: the balance loss must move the router for the test to mean anything"
        # Before the fix, 4 micro-batches weighted the balance loss 4x (and 2 processes 2x the other way).
        torch.testing.assert_close(accumulated[name], whole[name], rtol=0, atol=balance_effect.item() * 1e-3)
        torch.testing.assert_close(two_processes[name], whole[name], rtol=0, atol=balance_effect.item() * 1e-3)
