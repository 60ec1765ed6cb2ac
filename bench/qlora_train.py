"""The paper's training path end to end at LLaMA-2-7B dims: `moce_model.training.train` with the paper preset
(QLoRA NF4 base, bf16, gradient checkpointing, paged AdamW, compiled decoder layers) through the Trainer, on a
random-init 7B-shaped LLaMA saved to disk and reloaded in NF4 as a real base model would be.

    python -m bench.qlora_train --variants lora,pesc,moce --steps 24        # one GPU, a few minutes

Prints per variant: seconds until the first step is done (load, quantise, attach, compile, step), median seconds per optimiser step after the
first `--warmup` steps (compilation happens in those), tokens per second at that median, peak GPU memory.
Rows are long synthetic instructions so that every sequence fills `--max-length` tokens of a character-level
tokenizer (the device has no Hub access; token ids, not text, are what the step costs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.train_step import SHAPES, build_base
from moce_model.model.config import ExpertLayout, MoCEConfig
from moce_model.training import TrainingConfig, train


def long_rows(n: int, chars: int):
    import polars as pl

    filler = "the quick brown fox jumps over the lazy dog " * (chars // 44 + 1)
    return pl.DataFrame([
        {"id": f"row{i:05d}", "system": "", "instruction": f"Item {i}: " + filler[: chars // 2],
         "input": "", "response": filler[chars // 2: chars]} for i in range(n)
    ])


def save_paper_shaped_base(directory: Path) -> Path:
    from tests.tiny_models import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    base = build_base(SHAPES["paper"], torch.device("cuda"), torch.bfloat16)
    base.config.pad_token_id, base.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    base.config.bos_token_id = tokenizer.bos_token_id
    base.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del base
    torch.cuda.empty_cache()
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="moce")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--compile", choices=("on", "off"), default="on")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (QLoRA with paged AdamW)")
    root = Path(tempfile.mkdtemp(prefix="qlora_bench_"))
    started = time.perf_counter()
    base_dir = save_paper_shaped_base(root / "base")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; LLaMA-2-7B dims, random init, saved in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    config = TrainingConfig.paper(max_steps=args.steps, warmup_steps=2, logging_steps=1, save_steps=10**6,
                                  max_length=args.max_length, compile=args.compile == "on")
    # ~600 character tokens per row: cut to max_length, with part of every response left to learn from.
    rows = long_rows(config.per_device_batch_size * config.grad_accum * args.steps, args.max_length + 64)
    print(f"paper preset: batch {config.per_device_batch_size} x grad_accum {config.grad_accum} x {args.max_length} "
          f"tokens per step, {config.optim}, bf16 {config.bf16}, qlora {config.qlora}, gradient checkpointing "
          f"{config.gradient_checkpointing}, compile {config.compile}")
    print(f"{'variant':<15}{'first_s':>9}{'step_s':>9}{'min_s':>8}{'max_s':>8}{'tok/s':>9}{'peak_GiB':>10}{'loss':>14}",
          flush=True)
    step_seconds: dict[str, float] = {}
    for variant in [v for v in args.variants.split(",") if v]:
        # `lora`: LoRA alone on the quantised base (no experts), the baseline the MoCE step is compared with.
        moce = None if variant == "lora" else MoCEConfig.for_variant(
            variant, ExpertLayout(experts_per_group=4, single_group_experts=16, router_top_k=2, adapter_dim=64),
            num_clusters=4)
        routed = moce is not None and moce.num_groups > 1
        clusters = {row_id: i % 4 for i, row_id in enumerate(rows["id"].to_list())} if routed else None
        stamps: list[float] = []
        losses: list[float] = []

        def on_log(logs, stamps=stamps, losses=losses):
            if "loss" in logs:
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                losses.append(float(logs["loss"]))

        torch._dynamo.reset()  # compiled code is cached per code object: each variant compiles afresh
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        train(base_dir, rows, clusters, moce, config, root / variant, on_log=on_log,
                       num_clusters=4 if routed else None)
        steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
        step = statistics.median(steps)
        step_seconds[variant] = step
        build = stamps[0] - began  # load, quantise, attach, compile and the first step
        tokens = config.per_device_batch_size * config.grad_accum * args.max_length
        print(f"{variant:<15}{build:>9.1f}{step:>9.3f}{min(steps):>8.3f}{max(steps):>8.3f}{tokens / step:>9.0f}"
              f"{torch.cuda.max_memory_allocated() / 2**30:>10.2f}{losses[0]:>7.2f}>{losses[-1]:<6.2f}", flush=True)
        print(f"  ({len(steps)} steps timed after {args.warmup} warm-up; whole run {time.perf_counter() - began:.0f} s)")
    if len(step_seconds) > 1 and "lora" in step_seconds:
        for variant, seconds in step_seconds.items():
            if variant != "lora":
                print(f"{variant}_over_lora_qlora_step: {seconds / step_seconds['lora']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
