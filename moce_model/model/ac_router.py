"""Adaptive-clustering (AC) token router: per-feature weights from the dispersion of the tokens that the
previous MoE block sent to each expert, used to rescale the router's input."""

from __future__ import annotations

import torch

# Constants of the AC router's reference implementation (Fsoft-AIC/Tight-Clusters-Make-Specialized-Experts,
# language-modeling/custom_gates.py, `COSAGate_Balance.compute_W_var` with `--use-var --mad`, the setting of its
# ACMoE training scripts; those scripts score x M against unit-norm expert embeddings, `ac_scoring:
# normalised_experts`, and start AC at the third MoE block, `ac_start_layer: 2`): the dispersion floor before inverting, and the ceiling of a weight as a multiple of
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
      - Statistics per sequence (by default; `statistics: batch` below takes the reference's), over its
        real tokens, instead of over every token of the micro-batch: a
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
    per_member = counts.clamp(min=1.0)
    centres = torch.bmm(members.transpose(1, 2), tokens) / per_member  # [B, E, H]
    # Each token's distance to its own expert's centre: the one-hot product picks the centre exactly.
    deviations = (tokens - torch.bmm(assigned, centres)).abs()
    dispersion = torch.bmm(members.transpose(1, 2), deviations) / per_member  # [B, E, H]: mean absolute deviation
    return _weights_from_dispersion(dispersion, (counts > 0).to(torch.float32))


def _weights_from_dispersion(dispersion: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[N, E, H] weights from the dispersions [N, E, H] of N independent sets of E experts (`present` [N, E, 1]:
    1 where the expert holds tokens): invert, clip at AC_WEIGHT_CEILING x the mean weight, normalise each
    feature to mean 1 over the experts present; 1 for an expert without tokens."""
    weights = 1.0 / (dispersion + AC_DISPERSION_FLOOR)
    hidden = dispersion.shape[-1]
    mean_weight = (weights * present).sum(dim=(1, 2)) / (present.sum(dim=(1, 2)) * hidden).clamp(min=1.0)  # [N]
    weights = torch.minimum(weights, AC_WEIGHT_CEILING * mean_weight.view(-1, 1, 1))
    feature_means = (weights * present).sum(dim=1, keepdim=True) / present.sum(dim=1, keepdim=True).clamp(min=1.0)
    return torch.where(present > 0, weights / feature_means.clamp(min=torch.finfo(torch.float32).tiny), 1.0)


def batch_adaptive_clustering_feature_weights(
    tokens: torch.Tensor, previous_top_expert: torch.Tensor, token_mask: torch.Tensor | None,
    experts_per_group: int, group_ids: torch.Tensor, num_groups: int,
) -> torch.Tensor:
    """The AC weights with the reference code's statistics: over every real token of the micro-batch that the
    previous block sent to the expert, not per sequence. In MoCE an expert belongs to one group, so the
    statistics are gathered per (group, expert) over the rows of that group, and clipped and normalised over
    the group's experts (the experts a token of the group competes between). Returns float32 [B, E, H], each
    row the weights of its group (rows of one group share them), so `adaptive_clustering_token_weights` can
    pick each token's row as in the per-sequence case. A sequence's routing then depends on what it is batched
    with, as in the reference code."""
    tokens = tokens.detach().to(torch.float32)
    batch, seq_len, hidden = tokens.shape
    slots = num_groups * experts_per_group
    labels = (group_ids.view(batch, 1) * experts_per_group + previous_top_expert).reshape(-1)  # [B*T]
    members = (labels.unsqueeze(-1) == torch.arange(slots, device=tokens.device)).to(torch.float32)  # [B*T, G*E]
    if token_mask is not None:
        members = members * token_mask.to(torch.float32).reshape(-1, 1)
    flat = tokens.reshape(batch * seq_len, hidden)
    counts = members.sum(dim=0).unsqueeze(-1)  # [G*E, 1]
    per_member = counts.clamp(min=1.0)
    centres = members.T @ flat / per_member  # [G*E, H]
    deviations = (flat - centres.index_select(0, labels)).abs()
    dispersion = members.T @ deviations / per_member
    weights = _weights_from_dispersion(
        dispersion.view(num_groups, experts_per_group, hidden),
        (counts > 0).to(torch.float32).view(num_groups, experts_per_group, 1),
    )
    return weights.index_select(0, group_ids)


def adaptive_clustering_token_weights(
    tokens: torch.Tensor, previous_top_expert: torch.Tensor, token_mask: torch.Tensor | None, experts_per_group: int,
    statistics: str = "sequence", group_ids: torch.Tensor | None = None, num_groups: int = 1,
) -> torch.Tensor:
    """Each token's AC feature weights [B, T, H] float32: the row M_{k*} of its previous expert k* (the AC router
    scores x M_{k*} against every expert of the group). `statistics`: `sequence` (this project's default, see
    `adaptive_clustering_feature_weights`) or `batch` (the reference code's, over the micro-batch per group;
    needs `group_ids` [B] and `num_groups`)."""
    if statistics == "batch":
        if group_ids is None:
            raise ValueError("AC statistics over the batch need each row's group (group_ids)")
        weights = batch_adaptive_clustering_feature_weights(
            tokens, previous_top_expert, token_mask, experts_per_group, group_ids, num_groups)
    elif statistics == "sequence":
        weights = adaptive_clustering_feature_weights(tokens, previous_top_expert, token_mask, experts_per_group)
    else:
        raise ValueError(f"AC statistics must be 'sequence' or 'batch', got {statistics!r}")
    experts = torch.arange(experts_per_group, device=tokens.device)
    assigned = (previous_top_expert.unsqueeze(-1) == experts).to(torch.float32)
    return torch.bmm(assigned, weights)
