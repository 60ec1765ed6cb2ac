"""MoCEForCausalLM on tiny Llama / Qwen2 / Mistral models: equivalence, variants, generate, Trainer, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Trainer,
    TrainingArguments,
)

from moce_model.model.config import MoCEConfig
from moce_model.model.layer import MoCEMLP
from moce_model.model.modeling import MoCEForCausalLM, random_group_ids

VOCAB = 97
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=128)
BASE_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY),
}


def tiny_base(kind: str = "llama", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(BASE_CONFIGS[kind]()).eval()


def tiny_moce(variant: str = "moce", kind: str = "llama", groups: int = 3, perturb: bool = True, **overrides) -> MoCEForCausalLM:
    config = MoCEConfig(variant=variant, num_groups=groups, experts_per_group=4, top_k=2, adapter_dim=8, **overrides)
    model = MoCEForCausalLM.from_base(tiny_base(kind), config).eval()
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for block in model.moce_blocks():
                block.moce_experts.adapter_up.normal_(std=0.5)
    return model


def batch_ids(batch: int = 3, seq_len: int = 9, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(BASE_CONFIGS))
def test_fresh_model_gives_base_logits_exactly(kind: str) -> None:
    base = tiny_base(kind)
    ids = batch_ids()
    with torch.no_grad():
        expected = base(ids).logits.clone()
        model = MoCEForCausalLM.from_base(base, MoCEConfig(num_groups=3, experts_per_group=4, top_k=2, adapter_dim=8))
        got = model.eval()(ids, cluster_ids=torch.tensor([0, 1, 2])).logits
    assert torch.equal(got, expected)
    assert len(model.moce_blocks()) == 2


@pytest.mark.parametrize("kind", sorted(BASE_CONFIGS))
def test_routing_changes_outputs_and_trains_on_every_architecture(kind: str) -> None:
    model = tiny_moce(kind=kind).train()
    ids = batch_ids()
    out = model(ids, labels=ids, cluster_ids=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.loss) and model.last_aux_loss() is None
    out.loss.backward()
    assert torch.isfinite(model.last_aux_loss())
    router_grad = model.moce_blocks()[0].moce_experts.router.grad
    assert router_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        first = model(ids, cluster_ids=torch.tensor([0, 0, 0])).logits
        second = model(ids, cluster_ids=torch.tensor([1, 1, 1])).logits
    assert not torch.allclose(first, second)


def test_float32_model_trains_under_bfloat16_autocast() -> None:
    """Trainer bf16=True runs the forward under autocast; QLoRA keeps the experts in float32."""
    model = tiny_moce().train()
    ids = batch_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, cluster_ids=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(model.last_aux_loss())
    experts = model.moce_blocks()[0].moce_experts
    assert experts.router.grad.dtype == torch.float32 and experts.router.grad.abs().sum() > 0
    assert experts.adapter_down.grad.abs().sum() > 0


def test_from_base_keeps_weights_of_modules_swapped_in_after_loading() -> None:
    """dequantize() replaces NF4 layers by new nn.Linear modules; wrapping must not re-initialise them."""
    base = tiny_base()
    layer = base.model.layers[0].self_attn
    swapped = nn.Linear(layer.q_proj.in_features, layer.q_proj.out_features, bias=False)
    with torch.no_grad():
        swapped.weight.copy_(layer.q_proj.weight)
    layer.q_proj = swapped
    expected = swapped.weight.detach().clone()
    MoCEForCausalLM.from_base(base, MoCEConfig(num_groups=2, experts_per_group=2, top_k=1, adapter_dim=4))
    assert torch.equal(swapped.weight, expected)


def test_from_base_keeps_the_base_weights_without_copy() -> None:
    base = tiny_base()
    weight = base.model.layers[0].mlp.gate_proj.weight
    before = weight.detach().clone()
    model = MoCEForCausalLM.from_base(base, MoCEConfig(num_groups=2, experts_per_group=2, top_k=1, adapter_dim=4))
    inner = model.base.model.layers[0].mlp
    assert isinstance(inner, MoCEMLP)
    assert inner.base_mlp.gate_proj.weight is weight
    assert torch.equal(weight, before)


def test_clear_errors_for_bad_cluster_ids_and_unsupported_models() -> None:
    model = tiny_moce(groups=3)
    ids = batch_ids()
    with pytest.raises(ValueError, match="cluster_ids value 3 out of range: this model has num_groups=3"):
        model(ids, cluster_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="pass cluster_ids"):
        model(ids)
    with pytest.raises(ValueError, match="3 sequences"):
        model(ids, cluster_ids=torch.tensor([0, 1]))
    base = tiny_base()
    base.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"module 'model\.layers\.1\.mlp' \(Sequential\) lacks the Linear projections"):
        MoCEForCausalLM.from_base(base, MoCEConfig(num_groups=2, experts_per_group=2, top_k=1, adapter_dim=4))
    with pytest.raises(ValueError, match="variant"):
        MoCEConfig(variant="mixture")


def test_save_and_load_round_trip(tmp_path) -> None:
    model = tiny_moce()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoCEForCausalLM)
    assert loaded.config.variant == "moce" and loaded.config.num_groups == 3
    ids = batch_ids()
    cluster_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert torch.equal(loaded(ids, cluster_ids=cluster_ids).logits, model(ids, cluster_ids=cluster_ids).logits)
    # Tied embeddings stay tied after loading.
    assert loaded.base.lm_head.weight.data_ptr() == loaded.base.model.embed_tokens.weight.data_ptr()


def test_dense_adapter_has_one_adapter_and_no_router() -> None:
    model = tiny_moce("dense_adapter")
    assert model.config.num_groups == 1 and model.config.experts_per_group == 1
    experts = model.moce_blocks()[0].moce_experts
    assert experts.router is None
    assert experts.adapter_down.shape[:3] == (1, 64, 1)
    ids = batch_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids, cluster_ids=torch.tensor([5, 6, 7])).logits)


def test_pesc_ignores_cluster_ids_and_does_not_depend_on_the_number_of_clusters() -> None:
    model = tiny_moce("pesc", groups=7)
    assert model.config.num_groups == 1 and model.config.experts_per_group == 4
    assert model.moce_blocks()[0].moce_experts.router.shape == (1, 4, 64)
    ids = batch_ids()
    with torch.no_grad():
        without = model(ids).logits
        assert torch.equal(without, model(ids, cluster_ids=torch.tensor([0, 1, 2])).logits)


def test_cluster_only_uses_exactly_the_chosen_groups_single_adapter() -> None:
    model = tiny_moce("cluster_only", groups=3)
    experts = model.moce_blocks()[0].moce_experts
    assert experts.router is None and experts.adapter_up.shape[:2] == (3, 1)
    model.train()
    ids = batch_ids(batch=2)
    model(ids, labels=ids, cluster_ids=torch.tensor([1, 1])).loss.backward()
    for block in model.moce_blocks():
        grad = block.moce_experts.adapter_up.grad
        assert torch.count_nonzero(grad[1]) > 0
        assert torch.count_nonzero(grad[0]) == 0 and torch.count_nonzero(grad[2]) == 0


def test_random_group_is_deterministic_per_sequence_and_ignores_cluster_ids() -> None:
    ids = batch_ids(batch=64, seq_len=12)
    groups = random_group_ids(ids, None, 4, seed=0)
    assert torch.equal(groups, random_group_ids(ids, None, 4, seed=0))
    assert set(groups.tolist()) == {0, 1, 2, 3}
    # Independent of the batch it is in and of left padding.
    single = random_group_ids(ids[5:6], None, 4, seed=0)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[5:6]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    assert single.item() == groups[5].item() == random_group_ids(padded, mask, 4, seed=0).item()
    assert not torch.equal(groups, random_group_ids(ids, None, 4, seed=1))

    model = tiny_moce("random_group", groups=3)
    small = ids[:3]
    with torch.no_grad():
        first = model(small).logits
        assert torch.equal(first, model(small, cluster_ids=torch.tensor([0, 0, 0])).logits)
        assert torch.equal(first, model(small).logits)
        expected_groups = random_group_ids(small, None, 3, seed=0)
        moce = MoCEForCausalLM.from_base(tiny_base(), MoCEConfig(variant="moce", num_groups=3, experts_per_group=4, top_k=2, adapter_dim=8))
        moce.load_state_dict(model.state_dict())
        assert torch.equal(first, moce.eval()(small, cluster_ids=expected_groups).logits)


def test_group_ids_given_by_the_caller_override_every_variants_own_choice() -> None:
    """Evaluation resolves each request's group before batching and passes it as `group_ids`."""
    ids = batch_ids()
    groups = torch.tensor([2, 0, 1])
    random_group = tiny_moce("random_group", groups=3)
    moce = MoCEForCausalLM.from_base(tiny_base(), MoCEConfig(variant="moce", num_groups=3, experts_per_group=4, top_k=2, adapter_dim=8))
    moce.load_state_dict(random_group.state_dict())
    with torch.no_grad():
        expected = moce.eval()(ids, cluster_ids=groups).logits
        assert torch.equal(random_group(ids, group_ids=groups).logits, expected)
        assert torch.equal(moce(ids, cluster_ids=torch.tensor([0, 0, 0]), group_ids=groups).logits, expected)
        assert not torch.equal(random_group(ids).logits, expected)  # its own hash picks other groups here
        with pytest.raises(ValueError, match="group_ids value 3 out of range"):
            random_group(ids, group_ids=torch.tensor([0, 1, 3]))
        with pytest.raises(ValueError, match="group_ids has 2 entries for a batch of 3"):
            moce(ids, group_ids=torch.tensor([0, 1]))


