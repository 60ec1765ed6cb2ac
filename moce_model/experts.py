"""Routed parallel-adapter experts wrapped around an existing decoder MLP block.

Block output (PESC / MoCE): ``down + sum_{i in top-k} w_i * s * up_i(GELU(down_i(dropout(down))))`` with
``down = mlp(x)``, router input ``x``, ``w`` = softmax over the selected top-k logits only. The experts are
split into groups; every token of a sequence uses the group of that sequence (its cluster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

REQUIRED_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# One-token rows (decoding) run every group's experts when there are at least this many rows per group. Bytes
# moved alone would switch at 2 rows for 4 groups (see `AdapterExperts._one_token_rows`); on the 2-core CPU the
# gathered path was faster up to 4 rows of 4 groups (by 11-29%), even or slower at 8, and at 16 1.2x (SmolLM2
# shape) and 2.5-2.7x (LLaMA-2-7B shape) slower (`bench.moe_layer --decode-only`, README). Not yet measured on
# a GPU.
ALL_GROUPS_MIN_ROWS_PER_GROUP = 2


class AdapterExperts(nn.Module):
    """Routers and adapter experts of one MLP block, for all groups, stored stacked.

    `router` [G, E, H] (one router per group, absent when E == 1), `adapter_down` [G, H, E, r],
    `adapter_up` [G, E, r, H]. The layouts make `[G, H, E*r]` and `[G, E*r, H]` free views, so a group's
    experts run as one matmul.
    """

    def __init__(
        self,
        hidden_size: int,
        num_groups: int,
        experts_per_group: int,
        adapter_dim: int,
        top_k: int,
        scaling: float,
        dropout: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.adapter_dim = adapter_dim
        self.top_k = top_k
        self.scaling = scaling
        factory = {"device": device, "dtype": dtype}
        if experts_per_group > 1:
            self.router = nn.Parameter(torch.empty(num_groups, experts_per_group, hidden_size, **factory))
        else:
            self.register_parameter("router", None)
        self.adapter_down = nn.Parameter(
            torch.empty(num_groups, hidden_size, experts_per_group, adapter_dim, **factory)
        )
        self.adapter_up = nn.Parameter(torch.empty(num_groups, experts_per_group, adapter_dim, hidden_size, **factory))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Same bounds as nn.Linear's default init; `up` is zero so a fresh model equals its base model.
        bound = 1.0 / math.sqrt(self.hidden_size)
        if self.router is not None:
            nn.init.uniform_(self.router, -bound, bound)
        nn.init.uniform_(self.adapter_down, -bound, bound)
        nn.init.zeros_(self.adapter_up)

    def extra_repr(self) -> str:
        return (
            f"groups={self.num_groups}, experts_per_group={self.experts_per_group}, top_k={self.top_k}, "
            f"adapter_dim={self.adapter_dim}, scaling={self.scaling}"
        )

    def forward(
        self, x: torch.Tensor, down: torch.Tensor, group_ids: torch.Tensor,
        router_feature_weights: torch.Tensor | None = None, mix: "GroupMix | None" = None,
        mixed_feature_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, "Routing"]:
        """x, down: [B, T, H]; group_ids: [B] long. `router_feature_weights` [B, T, H] (AC router): each token's
        feature weights, applied to the router's input only. `mix`: the rows that also get a second group (soft
        assignment), their output the weighted sum of the block's outputs under both groups; token routing runs
        inside each group as usual (`mixed_feature_weights` [S, T, H]: the AC weights of those rows in their
        second group). Returns (block output [B, T, H], routing decisions)."""
        out_dtype = down.dtype
        # Experts may be kept in another precision than the (e.g. quantised) base model's activations. Under
        # autocast (Trainer bf16=True, as in QLoRA training) the matmuls run in the autocast dtype anyway, so
        # casting the activations up to the experts' float32 first would only add two copies.
        device_type = down.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = self.adapter_down.dtype
        x = x.to(compute_dtype)
        down = down.to(compute_dtype)
        out, routing = self._grouped(x, down, group_ids, router_feature_weights)
        if mix is not None:
            # Only the mixed rows run a second time, so a batch of hard rows costs what it did without the option,
            # and a hard row's output is the very tensor it would be without it.
            own = out.index_select(0, mix.rows)
            second, routing.mixed = self._grouped(
                x.index_select(0, mix.rows), down.index_select(0, mix.rows), mix.groups, mixed_feature_weights
            )
            weight = mix.weights.to(own.dtype).view(-1, 1, 1)
            out = out.index_copy(0, mix.rows, (1 - weight) * own + weight * second)
            routing.mix = mix
        return out.to(out_dtype), routing

    def _grouped(
        self, x: torch.Tensor, down: torch.Tensor, group_ids: torch.Tensor, router_feature_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, "Routing"]:
        """The block output of every row under its group in `group_ids`, in the compute dtype."""
        batch, seq_len, _ = down.shape
        # One token per row (a decoding step) moves weights, not FLOPs: see `_one_token_rows`.
        if seq_len == 1 and batch >= ALL_GROUPS_MIN_ROWS_PER_GROUP * self.num_groups:
            return self._one_token_rows(x, down, group_ids, router_feature_weights)
        return self._gathered(x, down, group_ids, router_feature_weights)

    @staticmethod
    def _router_input(x: torch.Tensor, router_feature_weights: torch.Tensor | None) -> torch.Tensor:
        if router_feature_weights is None:
            return x
        # AC router: score the token in its previous expert's transformed space, x M_k (M_k diagonal).
        return x * router_feature_weights.to(x.dtype)

    def _top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 probabilities over the group's E experts, selected experts [..., k], weights [..., E] in the
        logits' dtype: the selected experts' renormalised probabilities, 0 for the others)."""
        # One float32 softmax over all E logits serves both the balance loss and the top-k weights: the
        # softmax over the selected logits alone equals the selected probabilities renormalised.
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        top_weights = (top_probs / top_probs.sum(dim=-1, keepdim=True)).to(logits.dtype)
        # Unselected experts get weight 0, so their outputs and gradients vanish exactly.
        return probs, top_experts, torch.zeros_like(logits).scatter(-1, top_experts, top_weights)

    def _gathered(
        self, x: torch.Tensor, down: torch.Tensor, group_ids: torch.Tensor, router_feature_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, "Routing"]:
        """`_grouped` with each row's group weights gathered: one batched matmul over the rows."""
        batch, seq_len, hidden = down.shape
        experts, rank = self.experts_per_group, self.adapter_dim
        if self.router is not None:
            router_input = self._router_input(x, router_feature_weights)
            logits = torch.bmm(router_input, self.router.index_select(0, group_ids).transpose(1, 2))  # [B, T, E]
            probs, top_experts, weights = self._top_k(logits)
        else:
            logits = probs = top_experts = weights = None
        # index_select, not indexing: its backward is an index_add, several times faster on CPU than the
        # accumulating index_put that indexing's backward runs.
        down_weights = self.adapter_down.view(self.num_groups, hidden, experts * rank).index_select(0, group_ids)
        up_weights = self.adapter_up.view(self.num_groups, experts * rank, hidden).index_select(0, group_ids)
        hidden_act = F.gelu(torch.bmm(self.dropout(down), down_weights))  # [B, T, E*r]
        if weights is not None:
            hidden_act = (hidden_act.view(batch, seq_len, experts, rank) * weights.unsqueeze(-1)).view(
                batch, seq_len, experts * rank
            )
        out = torch.baddbmm(down, hidden_act, up_weights, alpha=self.scaling)
        return out, Routing(group_ids=group_ids, logits=logits, probs=probs, top_experts=top_experts)

    def _one_token_rows(
        self, x: torch.Tensor, down: torch.Tensor, group_ids: torch.Tensor, router_feature_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, "Routing"]:
        """`_grouped` for rows of one token each (a decoding step): every group's experts over every row, the
        other groups' outputs masked to zero, instead of a copy of each row's group weights.

        Gathering copies a group's weights per row (3 x the group's bytes moved per row: read, write, read),
        while a one-token row needs only a few FLOPs per weight; computing all G groups reads each weight once
        per step whatever the batch (G x the group's bytes), at G x the adapter FLOPs, which one token per row
        makes negligible. So it moves fewer bytes once 3 x rows > G, and launches no gathers. Same result as
        `_gathered` up to float rounding (the masked groups add exact zeros)."""
        batch, _, hidden = down.shape
        groups, experts, rank = self.num_groups, self.experts_per_group, self.adapter_dim
        group_mask = (group_ids.unsqueeze(1) == torch.arange(groups, device=group_ids.device)).to(down.dtype)  # [B, G]
        if self.router is not None:
            router_input = self._router_input(x, router_feature_weights).reshape(batch, hidden)
            all_logits = router_input @ self.router.view(groups * experts, hidden).T  # [B, G*E]
            logits = all_logits.view(batch, groups, experts).gather(
                1, group_ids.view(batch, 1, 1).expand(batch, 1, experts)
            ).view(batch, 1, experts)
            probs, top_experts, weights = self._top_k(logits)
            row_weights = group_mask.unsqueeze(-1) * weights  # [B, G, E]: 0 outside the row's group and top-k
        else:
            logits = probs = top_experts = None
            row_weights = group_mask.unsqueeze(-1)  # [B, G, 1]
        # [G, B, H] @ [G, H, E*r]: every group's experts on every row; the expand is a view (stride 0 over G).
        hidden_act = F.gelu(torch.bmm(
            self.dropout(down).reshape(1, batch, hidden).expand(groups, batch, hidden),
            self.adapter_down.view(groups, hidden, experts * rank),
        ))
        hidden_act = hidden_act.view(groups, batch, experts, rank).transpose(0, 1) * row_weights.unsqueeze(-1)
        out = torch.addmm(
            down.reshape(batch, hidden), hidden_act.reshape(batch, groups * experts * rank),
            self.adapter_up.view(groups * experts * rank, hidden), alpha=self.scaling,
        )
        return out.view(batch, 1, hidden), Routing(group_ids=group_ids, logits=logits, probs=probs,
                                                   top_experts=top_experts)


