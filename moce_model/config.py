"""Configuration of a MoCE model: a wrapped causal LM plus routed adapter experts in every MLP block."""

from __future__ import annotations

from functools import cached_property

from transformers import AutoConfig, PreTrainedConfig

from moce_model.routing import CLUSTER_ROUTED_VARIANTS

VARIANTS = ("moce", "pesc", "dense_adapter", "random_group", "cluster_only")

# Label of the tokens the LM loss ignores (the prompt, padding): torch's and transformers' default.
IGNORE_INDEX = -100

__all__ = ["CLUSTER_ROUTED_VARIANTS", "IGNORE_INDEX", "VARIANTS", "MoCEConfig"]


class MoCEConfig(PreTrainedConfig):
    """Wrapped model config (`base_config`, a dict with its `model_type`) plus the expert layout.

    Variants, all from this one config:
      - `moce`: `num_groups` groups x `experts_per_group` experts; the cluster id picks the group,
        the group's router picks the `router_top_k` experts per token
        (`top_k=` is accepted as an alias when constructing).
      - `pesc`: one group of `experts_per_group` experts with token top-k routing; it never depends on the
        number of clusters, so `num_groups` is forced to 1.
      - `dense_adapter`: one adapter, no router (1 group x 1 expert).
      - `cluster_only`: the cluster id picks the group, which holds a single adapter (no token routing).
      - `random_group`: like `moce`, but the group is a deterministic pseudo-random function of the
        sequence's prompt tokens (seeded by `random_group_seed`); `cluster_ids` are ignored.
    """

    model_type = "moce"

    base_config: dict | None = None
    variant: str = "moce"
    num_groups: int = 4
    experts_per_group: int = 4
    # Not `top_k`: that name is a generation parameter, which generate() would read as sampling top-k.
    router_top_k: int = 2
    adapter_dim: int = 64
    adapter_scaling: float = 1.0
    adapter_dropout: float = 0.0
    aux_loss_coef: float = 0.01
    random_group_seed: int = 0
    embedder: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if "top_k" in kwargs:
            self.router_top_k = kwargs.pop("top_k")
        if self.variant not in VARIANTS:
            raise ValueError(f"MoCEConfig.variant={self.variant!r} is not one of {VARIANTS}")
        if self.variant in ("pesc", "dense_adapter"):
            self.num_groups = 1
        if self.variant in ("dense_adapter", "cluster_only"):
            self.experts_per_group = 1
            self.router_top_k = 1
        for field_name in ("num_groups", "experts_per_group", "router_top_k", "adapter_dim"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoCEConfig.{field_name} must be a positive int, got {value!r}")
        if self.router_top_k > self.experts_per_group:
            raise ValueError(
                f"MoCEConfig.router_top_k={self.router_top_k} exceeds experts_per_group={self.experts_per_group}"
            )
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"MoCEConfig.adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if self.base_config is not None:
            if not isinstance(self.base_config, dict):
                self.base_config = self.base_config.to_dict()
            if "model_type" not in self.base_config:
                raise ValueError("MoCEConfig.base_config needs a 'model_type' key (the wrapped model's config dict)")
            # Read by generation, DeepSpeed "auto" values and the Trainer; mirrored from the wrapped model.
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
                if key in self.base_config:
                    kwargs.setdefault(key, self.base_config[key])
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(key, self.base_config.get(key))
        super().__post_init__(**kwargs)

    @property
    def has_router(self) -> bool:
        return self.experts_per_group > 1

    @property
    def routes_by_cluster(self) -> bool:
        return self.variant in CLUSTER_ROUTED_VARIANTS

    @cached_property
    def wrapped_config(self) -> PreTrainedConfig:
        """The wrapped model's config object, built from `base_config`."""
        if self.base_config is None:
            raise ValueError("MoCEConfig.base_config is not set: build the config from a base model config")
        kwargs = dict(self.base_config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # Cache and generation code read layer counts and head sizes from the text config.
        if self.base_config is None:
            return self
        return self.wrapped_config

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("wrapped_config", None)
        return output
