"""Routed adapter experts: batched == reference loop, group isolation, zero init, balance loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moce_model.model.balance import load_balancing_loss
from moce_model.model.experts import AdapterExperts, reference_expert_forward

HIDDEN = 32


def make_experts(groups: int, experts: int, top_k: int, rank: int = 8, seed: int = 0) -> AdapterExperts:
    torch.manual_seed(seed)
    module = AdapterExperts(HIDDEN, groups, experts, rank, top_k, scaling=0.7, dropout=0.0)
    with torch.no_grad():
        module.adapter_up.normal_(std=0.2)  # non-zero, as after training
    return module


def inputs(batch: int = 4, seq_len: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, HIDDEN, generator=generator)
    down = torch.randn(batch, seq_len, HIDDEN, generator=generator)
    return x, down


LAYOUTS = [
    pytest.param(3, 4, 2, id="moce-3x4-top2"),
    pytest.param(1, 6, 2, id="pesc-1x6-top2"),
    pytest.param(4, 1, 1, id="cluster_only-4x1"),
    pytest.param(1, 1, 1, id="dense_adapter-1x1"),
    pytest.param(2, 4, 1, id="moce-2x4-top1"),
]


# Rows of 6 tokens take the gathered path; rows of one token (a decoding step) are checked on both paths.
ROW_SHAPES = [pytest.param(6, "gathered", id="rows-of-6-tokens"),
              pytest.param(1, "gathered", id="one-token-rows-gathered"),
              pytest.param(1, "all_groups", id="one-token-rows-all-groups")]


def forward_backward(module: AdapterExperts, fn, bf16_autocast: bool = False, seq_len: int = 6):
    """(output, x grad, down grad, parameter grads) of one forward+backward of `fn(x, down)`."""
    x, down = inputs(seq_len=seq_len)
    module.zero_grad()
    x_in = x.clone().requires_grad_(True)
    down_in = down.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        out = fn(x_in, down_in)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out.float().detach(), x_in.grad, down_in.grad, grads


@pytest.mark.parametrize(("seq_len", "one_token_path"), ROW_SHAPES, indirect=["one_token_path"])
@pytest.mark.parametrize(("groups", "experts", "top_k"), LAYOUTS)
def test_batched_equals_reference_forward_and_gradients(
    groups: int, experts: int, top_k: int, seq_len: int, one_token_path: str
) -> None:
    module = make_experts(groups, experts, top_k)
    group_ids = torch.arange(4) % groups
    batched = forward_backward(module, lambda a, b: module(a, b, group_ids)[0], seq_len=seq_len)
    reference = forward_backward(
        module, lambda a, b: reference_expert_forward(module, a, b, group_ids), seq_len=seq_len
    )
    for got, expected in zip(batched[:3], reference[:3]):
        torch.testing.assert_close(got, expected)
    for name in batched[3]:
        torch.testing.assert_close(batched[3][name], reference[3][name], msg=f"gradient of {name}")


def test_output_matches_the_formula_for_one_token() -> None:
    module = make_experts(2, 4, 2)
    x, down = inputs(batch=1, seq_len=1)
    group = 1
    out, routing = module(x, down, torch.tensor([group]))
    logits = x[0, 0] @ module.router[group].T
    top_logits, top = logits.topk(2)
    weights = torch.softmax(top_logits, dim=-1)  # softmax over the selected logits only
    expected = down[0, 0].clone()
    for weight, expert in zip(weights, top):
        adapter = F.gelu(down[0, 0] @ module.adapter_down[group, :, expert]) @ module.adapter_up[group, expert]
        expected = expected + weight * 0.7 * adapter
    torch.testing.assert_close(out[0, 0], expected)
    assert set(routing.top_experts[0, 0].tolist()) == set(top.tolist())


def test_routing_never_touches_another_groups_parameters() -> None:
    module = make_experts(3, 4, 2)
    x, down = inputs()
    group_ids = torch.tensor([0, 2, 2, 0])  # group 1 unused
    out, routing = module(x, down, group_ids)
    aux = load_balancing_loss(routing.logits, routing.top_experts, group_ids, 3)
    (out.square().sum() + aux).backward()
    for name, param in module.named_parameters():
        assert torch.count_nonzero(param.grad[1]) == 0, f"{name} of unused group 1 got a gradient"
        assert torch.count_nonzero(param.grad[0]) > 0, f"{name} of used group 0 got no gradient"
        assert torch.count_nonzero(param.grad[2]) > 0, f"{name} of used group 2 got no gradient"


def test_unselected_experts_get_no_gradient() -> None:
    module = make_experts(1, 4, 1)
    x, down = inputs(batch=1, seq_len=1)
    out, routing = module(x, down, torch.tensor([0]))
    out.sum().backward()
    chosen = int(routing.top_experts[0, 0, 0])
    for expert in range(4):
        used = torch.count_nonzero(module.adapter_up.grad[0, expert]) > 0
        assert used == (expert == chosen)


def test_zero_initialised_up_projection_returns_base_output_exactly() -> None:
    torch.manual_seed(0)
    module = AdapterExperts(HIDDEN, 3, 4, 8, 2, scaling=2.0, dropout=0.0)
    x, down = inputs()
    out, _ = module(x, down, torch.tensor([0, 1, 2, 1]))
    assert torch.equal(out, down)


def test_balance_loss_is_one_at_uniform_routing_and_larger_when_skewed() -> None:
    experts, top_k = 4, 2
    group_ids = torch.tensor([0, 0])
    # Uniform probabilities and every expert chosen equally often.
    uniform_logits = torch.zeros(2, 4, experts)
    balanced_choice = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]).expand(2, 4, 2)
    uniform = load_balancing_loss(uniform_logits, balanced_choice, group_ids, 1)
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    # Collapsed routing: every token prefers experts 0 and 1.
    skewed_logits = torch.tensor([4.0, 3.0, -2.0, -2.0]).expand(2, 4, experts)
    skewed_choice = torch.tensor([0, 1]).expand(2, 4, 2)
    skewed = load_balancing_loss(skewed_logits, skewed_choice, group_ids, 1)
    assert skewed > 1.5


def test_minimising_the_balance_loss_spreads_tokens_over_a_groups_experts() -> None:
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(HIDDEN), dim=0)
    x = torch.randn(1, 256, HIDDEN) + 3 * direction
    router = 0.1 * torch.randn(4, HIDDEN)
    router[0] += 3 * direction  # collapsed: nearly every token prefers expert 0
    router.requires_grad_(True)
    optimizer = torch.optim.SGD([router], lr=0.5)

    def loss_and_top_share() -> tuple[torch.Tensor, float]:
        logits = x @ router.T
        choice = logits.topk(1, dim=-1).indices
        share = torch.bincount(choice.flatten(), minlength=4).float() / choice.numel()
        return load_balancing_loss(logits, choice, torch.tensor([0]), 1), float(share.max())

    initial_loss, initial_share = loss_and_top_share()
    for _ in range(200):
        optimizer.zero_grad()
        loss, _ = loss_and_top_share()
        loss.backward()
        optimizer.step()
    final_loss, final_share = loss_and_top_share()
    assert initial_share > 0.9
    assert final_loss < initial_loss - 0.5
    assert final_share < 0.6


def test_balance_loss_has_a_gradient_wrt_router_weights() -> None:
    module = make_experts(2, 4, 2)
    x, down = inputs()
    group_ids = torch.tensor([0, 1, 0, 1])
    _, routing = module(x, down, group_ids)
    aux = load_balancing_loss(routing.logits, routing.top_experts, group_ids, 2)
    (grad,) = torch.autograd.grad(aux, module.router, retain_graph=True)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 1e-4
    # The reference code's loss (softmax over the selected top-k logits, averaged) is constant.
    top_weights = torch.softmax(routing.logits.topk(2, dim=-1).values, dim=-1)
    reference_loss = top_weights.sum(dim=-1).mean()
    (reference_grad,) = torch.autograd.grad(reference_loss, module.router)
    assert reference_grad.abs().max() < 1e-6


def test_balance_loss_is_computed_within_each_group_and_ignores_padding() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 4, generator=generator)
    choice = logits.topk(2, dim=-1).indices
    group_ids = torch.tensor([0, 1, 0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    joint = load_balancing_loss(logits, choice, group_ids, 2, mask)
    group0 = load_balancing_loss(
        torch.cat([logits[0, :3], logits[2, :4]])[None], torch.cat([choice[0, :3], choice[2, :4]])[None],
        torch.tensor([0]), 1,
    )
    group1 = load_balancing_loss(logits[1:2], choice[1:2], torch.tensor([0]), 1)
    torch.testing.assert_close(joint, (group0 + group1) / 2)


def test_experts_kept_in_float32_accept_bfloat16_activations() -> None:
    module = make_experts(2, 4, 2)
    x, down = inputs()
    group_ids = torch.tensor([0, 1, 1, 0])
    out, _ = module(x.bfloat16(), down.bfloat16(), group_ids)
    assert out.dtype == torch.bfloat16
    expected, _ = module(x.bfloat16().float(), down.bfloat16().float(), group_ids)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(("seq_len", "one_token_path"), ROW_SHAPES, indirect=["one_token_path"])
@pytest.mark.parametrize(("groups", "experts", "top_k"), LAYOUTS)
def test_float32_experts_under_bfloat16_autocast_match_the_reference(
    groups: int, experts: int, top_k: int, seq_len: int, one_token_path: str
) -> None:
    """The QLoRA setting: float32 experts, Trainer bf16=True, so matmuls run under bf16 autocast."""
    module = make_experts(groups, experts, top_k)
    group_ids = torch.arange(4) % groups
    batched = forward_backward(module, lambda a, b: module(a, b, group_ids)[0], bf16_autocast=True, seq_len=seq_len)
    reference = forward_backward(
        module, lambda a, b: reference_expert_forward(module, a, b, group_ids), bf16_autocast=True, seq_len=seq_len
    )
    assert all(p.dtype == torch.float32 for p in module.parameters())
    for got, expected in zip(batched[:3], reference[:3]):
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)
    for name, grad in batched[3].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference[3][name], atol=0.05, rtol=0.05, msg=f"gradient of {name}")


def test_one_token_rows_give_the_gathered_result_with_ac_feature_weights() -> None:
    """The AC router scales each token's router input: both decoding paths must apply it the same way."""
    module = make_experts(3, 4, 2)
    x, down = inputs(batch=7, seq_len=1)
    feature_weights = torch.rand(7, 1, HIDDEN, generator=torch.Generator().manual_seed(5)) * 2
    group_ids = torch.tensor([2, 0, 1, 1, 2, 0, 2])
    with torch.no_grad():
        gathered, gathered_routing = module._gathered(x, down, group_ids, feature_weights)
        all_groups, all_groups_routing = module._one_token_rows(x, down, group_ids, feature_weights)
        unweighted, _ = module._one_token_rows(x, down, group_ids, None)
    torch.testing.assert_close(all_groups, gathered)
    torch.testing.assert_close(all_groups_routing.logits, gathered_routing.logits)
    assert torch.equal(all_groups_routing.top_experts, gathered_routing.top_experts)
    assert not torch.allclose(unweighted, all_groups)  # the weights took effect