# Constants of the AC router's reference implementation (Fsoft-AIC/Tight-Clusters-Make-Specialized-Experts,
# language-modeling/custom_gates.py, `COSAGate_Balance.compute_W_var` with `--use-var --mad`, the setting of its
# ACMoE training scripts): the dispersion floor before inverting, and the ceiling of a weight as a multiple of
# the mean weight (one nearly constant feature would otherwise dominate the routing score).
AC_DISPERSION_FLOOR = 1e-4
AC_WEIGHT_CEILING = 10.0


def adaptive_clustering_feature_weights(
    tokens: torch.Tensor, previous_top_expert: torch.Tensor, token_mask: torch.Tensor | None, experts_per_group: int
) -> torch.Tensor:
    """Per-expert feature weights of the Adaptive Clustering router (Nielsen et al., ICLR 2025, arXiv 2502.15315):
    the diagonal M_k of expert k, whose entries are inversely proportional to the dispersion of k's cluster along
    each feature, the optimal weights of the clustering objective with feature weights. Equation numbers are not
    cited here: the definitions below follow the authors' public code, which is what the paper's results ran.

    `tokens` [B, T, H]: this block's router inputs; `previous_top_expert` [B, T]: the expert (within the
    sequence's group) that the previous MoE block ranked first for each token, the cluster labels; `token_mask`
    [B, T] (1 real, 0 padding) or None. Returns float32 [B, E, H].

    As in the reference code: the dispersion s_kq of expert k along feature q is the mean absolute deviation of
    the tokens labelled k from their mean (more robust than the variance), m_kq = 1 / (s_kq + 1e-4), clipped at
    10x the mean weight, then each feature divided by its mean over the experts, so the weights say which expert
    is tight along a feature *relative to the others*. Differences, each for a reason:
      - Statistics per sequence, over its real tokens, instead of over every token of the micro-batch: a
        sequence then routes the same whatever it is batched with (evaluation batches by length, training by
        size), and padding never enters. The sequence's tokens share one expert group anyway.
      - Means (clip and normalisation) over the experts that hold tokens; an expert without tokens gets weight
        1 (no token carries its label, so it scales nobody: the reference gave it 1e4 before clipping, which
        raised the clip ceiling of every other expert).
    The statistics are computed from detached tokens (the reference runs them under no_grad): the gradient
    reaches the router and the tokens through x * m, not through the weights.
    """
    tokens = tokens.detach().to(torch.float32)
    experts = torch.arange(experts_per_group, device=tokens.device)
    assigned = (previous_top_expert.unsqueeze(-1) == experts).to(torch.float32)  # [B, T, E]
    members = assigned if token_mask is None else assigned * token_mask.to(torch.float32).unsqueeze(-1)
    counts = members.sum(dim=1).unsqueeze(-1)  # [B, E, 1]
    present = (counts > 0).to(torch.float32)
    per_member = counts.clamp(min=1.0)
    centres = torch.bmm(members.transpose(1, 2), tokens) / per_member  # [B, E, H]
    # Each token's distance to its own expert's centre: the one-hot product picks the centre exactly.
    deviations = (tokens - torch.bmm(assigned, centres)).abs()
    dispersion = torch.bmm(members.transpose(1, 2), deviations) / per_member  # [B, E, H]: mean absolute deviation
    weights = 1.0 / (dispersion + AC_DISPERSION_FLOOR)
    hidden = tokens.shape[-1]
    mean_weight = (weights * present).sum(dim=(1, 2)) / (present.sum(dim=(1, 2)) * hidden).clamp(min=1.0)  # [B]
    weights = torch.minimum(weights, AC_WEIGHT_CEILING * mean_weight.view(-1, 1, 1))
    feature_means = (weights * present).sum(dim=1, keepdim=True) / present.sum(dim=1, keepdim=True).clamp(min=1.0)
    return torch.where(present > 0, weights / feature_means.clamp(min=torch.finfo(torch.float32).tiny), 1.0)