def test_random_group_hashes_the_same_prompt_in_training_and_generation() -> None:
    """Training hashes the tokens the loss ignores (the prompt); generation hashes the prompt it is given."""
    model = tiny_moce("random_group", groups=4).train()
    prompts = [batch_ids(batch=1, seq_len=n, seed=10 + n)[0] for n in (5, 7, 9, 6, 8, 4)]
    responses = [batch_ids(batch=1, seq_len=n, seed=40 + n)[0] for n in (3, 6, 2, 4, 5, 3)]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):  # right padding, as the collator pads
        whole = torch.cat([prompt, response])
        input_ids[row, : len(whole)] = whole
        labels[row, len(prompt) : len(whole)] = response
        attention_mask[row, : len(whole)] = 1
    model(input_ids, attention_mask=attention_mask, labels=labels)
    trained_groups = model.routing_context.group_ids.clone()

    prompt_width = max(len(p) for p in prompts)
    left_padded = torch.zeros(len(prompts), prompt_width, dtype=torch.long)
    prompt_attention = torch.zeros_like(left_padded)
    for row, prompt in enumerate(prompts):  # left padding, as generation pads
        left_padded[row, prompt_width - len(prompt) :] = prompt
        prompt_attention[row, prompt_width - len(prompt) :] = 1
    model.eval()
    with torch.no_grad():
        model(left_padded, attention_mask=prompt_attention)
    assert torch.equal(model.routing_context.group_ids, trained_groups)
    assert len(set(trained_groups.tolist())) > 1
    # The whole sequence (prompt + response) would hash differently for some rows.
    assert not torch.equal(random_group_ids(input_ids, attention_mask, 4, seed=0), trained_groups)


