"""The MoCE block: a decoder MLP wrapped with routed adapter experts, and the per-forward routing context
the model hands to every block (the sequence's group, token mask, balance-loss request, AC router state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moce_model.model.ac_router import adaptive_clustering_token_weights
from moce_model.model.balance import AuxLossInjector, AuxLossRequest, balance_loss
from moce_model.model.experts import (
    REQUIRED_MLP_PROJECTIONS,
    AdapterExperts,
    GroupMix,
    Routing,
)


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
        self, base_mlp: nn.Module, experts: AdapterExperts, context: RoutingContext, layer_index: int, num_layers: int,
        ac_start_layer: int = 1, ac_statistics: str = "sequence",
    ) -> None:
        super().__init__()
        self.base_mlp = base_mlp
        self.moce_experts = experts
        self.num_groups = experts.num_groups
        self.experts_per_group = experts.experts_per_group
        self.layer_index = layer_index
        self.routing_context = context
        self.num_layers = num_layers
        # AC router: blocks before `ac_start_layer` route with the plain router (they only record assignments).
        self.ac_start_layer = ac_start_layer
        self.ac_statistics = ac_statistics
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
        self.register_buffer("before_ac_start", torch.zeros((), dtype=torch.bool, device=device), persistent=False)
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
        self.before_ac_start.fill_(self.layer_index < self.ac_start_layer)

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
            feature_weights = self._ac_feature_weights(x, slots, token_mask, context.group_ids)
            if mix is not None:
                mixed_feature_weights = self._ac_feature_weights(
                    x.index_select(0, mix.rows), context.mixed_top_expert_slots,
                    None if token_mask is None else token_mask.index_select(0, mix.rows), mix.groups,
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
        self, x: torch.Tensor, slots: torch.Tensor, token_mask: torch.Tensor | None, group_ids: torch.Tensor
    ) -> torch.Tensor:
        """The AC router's feature weights of the tokens of `x`, from the previous block's row of `slots`."""
        previous_top_expert = slots.index_select(0, self.previous_top_expert_slot).squeeze(0)
        feature_weights = adaptive_clustering_token_weights(
            x, previous_top_expert, token_mask, self.experts_per_group, self.ac_statistics, group_ids, self.num_groups
        )
        # The blocks before `ac_start_layer` route with the plain router (the first has no previous assignments;
        # the reference scripts also keep the second plain). A tensor condition, not `layer_index < start`:
        # torch.compile treats int attributes as constants, so regionally compiled layers would recompile per
        # layer (the weights computed there, from an unused or plain block's row, are discarded).
        return torch.where(self.before_ac_start, torch.ones_like(feature_weights), feature_weights)

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