def adaptive_clustering_token_weights(
    tokens: torch.Tensor, previous_top_expert: torch.Tensor, token_mask: torch.Tensor | None, experts_per_group: int
) -> torch.Tensor:
    """Each token's AC feature weights [B, T, H] float32: the row M_{k*} of its previous expert k* (the AC router
    scores x M_{k*} against every expert of the group)."""
    weights = adaptive_clustering_feature_weights(tokens, previous_top_expert, token_mask, experts_per_group)
    experts = torch.arange(experts_per_group, device=tokens.device)
    assigned = (previous_top_expert.unsqueeze(-1) == experts).to(torch.float32)
    return torch.bmm(assigned, weights)


@dataclass
class GroupMix:
    """The rows of a batch that a soft assignment gives a second expert group: `rows` [S] long (ascending, no
    repeats), their second group `groups` [S] long, and its weight `weights` [S] float32 in (0, 1]; the row's
    own group (its entry of the batch's group ids) gets 1 - weight. Rows not listed use their own group alone."""

    rows: torch.Tensor
    groups: torch.Tensor
    weights: torch.Tensor


@dataclass
class Routing:
    """Routing decisions of one block: router logits [B, T, E], their float32 softmax over the group's E
    experts, and the selected experts [B, T, k]; all None without a router. With a `mix`, `mixed` holds the
    same for the mixed rows in their second group ([S, T, ...])."""

    group_ids: torch.Tensor
    logits: torch.Tensor | None
    probs: torch.Tensor | None
    top_experts: torch.Tensor | None
    mix: GroupMix | None = None
    mixed: "Routing | None" = None


