"""One training step (forward, backward, AdamW) of LoRA only, `dense_adapter`, `pesc`, `moce` and the
reference loop, eager and with each decoder layer compiled, side by side in one run.

    python -m bench.train_step --device cuda --shape paper          # LLaMA-2-7B dims, 4 x 512 tokens (GPU)
    python -m bench.train_step --shape tiny --steps 2               # seconds on a CPU (what the tests run)

Every variant is the paper's training setting on random weights: base weights frozen in bf16 (fp32 on CPU),
LoRA r=64/alpha 16/dropout 0.1 on the seven projections, experts and LoRA in float32 under bf16 autocast
(as the Trainer runs QLoRA with bf16=True), gradient checkpointing, 4 groups x 4 experts, top-2, adapter 64.
One base model is built and each variant is attached to it and detached again, so the variants see the same
weights and the GPU holds one base at a time. `reference` is `moce` with the reference code's expert loop
(python loop over groups x experts with boolean masks); it cannot be compiled. The last lines are the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.timing import elapsed_seconds, kernel_profile
from moce_model.model.adapters import PAPER_LORA_TARGETS, add_lora
from moce_model.model.config import MoCEConfig
from moce_model.model.experts import Routing, reference_expert_forward
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.training import compile_decoder_layers

VARIANTS = ("lora", "dense_adapter", "pesc", "moce", "reference")


@dataclass(frozen=True)
class ModelShape:
    name: str
    base: dict
    batch: int
    seq_len: int
    adapter_dim: int
    lora_r: int


SHAPES = {
    "paper": ModelShape("LLaMA-2-7B dims", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000), 4, 512, 64, 64),
    "demo": ModelShape("SmolLM2-135M dims", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152), 4, 128, 16, 8),
    "tiny": ModelShape("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128), 2, 32, 8, 4),
}


def build_base(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: a 7B model in fp32 would not fit
    try:
        with device:
            base = LlamaForCausalLM(LlamaConfig(**shape.base, max_position_embeddings=4096))
    finally:
        torch.set_default_dtype(previous)
    base.requires_grad_(False)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return base.train()


def _reference_forward(self, x, down, group_ids, feature_weights=None, mix=None, mixed_feature_weights=None):
    # the reference code has the linear token router and hard groups only: no AC feature weights, no soft mix
    if mix is not None:
        raise ValueError("the reference loop has no soft group assignment")
    return reference_expert_forward(self, x, down, group_ids), Routing(group_ids, None, None, None)


def attach(base: LlamaForCausalLM, variant: str, shape: ModelShape, compiled: bool) -> torch.nn.Module:
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=shape.lora_r, lora_alpha=16, lora_dropout=0.1,
                                                target_modules=list(PAPER_LORA_TARGETS), task_type="CAUSAL_LM"))
    else:
        layout = "moce" if variant == "reference" else variant
        config = MoCEConfig(variant=layout, num_groups=4, experts_per_group=4, router_top_k=2,
                            adapter_dim=shape.adapter_dim)
        moce = MoCEForCausalLM.from_base(base, config)
        torch.manual_seed(1)
        for block in moce.moce_blocks():
            block.moce_experts.float()  # the QLoRA setting keeps the experts in float32
            with torch.no_grad():
                block.moce_experts.adapter_up.normal_(std=0.02)  # a trained model's experts are not zero
            if variant == "reference":
                block.moce_experts.forward = types.MethodType(_reference_forward, block.moce_experts)
        model = add_lora(moce, r=shape.lora_r, alpha=16, dropout=0.1)
    if compiled:
        compile_decoder_layers(model)
    return model


def detach(model: torch.nn.Module, base: LlamaForCausalLM) -> None:
    for module in model.modules():
        module._compiled_call_impl = None
    model.unload()  # peft: LoRA and modules_to_save wrappers out, original modules back
    for layer in base.model.layers:
        if hasattr(layer.mlp, "base_mlp"):
            layer.mlp = layer.mlp.base_mlp
    torch._dynamo.reset()


def make_batch(shape: ModelShape, variant: str, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape.base["vocab_size"], (shape.batch, shape.seq_len), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}
    if variant != "lora":
        batch["cluster_ids"] = (torch.arange(shape.batch) % 4).to(device)
    return batch


def measure(base, variant: str, shape: ModelShape, compiled: bool, device: torch.device, steps: int,
            warmup: int, top_kernels: int = 0, autocast: bool = True) -> dict:
    model = attach(base, variant, shape, compiled)
    # Fused on a GPU, as the Trainer's default optimiser there (adamw_torch_fused).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    batch = make_batch(shape, variant, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()  # the first step compiles (when compiled) and allocates the optimiser state
    first_step = time.perf_counter() - started
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = [elapsed_seconds(step, device) for _ in range(steps)]
    profile = kernel_profile(step, device, top_kernels)
    row = {
        "variant": variant,
        "mode": "compiled" if compiled else "eager",
        "step_ms": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "steps": steps,
        "first_step_s": first_step,
        "tokens_per_s": shape.batch * shape.seq_len / statistics.median(times),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **profile,
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    detach(model, base)
    return row  # the model and its optimiser state are freed with this frame


def precision_ratio(rows: list[dict], variant: str, mode: str) -> float | None:
    """A variant's bf16 step time over its fp32 step time (both measured in one run with `--precision both`)."""
    lookup = {row["precision"]: row["step_ms"] for row in rows if (row["variant"], row["mode"]) == (variant, mode)}
    return lookup["bf16"] / lookup["fp32"] if {"bf16", "fp32"} <= set(lookup) else None


