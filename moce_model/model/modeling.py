"""`MoCEForCausalLM`: any HF causal LM with gate/up/down MLPs, plus cluster-grouped routed adapter experts.

`import moce_model` registers the `moce` model type with `AutoConfig` and `AutoModelForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a MoCE directory without `trust_remote_code`. A merged
directory also carries this module's code (`moce_model.model.remote_code`) for interpreters without the project.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from moce_model.clustering.router import CENTROIDS_FILE, PromptRouter
from moce_model.data.prompt_format import IGNORE_INDEX
from moce_model.model.balance import AuxLossRequest, BalanceLossStatistics
from moce_model.model.config import MoCEConfig
from moce_model.model.experts import AdapterExperts, GroupMix
from moce_model.model.layer import MoCEMLP, RoutingContext, check_mlp
from moce_model.variants import GroupChoice

# Large prime for the per-sequence hash of `random_group` (products stay inside int64).
_HASH_PRIME = 2_147_483_629


@dataclass
class MoCECausalLMOutput(CausalLMOutputWithPast):
    """`loss` is the LM loss. The load-balancing loss does not appear in it: in training each block feeds its
    gradient through the autograd graph (`AuxLossInjector`), and `MoCEForCausalLM.last_aux_loss()` reads its
    value after backward."""


def random_group_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_groups: int,
    seed: int,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic pseudo-random group per sequence from its prompt tokens (independent of padding side).

    `prompt_mask` [B, T] marks the prompt; without it every non-padding token counts. A row whose prompt mask
    is empty hashes all its non-padding tokens.
    """
    if attention_mask is None:
        mask = torch.ones_like(input_ids)
    else:
        mask = attention_mask[:, -input_ids.shape[1] :].to(input_ids.dtype)
    if prompt_mask is not None:
        if prompt_mask.shape != input_ids.shape:
            raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        prompt = mask * prompt_mask.to(mask.dtype)
        mask = torch.where(prompt.sum(dim=1, keepdim=True) > 0, prompt, mask)
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    position_weight = (position * 2_654_435_761 + 97 + seed) % _HASH_PRIME + 1
    token_hash = ((input_ids + 1) % _HASH_PRIME) * position_weight % _HASH_PRIME
    sequence_hash = (token_hash * mask).sum(dim=1) % _HASH_PRIME
    mixed = (sequence_hash * 48_271 + seed * 16_807 + 11) % _HASH_PRIME
    return mixed % num_groups


class MoCEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoCEConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MoCEConfig, base_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.wrapped_config)
        self.base = base_model
        self.routing_context = RoutingContext()
        self._prompt_groups: tuple[torch.Tensor, GroupMix | None] | None = None
        self._prompt_router_dir: Path | None = None
        self._loaded_prompt_router = None
        self._checked_group_tensor: torch.Tensor | None = None
        # The last (cluster_ids, cluster_weights) pair given and the routes made of it: generation passes the same
        # tensors at every step, and reading the weights on the host once is enough.
        self._checked_mix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, GroupMix | None] | None = None
        # Token id that marks a finished sequence's filler in batched decoding; not counted in expert use.
        self._expert_use_filler_token_id: int | None = None
        self._inject_experts()
        self.post_init()

    @classmethod
    def from_base(cls, base_model: PreTrainedModel, moce_config: MoCEConfig) -> "MoCEForCausalLM":
        """Wrap an already loaded HF causal LM in place (its weights are kept, not copied)."""
        moce_config.base_config = base_model.config.to_dict()
        moce_config.__dict__.pop("wrapped_config", None)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            setattr(moce_config, key, getattr(base_model.config, key, None))
        # post_init() initialises every module not flagged as loaded; modules swapped in after loading (e.g. the
        # nn.Linear layers that dequantize() puts in place of NF4 ones) would otherwise get random weights.
        for module in base_model.modules():
            module._is_hf_initialized = True
        model = cls(moce_config, base_model=base_model)
        if getattr(base_model, "generation_config", None) is not None:
            model.generation_config = GenerationConfig.from_dict(base_model.generation_config.to_dict())
        return model

    def _inject_experts(self) -> None:
        config = self.config
        holders = [(name, module) for name, module in self.base.named_modules() if isinstance(getattr(module, "mlp", None), nn.Module)]
        if not holders:
            raise ValueError(f"{type(self.base).__name__} has no decoder layer with an `mlp` module to wrap")
        num_layers = len(holders)
        for layer_index, (name, layer) in enumerate(holders):
            mlp = layer.mlp
            if isinstance(mlp, MoCEMLP):
                raise ValueError(f"module '{name}.mlp' already holds MoCE experts")
            check_mlp(mlp, f"{name}.mlp")
            weight = mlp.down_proj.weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            experts = AdapterExperts(
                hidden_size=mlp.down_proj.out_features,
                num_groups=config.num_groups,
                experts_per_group=config.experts_per_group,
                adapter_dim=config.adapter_dim,
                top_k=config.router_top_k,
                scaling=config.adapter_scaling,
                dropout=config.adapter_dropout,
                device=weight.device,
                dtype=dtype,
                normalise_router=(config.adaptive_clustering_router and config.ac_scoring == "normalised_experts"
                                  and layer_index >= config.ac_start_layer),
            )
            layer.mlp = MoCEMLP(mlp, experts, self.routing_context, layer_index, num_layers,
                                ac_start_layer=config.ac_start_layer, ac_statistics=config.ac_statistics)
        self._num_moce_blocks = num_layers

    def moce_blocks(self) -> list[MoCEMLP]:
        return [module for module in self.modules() if isinstance(module, MoCEMLP)]

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.base.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.base.get_decoder()

    def _resolve_routes(
        self,
        cluster_ids: torch.Tensor | list[int] | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values,
        batch_size: int,
        device: torch.device,
        prompt_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        cluster_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, GroupMix | None]:
        """Each sequence's group [B], and the rows that also get a second group (None when no row does)."""
        config = self.config
        if cluster_weights is not None and (group_ids is not None or not config.needs_centroids):
            raise ValueError(
                "cluster_weights mix the groups of a prompt's two nearest clusters: they go with cluster_ids "
                f"[batch, 2], for a variant that routes by cluster; this {config.variant!r} model picks its "
                + ("groups from the given group_ids" if group_ids is not None
                   else f"group by {config.group_choice.value}, not by cluster")
            )
        if cluster_weights is not None and cluster_ids is None:
            raise ValueError("cluster_weights [batch, 2] weigh the two clusters of each row of cluster_ids [batch, 2]: "
                             "pass both")
        if group_ids is not None:
            return self._checked_groups(group_ids, batch_size, device, "group_ids"), None
        if config.group_choice is GroupChoice.SINGLE:
            return torch.zeros(batch_size, dtype=torch.long, device=device), None
        if config.group_choice is GroupChoice.HASH:
            if input_ids is None:
                raise ValueError(
                    f"variant {config.variant!r} hashes input_ids to pick the group; inputs_embeds alone cannot"
                )
            if prompt_mask is None and labels is not None and labels.shape == input_ids.shape:
                prompt_mask = labels == IGNORE_INDEX  # training: the prompt is what the loss ignores
            return self._routes_of_prompt(past_key_values, batch_size, lambda: (random_group_ids(
                input_ids, attention_mask, config.num_groups, config.random_group_seed, prompt_mask
            ), None))
        if cluster_ids is None:
            router = self._prompt_router()
            if router is None or input_ids is None:
                raise ValueError(
                    f"variant {config.variant!r} routes by cluster: pass cluster_ids (LongTensor [batch]) to "
                    "forward/generate, or load the model from a merged directory with centroids.npy and "
                    "embedder.json, which routes input_ids by itself"
                )
            rule = config.soft_assignment_rule
            if rule is None:
                return self._routes_of_prompt(past_key_values, batch_size, lambda: (torch.as_tensor(
                    router.assign_token_ids(input_ids, attention_mask), dtype=torch.long, device=device
                ), None))

            def soft_routes() -> tuple[torch.Tensor, GroupMix | None]:
                soft = router.assign_token_ids_soft(input_ids, attention_mask, rule)
                return self._mixed_routes(torch.as_tensor(soft.clusters, device=device),
                                          torch.as_tensor(soft.weights, dtype=torch.float32, device=device))

            return self._routes_of_prompt(past_key_values, batch_size, soft_routes)
        if cluster_weights is not None:
            return self._checked_mix_of(cluster_ids, cluster_weights, batch_size, device)
        return self._checked_groups(cluster_ids, batch_size, device, "cluster_ids"), None

    def _routes_of_prompt(self, past_key_values, batch_size: int, compute) -> tuple[torch.Tensor, GroupMix | None]:
        """Routes read off the prompt (`compute()`) at prefill, kept for the decoding steps, which see only the
        new tokens."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_length > 0 and self._prompt_groups is not None and self._prompt_groups[0].shape[0] == batch_size:
            return self._prompt_groups
        self._prompt_groups = compute()
        return self._prompt_groups

    def _checked_mix_of(self, cluster_ids, cluster_weights, batch_size: int, device: torch.device
                        ) -> tuple[torch.Tensor, GroupMix | None]:
        cached = self._checked_mix
        if cached is not None and cached[0] is cluster_ids and cached[1] is cluster_weights:
            return cached[2], cached[3]
        ids = torch.as_tensor(cluster_ids, device=device)
        weights = torch.as_tensor(cluster_weights, device=device)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"cluster_ids must be integers, got dtype {ids.dtype}")
        if not weights.is_floating_point():
            raise ValueError(f"cluster_weights must be floating point, got dtype {weights.dtype}")
        for name, tensor in (("cluster_ids", ids), ("cluster_weights", weights)):
            if tuple(tensor.shape) != (batch_size, 2):
                raise ValueError(
                    f"{name} with cluster_weights has shape {tuple(tensor.shape)}: expected [{batch_size}, 2] (each "
                    "sequence's nearest and second-nearest cluster, and their weights)"
                )
        routes = self._mixed_routes(ids.to(torch.long), weights)
        if isinstance(cluster_ids, torch.Tensor) and isinstance(cluster_weights, torch.Tensor):
            self._checked_mix = (cluster_ids, cluster_weights, *routes)
        return routes

    def _mixed_routes(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, GroupMix | None]:
        """(groups [B], mix) of a soft assignment: `ids` [B, 2] long, `weights` [B, 2] (weight 0 on the second:
        a hard row). Reads the weights on the host, once per batch of prompts: which rows run a second time is
        decided here, so that a batch without a mixed row runs exactly as with hard cluster ids."""
        host_weights = weights.detach().to("cpu", torch.float64)
        if not torch.isfinite(host_weights).all() or (host_weights < 0).any() or (host_weights > 1).any():
            row = int(torch.nonzero(~(torch.isfinite(host_weights) & (host_weights >= 0) & (host_weights <= 1)))[0, 0])
            raise ValueError(f"cluster_weights row {row} is {host_weights[row].tolist()}: weights lie in [0, 1]")
        sums = host_weights.sum(dim=1)
        off = torch.nonzero((sums - 1).abs() > 1e-5)
        if off.numel():
            row = int(off[0, 0])
            raise ValueError(f"cluster_weights row {row} is {host_weights[row].tolist()}: a row's weights sum to 1")
        groups = self._checked_groups(ids[:, 0], ids.shape[0], ids.device, "cluster_ids")
        mixed_rows = torch.nonzero(host_weights[:, 1] > 0).flatten()
        if mixed_rows.numel() == 0:
            return groups, None
        host_ids = ids.detach().cpu()
        same = mixed_rows[host_ids[mixed_rows, 0] == host_ids[mixed_rows, 1]]
        if same.numel():
            row = int(same[0])
            raise ValueError(
                f"cluster_ids row {row} mixes cluster {int(host_ids[row, 0])} with itself (weights "
                f"{host_weights[row].tolist()}): a mixed row names two different clusters"
            )
        rows = mixed_rows.to(ids.device)
        # Only the mixed rows' second clusters are groups: a hard row's (weight 0) may be anything.
        second = self._checked_groups(ids[:, 1].index_select(0, rows), rows.shape[0], ids.device, "cluster_ids")
        mix = GroupMix(rows=rows, groups=second,
                       weights=weights.detach().to(torch.float32)[:, 1].index_select(0, rows))
        return groups, mix

    def _prompt_router(self):
        """The directory's stage-1 router (embedder + centroids), loaded when first needed."""
        if self._prompt_router_dir is not None and self._loaded_prompt_router is None:
            self._loaded_prompt_router = PromptRouter.from_model_dir(self._prompt_router_dir, self.config)
        return self._loaded_prompt_router

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also remembers the directory, so that a merged model with centroids routes `input_ids` by itself
        (`generate(input_ids)` and `transformers.pipeline` need no cluster ids)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        for block in model.moce_blocks():
            block.reset_buffers()
        directory = Path(str(pretrained_model_name_or_path))
        if model.config.needs_centroids and (directory / CENTROIDS_FILE).is_file():
            model._prompt_router_dir = directory
        return model

    def _checked_groups(self, groups, batch_size: int, device: torch.device, name: str) -> torch.Tensor:
        given = groups
        groups = torch.as_tensor(groups, device=device)
        if groups.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"{name} must be integers, got dtype {groups.dtype}")
        groups = groups.to(torch.long).reshape(-1)
        if groups.shape[0] != batch_size:
            raise ValueError(f"{name} has {groups.shape[0]} entries for a batch of {batch_size} sequences")
        # Checking the values reads them on the host: a GPU sync, and a graph break under torch.compile. Generation
        # passes the same tensor at every step, so it is checked once (at prefill, which runs eagerly).
        if not torch.compiler.is_compiling() and given is not self._checked_group_tensor:
            low, high = int(groups.min()), int(groups.max())
            if low < 0 or high >= self.config.num_groups:
                bad = low if low < 0 else high
                raise ValueError(f"{name} value {bad} out of range: this model has num_groups={self.config.num_groups}")
            self._checked_group_tensor = given if isinstance(given, torch.Tensor) else None
        return groups

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cluster_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prompt_mask: torch.Tensor | None = None,
        group_ids: torch.LongTensor | None = None,
        aux_loss_weight: torch.Tensor | float | None = None,
        expert_use_mask: torch.Tensor | None = None,
        cluster_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> MoCECausalLMOutput:
        """`cluster_ids` [B] pick the groups of `moce` / `cluster_only`. A soft assignment passes `cluster_ids`
        [B, 2] (nearest, second-nearest cluster) with `cluster_weights` [B, 2] (each row sums to 1; (1, 0) for a
        hard row): a row with a second weight w > 0 gets (1 - w) x the block outputs under its first group + w x
        those under its second, in every MoE block (`moce_model.clustering.soft.SoftAssignmentRule` makes them from
        distances; a merged directory with `soft_assignment` on makes them itself). `prompt_mask` [B, T] (`random_group`
        only) marks the prompt tokens whose hash picks the group; by default the tokens labelled -100 when
        `labels` are given (so training and generation hash the same prompt), else every token.
        `group_ids` [B]: each sequence's group, already resolved by the caller (evaluation resolves every
        request's group before batching); it overrides the variant's own choice.

        In training (grad enabled, a router present) the objective is ``LM loss + aux_loss_coef * w * mean
        balance loss over layers``, the second term through autograd. `aux_loss_weight` w is this micro-batch's
        share of the optimiser step, so that the balance term is weighted like the LM loss whatever the
        gradient accumulation and world size (`MoCETrainer` passes it). Default: when the Trainer passes
        `num_items_in_batch` (the LM loss is then a sum over this micro-batch's label tokens divided by the
        step's), the same share of label tokens; else 1.

        `expert_use_mask` [B, T]: the tokens that count in the expert-use statistics while they are recorded
        (`set_expert_use_recording`); default the attention mask, so padding is never counted.

        Long: transformers' forward signature and outputs, with one branch per way the variants route."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch_size, seq_len = reference.shape[:2]
        group_ids, group_mix = self._resolve_routes(
            cluster_ids, input_ids, attention_mask, past_key_values, batch_size, reference.device, prompt_mask, labels,
            group_ids, cluster_weights,
        )
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= seq_len:
            token_mask = attention_mask[:, -seq_len:]
        aux_request = None
        if self.config.balance_loss_enabled and self.training and torch.is_grad_enabled():
            aux_request = self._aux_loss_request(
                group_ids, token_mask, seq_len, labels, kwargs.get("num_items_in_batch"), aux_loss_weight, group_mix
            )
        top_expert_slots = mixed_top_expert_slots = None
        if self.config.adaptive_clustering_router:
            # Filled block by block in this forward; see MoCEMLP.forward for why a tensor carries them.
            top_expert_slots = torch.zeros(
                self._num_moce_blocks, batch_size, seq_len, dtype=torch.long, device=reference.device
            )
            if group_mix is not None:
                mixed_top_expert_slots = torch.zeros(
                    self._num_moce_blocks, group_mix.rows.shape[0], seq_len, dtype=torch.long, device=reference.device
                )
        counted_tokens = None
        if self.routing_context.record_expert_use and not self.training:
            counted_tokens = self._counted_tokens(expert_use_mask, token_mask, input_ids, past_key_values, seq_len)
        self.routing_context.begin(group_ids, token_mask, aux_request, top_expert_slots, counted_tokens, group_mix,
                                   mixed_top_expert_slots)
        outputs = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return MoCECausalLMOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _aux_loss_request(
        self,
        group_ids: torch.Tensor,
        token_mask: torch.Tensor | None,
        seq_len: int,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
        aux_loss_weight: torch.Tensor | float | None,
        group_mix: GroupMix | None = None,
    ) -> AuxLossRequest:
        config = self.config
        device = group_ids.device
        if aux_loss_weight is None:
            if num_items_in_batch is not None and labels is not None:
                aux_loss_weight = labels[..., 1:].ne(IGNORE_INDEX).sum() / num_items_in_batch
            else:
                aux_loss_weight = 1.0
        blocks = self._num_moce_blocks
        gradient_scale = torch.as_tensor(aux_loss_weight, dtype=torch.float32, device=device) * (config.aux_loss_coef / blocks)
        num_groups = config.num_groups
        if config.balance_loss_scope == "all":  # one pool: expert slot e of every group balanced as one expert
            group_ids, num_groups = torch.zeros_like(group_ids), 1
            if group_mix is not None:
                group_mix = replace(group_mix, groups=torch.zeros_like(group_mix.groups))
        statistics = BalanceLossStatistics.build(group_ids, token_mask, seq_len, num_groups, config.experts_per_group,
                                                 config.router_top_k, group_mix)
        probe = torch.zeros(blocks, dtype=torch.float32, device=device, requires_grad=True)
        return AuxLossRequest(statistics=statistics, gradient_scale=gradient_scale, probe=probe)

    def last_aux_loss(self) -> torch.Tensor | None:
        """Balance loss of the last training forward, averaged over layers; None before its backward has run
        (or for variants without a router)."""
        return self.routing_context.aux_loss()

    # Expert-use statistics ------------------------------------------------------------------------------
    def set_expert_use_recording(self, enabled: bool, filler_token_id: int | None = None) -> None:
        """Count, in eval mode, which experts each token is routed to. `filler_token_id`: the token that batched
        generation feeds to sequences that have already finished (the pad token); such tokens are not counted
        in decoding steps (they are in the prompt, where the attention mask tells padding apart)."""
        self.routing_context.record_expert_use = enabled
        self._expert_use_filler_token_id = filler_token_id if enabled else None

    def _counted_tokens(self, expert_use_mask: torch.Tensor | None, token_mask: torch.Tensor | None,
                        input_ids: torch.Tensor | None, past_key_values, seq_len: int) -> torch.Tensor | None:
        counted = token_mask
        if expert_use_mask is not None:
            if expert_use_mask.shape[-1] != seq_len:
                raise ValueError(f"expert_use_mask covers {expert_use_mask.shape[-1]} tokens, the input {seq_len}")
            counted = expert_use_mask if counted is None else counted.bool() & expert_use_mask.bool()
        filler = self._expert_use_filler_token_id
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
        if filler is not None and decoding and input_ids is not None:
            fresh = input_ids != filler
            counted = fresh if counted is None else counted.bool() & fresh
        return counted

    def reset_expert_use(self) -> None:
        for block in self.moce_blocks():
            block.expert_use_counts.zero_()

    def expert_use_counts(self) -> torch.Tensor:
        """[G, E] (token, expert) assignment counts summed over layers since the last reset."""
        return self.expert_use_counts_by_layer().sum(dim=0)

    def set_per_sequence_expert_use(self, enabled: bool) -> None:
        """While enabled (and recording), keep every forward's expert use per sequence as well
        (`take_per_sequence_expert_use`)."""
        self.routing_context.per_sequence_counts = [[] for _ in range(self._num_moce_blocks)] if enabled else None

    def take_per_sequence_expert_use(self) -> torch.Tensor | None:
        """[L, B, G, E] the (token, expert) assignments of each sequence in each group, of the forwards since the
        last take, summed over those forwards (they must share the batch: a scoring call, or one `generate`); None
        when nothing was recorded. A sequence has counts in its own group, and in its second group when a soft
        assignment mixed two."""
        recorded = self.routing_context.per_sequence_counts
        if recorded is None or not recorded[0]:
            return None
        counts = torch.stack([torch.stack(layer).sum(dim=0) for layer in recorded]).to(torch.long).cpu()
        for layer in recorded:
            layer.clear()
        return counts

    def expert_use_counts_by_layer(self) -> torch.Tensor:
        """[L, G, E] (token, expert) assignment counts of every layer since the last reset."""
        blocks = sorted(self.moce_blocks(), key=lambda block: block.layer_index)
        return torch.stack([block.expert_use_counts.cpu() for block in blocks])