def reference_expert_forward(
    experts: AdapterExperts, x: torch.Tensor, down: torch.Tensor, group_ids: torch.Tensor
) -> torch.Tensor:
    """The reference code's semantics, kept for tests and benchmarks: a python loop over groups x experts
    with boolean masks on the flattened tokens (slow, host syncs on GPU)."""
    batch, seq_len, hidden = down.shape
    flat_x = x.reshape(-1, hidden)
    flat_down = down.reshape(-1, hidden)
    token_groups = group_ids.repeat_interleave(seq_len)
    out = torch.zeros_like(flat_down)
    for group in range(experts.num_groups):
        in_group = token_groups == group
        if not bool(in_group.any()):
            continue
        group_x = flat_x[in_group]
        group_down = flat_down[in_group]
        if experts.router is not None:
            logits = group_x @ experts.router[group].T
            top_logits, top_experts = logits.topk(experts.top_k, dim=-1)
            top_weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(down.dtype)
        else:
            top_experts = torch.zeros(group_x.shape[0], 1, dtype=torch.long, device=x.device)
            top_weights = torch.ones(group_x.shape[0], 1, dtype=down.dtype, device=x.device)
        group_out = torch.zeros_like(group_down)
        for expert in range(experts.experts_per_group):
            chosen = top_experts == expert
            rows = chosen.any(dim=-1)
            if not bool(rows.any()):
                continue
            weight = (top_weights * chosen).sum(dim=-1)[rows]
            adapter_in = experts.dropout(group_down[rows])
            adapter_out = F.gelu(adapter_in @ experts.adapter_down[group, :, expert]) @ experts.adapter_up[group, expert]
            # Under autocast the adapter matmuls may return another dtype than the activations.
            group_out[rows] = (group_out[rows] + weight[:, None] * experts.scaling * adapter_out).to(group_out.dtype)
        out[in_group] = group_out
    return (flat_down + out).view(batch, seq_len, hidden)


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


