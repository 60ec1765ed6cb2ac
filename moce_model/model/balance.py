"""The per-group load-balancing loss of the token routers and the autograd hook that adds it to the LM loss
without an extra output (`AuxLossInjector`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moce_model.model.experts import GroupMix


@dataclass
class BalanceLossStatistics:
    """What the balance loss of every block of one forward shares: built once per forward, not per layer.

    `token_weights` [B, 1, T] (1 for real tokens, 0 for padding), `group_coefficients` [G] with
    ``E / (k * n_g^2 * G_present)`` for the groups present (0 for the others; n_g = real tokens of group g), so
    that a block's loss is a handful of kernels (see `balance_loss`).

    With a soft assignment (`mix`), a mixed row's tokens count in both of its groups, in each with the weight
    the row's output gives that group: `token_weights` holds 1 - w for its own group and `mixed_token_weights`
    [S, 1, T] w for its second (`mixed_group_onehot` [S, G]), so n_g is a weighted token count. A group's
    router is then balanced over the tokens in the proportion it shapes their output; with every weight 1 this
    is the hard assignment's loss.
    """

    token_weights: torch.Tensor
    group_onehot: torch.Tensor
    group_coefficients: torch.Tensor
    mixed_token_weights: torch.Tensor | None = None
    mixed_group_onehot: torch.Tensor | None = None

    @classmethod
    def build(
        cls, group_ids: torch.Tensor, token_mask: torch.Tensor | None, seq_len: int, num_groups: int,
        experts_per_group: int, top_k: int, mix: GroupMix | None = None,
    ) -> "BalanceLossStatistics":
        batch = group_ids.shape[0]
        if token_mask is None:
            mask = torch.ones(batch, seq_len, dtype=torch.float32, device=group_ids.device)
        else:
            mask = token_mask.to(torch.float32)
        groups = torch.arange(num_groups, device=group_ids.device)
        # A comparison instead of F.one_hot, which validates its input with a host sync on GPU.
        onehot = (group_ids.unsqueeze(1) == groups).to(torch.float32)
        mixed_weights = mixed_onehot = None
        if mix is not None:
            second = mix.weights.to(torch.float32)
            mixed_weights = mask.index_select(0, mix.rows) * second.unsqueeze(1)
            mixed_onehot = (mix.groups.unsqueeze(1) == groups).to(torch.float32)
            own = torch.ones(batch, dtype=torch.float32, device=mask.device).index_copy(0, mix.rows, 1 - second)
            mask = mask * own.unsqueeze(1)
        group_tokens = onehot.T @ mask.sum(dim=1)  # [G]
        if mix is not None:
            group_tokens = group_tokens + mixed_onehot.T @ mixed_weights.sum(dim=1)
        present = (group_tokens > 0).to(torch.float32)
        coefficients = experts_per_group * present / (top_k * group_tokens.clamp(min=1.0).square())
        coefficients = coefficients / present.sum().clamp(min=1.0)
        return cls(
            token_weights=mask.unsqueeze(1), group_onehot=onehot, group_coefficients=coefficients,
            mixed_token_weights=None if mixed_weights is None else mixed_weights.unsqueeze(1),
            mixed_group_onehot=mixed_onehot,
        )


def _per_group_sums(probs: torch.Tensor, top_experts: torch.Tensor, token_weights: torch.Tensor,
                    group_onehot: torch.Tensor) -> torch.Tensor:
    """[G, 2E]: each group's weighted sums of router probabilities and of top-k selections."""
    selected = torch.zeros_like(probs).scatter(-1, top_experts, 1.0)
    # Per-sequence sums of probabilities and selections over real tokens, in one batched matmul.
    per_sequence = torch.bmm(token_weights, torch.cat([probs, selected], dim=-1)).squeeze(1)  # [B, 2E]
    return group_onehot.T @ per_sequence


def balance_loss(
    probs: torch.Tensor, top_experts: torch.Tensor, statistics: BalanceLossStatistics,
    mixed_probs: torch.Tensor | None = None, mixed_top_experts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral balance loss computed inside each group, averaged over the groups present.

    Per group: ``E * sum_e f_e * P_e`` with f_e the share of top-k assignments sent to expert e (no gradient)
    and P_e the mean router probability of e, softmax over all E logits of the group (the gradient path).
    Equals 1 at uniform routing. Padding tokens are excluded. `probs` [B, T, E] float32, `top_experts` [B, T, k];
    with a soft assignment also the mixed rows' `mixed_probs` [S, T, E] and `mixed_top_experts` [S, T, k] in
    their second group, weighted as `BalanceLossStatistics` says.
    """
    experts = probs.shape[-1]
    if (statistics.mixed_token_weights is None) != (mixed_probs is None):
        raise ValueError("the statistics and the routing disagree on whether rows are mixed: build the statistics "
                         "with the forward's GroupMix and pass the mixed rows' probabilities")
    per_group = _per_group_sums(probs, top_experts, statistics.token_weights, statistics.group_onehot)  # [G, 2E]
    if mixed_probs is not None:
        per_group = per_group + _per_group_sums(
            mixed_probs, mixed_top_experts, statistics.mixed_token_weights, statistics.mixed_group_onehot
        )
    return (per_group[:, :experts] * per_group[:, experts:]).sum(dim=-1) @ statistics.group_coefficients


def load_balancing_loss(
    logits: torch.Tensor,
    top_experts: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    token_mask: torch.Tensor | None = None,
    mix: GroupMix | None = None,
    mixed_logits: torch.Tensor | None = None,
    mixed_top_experts: torch.Tensor | None = None,
) -> torch.Tensor:
    """`balance_loss` from router logits [B, T, E] alone (statistics built on the spot); with a soft assignment
    also the mixed rows' logits [S, T, E] and selections in their second group."""
    batch, seq_len, experts = logits.shape
    statistics = BalanceLossStatistics.build(
        group_ids, token_mask, seq_len, num_groups, experts, top_experts.shape[-1], mix
    )
    mixed_probs = None if mixed_logits is None else torch.softmax(mixed_logits, dim=-1, dtype=torch.float32)
    return balance_loss(torch.softmax(logits, dim=-1, dtype=torch.float32), top_experts, statistics,
                        mixed_probs, mixed_top_experts)


class AuxLossInjector(torch.autograd.Function):
    """Identity on a block's output whose backward also sends `gradient_scale` into the block's balance loss.

    The loss so reaches the optimiser through the autograd graph, with no write to shared state in the forward
    (what activation checkpointing and `torch.compile(fullgraph=True)` require); Megatron-Core's
    `MoEAuxLossAutoScaler` does the same. The loss *value* leaves through the gradient of `probe`: backward
    writes it into the block's slot (`slot` is one-hot over the blocks), read after backward for logging.
    """

    @staticmethod
    def forward(ctx, output, aux_loss, gradient_scale, probe, slot):
        ctx.save_for_backward(aux_loss, gradient_scale, slot)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        aux_loss, gradient_scale, slot = ctx.saved_tensors
        aux_grad = gradient_scale.to(aux_loss.dtype).expand_as(aux_loss)
        return grad_output, aux_grad, None, slot * aux_loss.detach(), None


@dataclass
class AuxLossRequest:
    """Per-forward instruction to the blocks: add `gradient_scale` * their balance loss to the objective.

    `gradient_scale` is a scalar tensor (aux_loss_coef / blocks * the micro-batch's share of the optimiser
    step); `probe` [blocks] is a fresh leaf whose `.grad` holds each block's loss value after backward.
    """

    statistics: BalanceLossStatistics
    gradient_scale: torch.Tensor
    probe: torch.Tensor