def greedy_without_cache(model: MoCEForCausalLM, ids: torch.Tensor, cluster_ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, cluster_ids=cluster_ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("one_token_path", ["gathered", "all_groups"], indirect=True)
def test_generate_passes_cluster_ids_through_cached_decoding_and_beam_search(one_token_path: str) -> None:
    model = tiny_moce()
    model.generation_config.pad_token_id = 0
    ids = batch_ids(batch=3, seq_len=5)
    cluster_ids = torch.tensor([2, 0, 1])
    attention_mask = torch.ones_like(ids)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=attention_mask, cluster_ids=cluster_ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, greedy_without_cache(model, ids, cluster_ids, 6))
        # The last decoding step (served from the cache) used the given groups, not others.
        scored = model.generate(ids, attention_mask=attention_mask, cluster_ids=cluster_ids, max_new_tokens=6,
                                do_sample=False, return_dict_in_generate=True, output_logits=True)
        prefix = scored.sequences[:, :-1]
        torch.testing.assert_close(scored.logits[-1], model(prefix, cluster_ids=cluster_ids).logits[:, -1])
        other_groups = model(prefix, cluster_ids=torch.tensor([0, 1, 2])).logits[:, -1]
        assert not torch.allclose(scored.logits[-1], other_groups)
        beams = model.generate(ids, attention_mask=attention_mask, cluster_ids=cluster_ids, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (3, 9)


def test_trainer_keeps_cluster_ids_in_the_batch(tmp_path) -> None:
    from moce_model.model.adapters import add_lora

    model = tiny_moce(perturb=False)
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    ids = batch_ids(batch=8, seq_len=10)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row, "cluster_ids": torch.tensor(i % 3)}
            for i, row in enumerate(ids)]
    seen: list[torch.Tensor] = []
    begin = model.routing_context.begin

    def spy(group_ids, *args, **kwargs):
        seen.append(group_ids.clone())
        return begin(group_ids, *args, **kwargs)

    model.routing_context.begin = spy
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    Trainer(model=peft_model, args=args, train_dataset=rows).train()
    assert len(seen) == 2
    assert sorted(torch.cat(seen).tolist()) == sorted(i % 3 for i in range(8))
    wrapper = peft_model.base_model.model.base.model.layers[0].mlp.moce_experts
    assert torch.count_nonzero(wrapper.original_module.adapter_up) == 0
    assert torch.count_nonzero(wrapper.modules_to_save["default"].adapter_up) > 0  # the experts were trained


