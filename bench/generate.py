"""Greedy decoding speed of a merged `moce` model against its base model, side by side in one run.

    python -m bench.generate --device cuda --shape paper       # LLaMA-2-7B dims, bf16, batch 1 and 16
    python -m bench.generate --shape tiny --new-tokens 8       # seconds on a CPU (what the tests run)

A merged model is the base model with LoRA folded in plus the routed experts (4 groups x 4 experts, top-2,
adapter 64); on random weights the decode cost is the same, so the base is built once and the experts are
attached to it and removed again. Each row generates exactly `--new-tokens` tokens after a `--prompt-len`
prompt. `dynamic` is transformers' default cache, eager; `static` is the static cache, which transformers
compiles for decoding on a GPU. Stage-1 routing (embed the prompt, nearest centroid) is not included here:
it runs once per request, before generation (`bench.latency` times it; docs/benchmarks-gpu.md).

With `--decode-paths both`, `moce` is timed a second time with every decoding step on the gathered path
(each row's group weights copied; `moce_gathered`), so that one run shows what the all-groups path, which
batches from 2 rows per group take, changes (`decode_moce_over_moce_gathered_*`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator

import torch

import moce_model.model.experts
from bench.timing import elapsed_seconds
from bench.train_step import SHAPES, build_base
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM


def attach_experts(base, adapter_dim: int) -> MoCEForCausalLM:
    config = MoCEConfig(variant="moce", num_groups=4, experts_per_group=4, router_top_k=2, adapter_dim=adapter_dim)
    model = MoCEForCausalLM.from_base(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.02)  # a trained model's experts are not zero
    return model.eval()


def detach_experts(base) -> None:
    for layer in base.model.layers:
        if hasattr(layer.mlp, "base_mlp"):
            layer.mlp = layer.mlp.base_mlp


def time_generation(model, batch: int, prompt_len: int, new_tokens: int, cache: str, device, repeats: int,
                    vocab_size: int, routed: bool, variants: tuple[str, ...] = ("moce",)) -> dict[str, float]:
    """Median seconds of each variant's generation with `model`: the variants that share the model (`moce` and
    `moce_gathered` differ only in the decoding path) are timed interleaved, so that drift of the machine over
    the run hits them alike."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab_size, (batch, prompt_len), generator=generator).to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    if routed:
        kwargs["cluster_ids"] = (torch.arange(batch) % 4).to(device)

    def runner(variant: str):
        def run() -> None:
            with decoding_path(variant), torch.inference_mode():
                out = model.generate(ids, **kwargs)
            assert out.shape[1] == prompt_len + new_tokens
        return run

    runs = {variant: runner(variant) for variant in variants}
    for run in runs.values():
        for _ in range(2):  # warm-up; compiles the decode step for the static cache (per path)
            run()
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, run in runs.items():
            times[variant].append(elapsed_seconds(run, device))
    return {variant: statistics.median(values) for variant, values in times.items()}


@contextlib.contextmanager
def decoding_path(variant: str) -> Iterator[None]:
    """`moce_gathered`: every decoding step on the gathered path; any other variant: the layer's own choice."""
    threshold = moce_model.model.experts.ALL_GROUPS_MIN_ROWS_PER_GROUP
    if variant == "moce_gathered":
        moce_model.model.experts.ALL_GROUPS_MIN_ROWS_PER_GROUP = 10**9
    try:
        yield
    finally:
        moce_model.model.experts.ALL_GROUPS_MIN_ROWS_PER_GROUP = threshold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--caches", default="dynamic,static")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-paths", choices=("auto", "both"), default="auto",
                        help="both: also time moce with every decoding step on the gathered path")
    args = parser.parse_args(argv)
    variants = ("base", "moce", "moce_gathered") if args.decode_paths == "both" else ("base", "moce")
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_base(shape, device, dtype).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; {shape.name} {dtype}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    gathered_column = f"{'gathered_s':>11}" if "moce_gathered" in variants else ""
    print(f"{'cache':<9}{'batch':>6}{'base_s':>9}{'moce_s':>9}{gathered_column}{'ratio':>8}{'moce_ms/token':>15}")
    ratios, path_ratios = {}, {}
    for cache in [c for c in args.caches.split(",") if c]:
        for batch in [int(b) for b in args.batches.split(",") if b]:
            common = (batch, args.prompt_len, args.new_tokens, cache, device, args.repeats, shape.base["vocab_size"])
            times = time_generation(base, *common, routed=False, variants=("base",))
            torch._dynamo.reset()
            moce = attach_experts(base, shape.adapter_dim)
            times |= time_generation(moce, *common, routed=True, variants=variants[1:])
            detach_experts(base)
            torch._dynamo.reset()
            ratios[(cache, batch)] = times["moce"] / times["base"]
            gathered = ""
            if "moce_gathered" in times:
                path_ratios[(cache, batch)] = times["moce"] / times["moce_gathered"]
                gathered = f"{times['moce_gathered']:>11.3f}"
            print(f"{cache:<9}{batch:>6}{times['base']:>9.3f}{times['moce']:>9.3f}{gathered}"
                  f"{ratios[(cache, batch)]:>8.3f}{times['moce'] / args.new_tokens * 1e3:>15.2f}", flush=True)
    for (cache, batch), value in path_ratios.items():
        print(f"decode_moce_over_moce_gathered_{cache}_batch{batch}: {value:.3f}")
    for (cache, batch), value in ratios.items():
        print(f"decode_moce_over_base_{cache}_batch{batch}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