@dataclass
class RoutingContext:
    """Per-forward routing state shared by the model and its wrapped MLP blocks, read-only inside the blocks.

    The model sets the sequences' groups and token mask before calling the wrapped LM. It outlives the forward
    so that activation checkpointing's recomputation in backward sees the same groups.
    """

    group_ids: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    aux_request: AuxLossRequest | None = None
    record_expert_use: bool = False
    # AC router only: [blocks, B, T] long, row l = the top-1 expert of every token in block l (see MoCEMLP).
    top_expert_slots: torch.Tensor | None = None
    # The tokens that count in the expert-use statistics ([B, T], 1 = counted); None: every token.
    counted_tokens: torch.Tensor | None = None
    # While set (evaluation), each block also appends its per-sequence counts [B, G, E] of every forward here,
    # one list per layer: what the evaluator attributes to the prompts of the batch.
    per_sequence_counts: list[list[torch.Tensor]] | None = None
    # Soft assignment: the rows that also get a second group (None: every row has its group alone).
    group_mix: GroupMix | None = None
    # AC router with mixed rows: [blocks, S, T], the top-1 expert of each mixed row's tokens in its second group.
    mixed_top_expert_slots: torch.Tensor | None = None

    def begin(
        self, group_ids: torch.Tensor, token_mask: torch.Tensor | None, aux_request: AuxLossRequest | None = None,
        top_expert_slots: torch.Tensor | None = None, counted_tokens: torch.Tensor | None = None,
        group_mix: GroupMix | None = None, mixed_top_expert_slots: torch.Tensor | None = None,
    ) -> None:
        # No per-forward counter here: compiled decoding would recompile for every new value of an int.
        self.group_ids = group_ids
        self.token_mask = token_mask
        self.aux_request = aux_request
        self.top_expert_slots = top_expert_slots
        self.counted_tokens = counted_tokens if counted_tokens is not None else token_mask
        self.group_mix = group_mix
        self.mixed_top_expert_slots = mixed_top_expert_slots

    def aux_loss(self) -> torch.Tensor | None:
        """Mean balance loss over the blocks of the last forward, available once its backward has run."""
        request = self.aux_request
        if request is None or request.probe.grad is None:
            return None
        return request.probe.grad.mean()