def test_gradient_checkpointing_recomputes_with_the_same_groups() -> None:
    model = tiny_moce().train()
    ids = batch_ids()
    cluster_ids = torch.tensor([0, 1, 2])
    model(ids, labels=ids, cluster_ids=cluster_ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids, cluster_ids=cluster_ids).loss.backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_expert_use_counts_per_group_exclude_padding(tmp_path) -> None:
    from moce_model.training.expert_use import (
        expert_use_counts,
        expert_use_heatmap_png,
        expert_use_share,
    )

    model = tiny_moce(groups=3)
    ids = batch_ids(batch=2, seq_len=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    counts = expert_use_counts(model, [{"input_ids": ids, "attention_mask": mask, "cluster_ids": torch.tensor([2, 0])}])
    layers, top_k = 2, 2
    assert counts.shape == (3, 4)
    assert counts[1].sum() == 0
    assert counts[2].sum() == 6 * top_k * layers and counts[0].sum() == 4 * top_k * layers
    share = expert_use_share(counts)
    assert share[1].sum() == 0 and abs(share[2].sum() - 1) < 1e-9
    png = expert_use_heatmap_png(counts, path=tmp_path / "plots" / "use.png")
    assert png.startswith(b"\x89PNG")
    assert (tmp_path / "plots" / "use.png").read_bytes() == png


@pytest.mark.parametrize("one_token_path", ["gathered", "all_groups"], indirect=True)
@pytest.mark.parametrize("token_router", ["linear", "ac"])
def test_cached_decoding_compiles_once_without_graph_breaks(token_router: str, one_token_path: str) -> None:
    """transformers compiles the decode step for a static cache (on GPUs); nothing in the routing may recompile
    per token (e.g. a per-forward counter) or break the graph (e.g. reading cluster ids on the host)."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = tiny_moce(token_router=token_router)
    ids = batch_ids(batch=2, seq_len=6)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")
    compile_config._compile_all_devices = True  # what a GPU gets by default, forced on the CPU
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  pad_token_id=0, cache_implementation="static", compile_config=compile_config,
                  cluster_ids=torch.tensor([0, 2]))
    # config.patch, not monkeypatch: undoing monkeypatch on dynamo's config module deletes the setting.
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(ids, **kwargs)
        again = model.generate(ids, **kwargs)
        eager = model.generate(ids, **{**kwargs, "disable_compile": True})
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
