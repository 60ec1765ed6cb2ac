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

# One-token rows (decoding) run every group's experts when there are at least this many rows per group: where the
# CPU measured the all-groups path even or ahead of gathering each row's group (docs/benchmarks.md, decoding paths).
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
        normalise_router: bool = False,
    ) -> None:
        super().__init__()
        # Score tokens against the router's rows scaled to unit norm (the AC router's `normalised_experts`
        # scoring: the reference scripts' unit expert embeddings), instead of the rows as they are.
        self.normalise_router = normalise_router
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

    def _scoring_router(self) -> torch.Tensor:
        """The router rows tokens are scored against: as stored, or each scaled to unit norm (eps as the
        reference's F.normalize) when `normalise_router`."""
        if not self.normalise_router:
            return self.router
        return F.normalize(self.router, p=2.0, dim=-1, eps=1e-4)

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
            logits = torch.bmm(router_input, self._scoring_router().index_select(0, group_ids).transpose(1, 2))  # [B, T, E]
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
            all_logits = router_input @ self._scoring_router().reshape(groups * experts, hidden).T  # [B, G*E]
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
