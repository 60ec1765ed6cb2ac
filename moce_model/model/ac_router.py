"""Adaptive-clustering (AC) token router: per-feature weights from the dispersion of the tokens that the
previous MoE block sent to each expert, used to rescale the router's input."""

from __future__ import annotations

import torch

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