class MoCEMLP(nn.Module):
    """Wraps an existing MLP block (kept as `base_mlp`, weights untouched) with routed adapter experts."""

    def __init__(
        self, base_mlp: nn.Module, experts: AdapterExperts, context: RoutingContext, layer_index: int, num_layers: int
    ) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.moce_experts = experts
        self.num_groups = experts.num_groups
        self.experts_per_group = experts.experts_per_group
        self.layer_index = layer_index
        self.routing_context = context
        self.num_layers = num_layers
        device = experts.adapter_up.device
        self.register_buffer(
            "expert_use_counts",
            torch.zeros(experts.num_groups, experts.experts_per_group, dtype=torch.long, device=device),
            persistent=False,
        )
        # A tensor, not the int: compiled blocks then share one graph instead of specialising on the layer.
        self.register_buffer(
            "probe_slot", torch.zeros(num_layers, dtype=torch.float32, device=device), persistent=False
        )
        # Rows of `RoutingContext.top_expert_slots` this block writes and reads (AC router), tensors for the
        # same reason.
        self.register_buffer("own_top_expert_slot", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer(
            "previous_top_expert_slot", torch.zeros(1, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer("is_first_block", torch.zeros((), dtype=torch.bool, device=device), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fill the non-persistent buffers. `from_pretrained` builds the model on the meta device and materialises
        buffers that are not in the checkpoint uninitialised, so it calls this after loading."""
        self.expert_use_counts.zero_()
        layers = torch.arange(self.num_layers, device=self.probe_slot.device)
        self.probe_slot.copy_((layers == self.layer_index).to(torch.float32))
        self.own_top_expert_slot.fill_(self.layer_index)
        self.previous_top_expert_slot.fill_(max(self.layer_index - 1, 0))
        self.is_first_block.fill_(self.layer_index == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.routing_context
        down = self.base_mlp(x)
        if context.group_ids is None:
            raise RuntimeError(
                f"MoCEMLP of layer {self.layer_index} called without routing state: call the MoCE model, "
                "not its inner decoder"
            )
        slots = context.top_expert_slots
        mix = context.group_mix
        feature_weights = mixed_feature_weights = None
        if slots is not None:
            token_mask = self._mask_of(context.token_mask, x.shape[1])
            feature_weights = self._ac_feature_weights(x, slots, token_mask)
            if mix is not None:
                mixed_feature_weights = self._ac_feature_weights(
                    x.index_select(0, mix.rows), context.mixed_top_expert_slots,
                    None if token_mask is None else token_mask.index_select(0, mix.rows),
                )
        out, routing = self.moce_experts(x, down, context.group_ids, feature_weights, mix, mixed_feature_weights)
        if slots is not None:
            # How the previous block's assignments reach the next block. HF's decoder loop passes only the hidden
            # states from layer to layer, so a block cannot return them without forking the model's forward; and
            # recomputing them inside the next block would need the previous block's input. So every block writes
            # its top-1 experts into its own row of a tensor the model allocates per forward, and reads the
            # previous row. This is a tensor write, not Python state: torch.compile functionalises it like a
            # BatchNorm statistics update (fullgraph holds), and it is idempotent under activation checkpointing:
            # the recomputation writes the same values into the same row and reads a row that nothing after the
            # first forward changes (recomputation runs from the last block back, each rewriting identical
            # values). index_select above copies the row, so no saved tensor aliases the buffer that later
            # blocks write into. Mixed rows keep their second group's assignments in a tensor of their own.
            slots.index_copy_(0, self.own_top_expert_slot, routing.top_experts[..., 0].unsqueeze(0))
            if mix is not None:
                context.mixed_top_expert_slots.index_copy_(
                    0, self.own_top_expert_slot, routing.mixed.top_experts[..., 0].unsqueeze(0)
                )
        request = context.aux_request
        if request is not None and routing.probs is not None and torch.is_grad_enabled():
            if routing.mixed is not None:
                aux = balance_loss(routing.probs, routing.top_experts, request.statistics,
                                   routing.mixed.probs, routing.mixed.top_experts)
            else:
                aux = balance_loss(routing.probs, routing.top_experts, request.statistics)
            out = AuxLossInjector.apply(out, aux, request.gradient_scale, request.probe, self.probe_slot)
        if context.record_expert_use and not self.training:
            # Evaluation only: in training, activation checkpointing re-runs the forward and would count twice.
            token_mask = context.counted_tokens
            if token_mask is not None and token_mask.shape[1] != x.shape[1]:
                token_mask = None
            self._record(routing, token_mask, x.shape[1])
        return out

    def _ac_feature_weights(
        self, x: torch.Tensor, slots: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The AC router's feature weights of the tokens of `x`, from the previous block's row of `slots`."""
        previous_top_expert = slots.index_select(0, self.previous_top_expert_slot).squeeze(0)
        feature_weights = adaptive_clustering_token_weights(x, previous_top_expert, token_mask, self.experts_per_group)
        # The first MoE block has no previous assignments and routes with the plain router, as in the paper.
        # A tensor condition, not `layer_index > 0`: torch.compile treats int attributes as constants, so
        # regionally compiled layers would recompile per layer (its weights, computed from an unused row,
        # are discarded).
        return torch.where(self.is_first_block, torch.ones_like(feature_weights), feature_weights)

    @staticmethod
    def _mask_of(token_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
        if token_mask is not None and token_mask.shape[1] != seq_len:
            return None
        return token_mask

    def _sequence_counts(self, top_experts: torch.Tensor | None, token_mask: torch.Tensor | None, rows: int,
                         seq_len: int) -> torch.Tensor:
        """[rows, E] long: each sequence's (token, expert) assignments (its tokens, E = 1, without a router)."""
        if top_experts is None:
            if token_mask is not None:
                return token_mask.sum(dim=1).to(torch.long).unsqueeze(1)
            return torch.full((rows, 1), seq_len, dtype=torch.long, device=self.expert_use_counts.device)
        experts = torch.arange(self.experts_per_group, device=top_experts.device)
        selected = (top_experts.unsqueeze(-1) == experts).sum(dim=2)  # [B, T, E]
        if token_mask is not None:
            selected = selected * token_mask.to(selected.dtype).unsqueeze(-1)
        return selected.sum(dim=1)

    @torch.no_grad()
    def _record(self, routing: Routing, token_mask: torch.Tensor | None, seq_len: int) -> None:
        # A mixed row's tokens count in both of its groups: each group's experts did process them.
        rows = routing.group_ids.shape[0]
        per_sequence = self._sequence_counts(routing.top_experts, token_mask, rows, seq_len)
        self.expert_use_counts.index_add_(0, routing.group_ids, per_sequence)
        mix, mixed = routing.mix, None
        if mix is not None:
            mixed_mask = None if token_mask is None else token_mask.index_select(0, mix.rows)
            mixed = self._sequence_counts(routing.mixed.top_experts, mixed_mask, mix.rows.shape[0], seq_len)
            self.expert_use_counts.index_add_(0, mix.groups, mixed)
        if self.routing_context.per_sequence_counts is not None:
            by_group = per_sequence.new_zeros(rows, self.num_groups, per_sequence.shape[1])
            sequences = torch.arange(rows, device=per_sequence.device)
            by_group.index_put_((sequences, routing.group_ids), per_sequence)
            if mixed is not None:
                by_group.index_put_((mix.rows, mix.groups), mixed, accumulate=True)
            # Kept on the device: a copy to the host per block and step would sync the GPU every time.
            self.routing_context.per_sequence_counts[self.layer_index].append(by_group)


def check_mlp(mlp: nn.Module, module_name: str) -> None:
    missing = [name for name in REQUIRED_MLP_PROJECTIONS if not isinstance(getattr(mlp, name, None), nn.Linear)]
    if missing:
        raise ValueError(
            f"module '{module_name}' ({type(mlp).__name__}) lacks the Linear projections {missing}: MoCE wraps MLP "
            f"blocks with {REQUIRED_MLP_PROJECTIONS} (Llama, Mistral, Qwen2, SmolLM)"
        )