def ratio(rows: list[dict], numerator: tuple[str, str], denominator: tuple[str, str]) -> float | None:
    lookup = {(row["variant"], row["mode"]): row["step_ms"] for row in rows}
    if numerator in lookup and denominator in lookup:
        return lookup[numerator] / lookup[denominator]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--top-kernels", type=int, default=0, help="list the N heaviest kernels of each row (GPU)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                        help="bf16: frozen base in bf16, trainable weights in fp32, bf16 autocast (the Trainer's "
                             "bf16=True); fp32: everything fp32; auto: bf16 on a GPU, fp32 on a CPU; both: fp32, "
                             "then bf16, each with its own base, and the bf16 / fp32 ratios")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    modes = [m for m in args.modes.split(",") if m]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    if args.precision == "both":
        precisions = [False, True]
    else:
        precisions = [args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    rows = []
    header = f"{'variant':<15}{'mode':<10}{'step_ms':>9}{'min':>8}{'max':>8}{'tok/s':>8}{'first_s':>9}" \
             f"{'kernels':>9}{'kernel_ms':>11}{'peak_GiB':>10}"
    for bf16 in precisions:
        dtype = torch.bfloat16 if bf16 else torch.float32
        print(f"torch {torch.__version__}, {name}; {shape.name}, {shape.batch}x{shape.seq_len} tokens, "
              f"base {dtype}, autocast bf16: {bf16}", flush=True)
        started = time.perf_counter()
        base = build_base(shape, device, dtype)
        print(f"base built in {time.perf_counter() - started:.1f} s", flush=True)
        print(header)
        for mode in modes:
            for variant in variants:
                if variant == "reference" and mode == "compiled":
                    continue  # host syncs in the loop: nothing to compile
                row = measure(base, variant, shape, mode == "compiled", device, args.steps,
                              args.warmup + (2 if mode == "compiled" else 0), args.top_kernels, autocast=bf16)
                row["precision"] = "bf16" if bf16 else "fp32"
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(f"{row['variant']:<15}{row['mode']:<10}{row['step_ms']:>9.1f}{row['step_ms_min']:>8.1f}"
                      f"{row['step_ms_max']:>8.1f}{row['tokens_per_s']:>8.0f}{row['first_step_s']:>9.1f}"
                      f"{row.get('kernels', float('nan')):>9.0f}{row.get('kernel_ms', float('nan')):>11.1f}"
                      f"{row.get('peak_gib', float('nan')):>10.2f}", flush=True)
                for kernel, count, total_ms in row.get("top_kernels", []):
                    print(f"    {total_ms:>8.2f} ms {count:>6}x  {kernel}")
        del base
        gc.collect()
    if args.json:
        args.json.write_text(json.dumps({"device": name, "shape": shape.name, "rows": rows}, indent=2))
    print(f"(median over {args.steps} steps after {args.warmup + 1} warm-up steps, eager; 2 more compiled)")
    ratios = {
        "moce_over_lora_eager": (("moce", "eager"), ("lora", "eager")),
        "moce_over_lora_compiled": (("moce", "compiled"), ("lora", "compiled")),
        "eager_moce_over_compiled_moce": (("moce", "eager"), ("moce", "compiled")),
        "pesc_over_moce_eager": (("pesc", "eager"), ("moce", "eager")),
        "pesc_over_moce_compiled": (("pesc", "compiled"), ("moce", "compiled")),
        "reference_over_moce_eager": (("reference", "eager"), ("moce", "eager")),
        "reference_over_moce_compiled": (("reference", "eager"), ("moce", "compiled")),
    }
    last = "bf16" if precisions[-1] else "fp32"  # the other ratios: within the last precision measured
    ratios = {key: ratio([row for row in rows if row["precision"] == last], *pair) for key, pair in ratios.items()}
    for variant in variants:
        for mode in modes:
            ratios[f"{variant}_{mode}_bf16_over_fp32"] = precision_ratio(rows, variant, mode)
    for key, value in ratios.items():
        if value is not None:
            print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
