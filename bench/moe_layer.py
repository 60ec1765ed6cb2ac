"""Speed of the batched MoCE expert layer against the reference loop, and the train-step cost of routing.

    python -m bench.moe_layer                 # everything (a few minutes on 2 CPU cores)
    python -m bench.moe_layer --skip-train-step
    python -m bench.moe_layer --decode-only     # one token per row: gathered vs all-groups path
    python -m bench.moe_layer --token-router ac   # also the AC router's cost beside the linear router's

Section 1 times forward+backward of the routed experts (routers + adapters) with the batched implementation
and with the reference code's loop (groups x experts, boolean masks on the flattened tokens), side by side,
in float32 and, at the paper shape, also under bf16 autocast (the paper's training precision), after
checking that both give the same output.
Section 2 times a LoRA + experts train step of a SmolLM2-135M-shaped model (random weights), `moce` against
`dense_adapter`, interleaved so that machine load hits both alike, and the peak memory of each variant
measured in its own subprocess. The last two lines are `speedup_paper_shape_fp32: X` and
`speedup_paper_shape: X` (bf16 autocast).
Section 1 ends with a decoding step (one token per row, inference) at 1-64 rows: each row's group weights
gathered against every group's experts on every row with the other groups masked, the two ways the layer can
run; `_grouped` takes the second for one-token rows from `ALL_GROUPS_MIN_ROWS_PER_GROUP` rows per group up.
With `--token-router ac`, section 1 also times the batched layer with the AC router (feature weights from the
previous block's assignments, then the linear router) against the linear router, and section 2 adds a
`moce+ac` train step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from bench.timing import elapsed_seconds
from moce_model.model.ac_router import adaptive_clustering_token_weights
from moce_model.model.experts import AdapterExperts, reference_expert_forward

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


@dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int
    intermediate: int
    groups: int
    experts: int
    top_k: int
    adapter_dim: int
    batch: int
    seq_len: int


DEMO = LayerShape("demo (SmolLM2-135M dims)", 576, 1536, 4, 4, 2, 16, 8, 256)
PAPER = LayerShape("paper (LLaMA-2-7B dims)", 4096, 11008, 4, 4, 2, 64, 4, 512)
FP32 = "fp32"
BF16_AUTOCAST = "bf16 autocast"


def time_layer(
    shape: LayerShape, repeats: int, include_base_mlp: bool, bf16_autocast: bool = False,
    device: torch.device = torch.device("cpu"),
) -> tuple[float, float]:
    """(batched seconds, reference seconds) for one forward+backward at `shape`.

    Weights and inputs are float32; with `bf16_autocast` the forward runs under bf16 autocast, as the HF
    Trainer runs it with bf16=True (the paper's QLoRA setting keeps the experts in float32).
    """
    torch.manual_seed(0)
    experts = AdapterExperts(shape.hidden, shape.groups, shape.experts, shape.adapter_dim, shape.top_k,
                             scaling=1.0, dropout=0.0, device=device)
    with torch.no_grad():
        experts.adapter_up.normal_(std=0.02)
    base_mlp = None
    if include_base_mlp:
        base_mlp = LlamaMLP(LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate)).to(device)
        base_mlp.requires_grad_(False)  # frozen base, as in training
    x = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device, requires_grad=True)
    down_input = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device, requires_grad=True)
    group_ids = torch.arange(shape.batch, device=device) % shape.groups
    upstream = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device)

    def run(layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            experts.zero_grad(set_to_none=True)
            x.grad = down_input.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
                down = base_mlp(x) if base_mlp is not None else down_input
                out = layer(x, down)
            (out.float() * upstream).sum().backward()

        return step

    batched_layer = lambda a, b: experts(a, b, group_ids)[0]  # noqa: E731
    reference_layer = lambda a, b: reference_expert_forward(experts, a, b, group_ids)  # noqa: E731
    # Both must do the same work, or the ratio means nothing.
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        down = base_mlp(x) if base_mlp is not None else down_input
        batched_out, reference_out = batched_layer(x, down).float(), reference_layer(x, down).float()
        if bf16_autocast:
            # bf16 router logits have near-ties that the two implementations' different matmul orders may break
            # differently, so a few tokens pick another expert: allow that for at most 0.1% of the outputs.
            far = ~torch.isclose(batched_out, reference_out, atol=0.05, rtol=0.02)
            assert far.float().mean() < 1e-3, f"{int(far.sum())} of {far.numel()} outputs differ"
        else:
            torch.testing.assert_close(batched_out, reference_out)
    batched = run(batched_layer)
    reference = run(reference_layer)
    # Interleave so that background load affects both implementations alike.
    batched_times, reference_times = [], []
    for _ in range(2):  # warm-up (on a GPU: allocator, cuBLAS handles)
        batched()
        reference()
    for _ in range(repeats):
        batched_times.append(elapsed_seconds(batched, device))
        reference_times.append(elapsed_seconds(reference, device))
    return statistics.median(batched_times), statistics.median(reference_times)


def time_token_routers(
    shape: LayerShape, repeats: int, bf16_autocast: bool = False, device: torch.device = torch.device("cpu"),
) -> tuple[float, float]:
    """(linear seconds, AC seconds) for one forward+backward of the batched experts + routers at `shape`.

    The AC side includes what a block adds: the feature weights from the previous block's top-1 experts (here
    a fixed random assignment, which costs the same as a real one) and the scaled router input.
    """
    torch.manual_seed(0)
    experts = AdapterExperts(shape.hidden, shape.groups, shape.experts, shape.adapter_dim, shape.top_k,
                             scaling=1.0, dropout=0.0, device=device)
    with torch.no_grad():
        experts.adapter_up.normal_(std=0.02)
    x = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device, requires_grad=True)
    down = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device, requires_grad=True)
    group_ids = torch.arange(shape.batch, device=device) % shape.groups
    previous_top_expert = torch.randint(0, shape.experts, (shape.batch, shape.seq_len), device=device)
    token_mask = torch.ones(shape.batch, shape.seq_len, device=device)
    upstream = torch.randn(shape.batch, shape.seq_len, shape.hidden, device=device)

    def linear_layer() -> torch.Tensor:
        return experts(x, down, group_ids)[0]

    def ac_layer() -> torch.Tensor:
        weights = adaptive_clustering_token_weights(x, previous_top_expert, token_mask, shape.experts)
        return experts(x, down, group_ids, weights)[0]

    def run(layer: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            experts.zero_grad(set_to_none=True)
            x.grad = down.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
                out = layer()
            (out.float() * upstream).sum().backward()

        return step

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        # The two must route differently, or the AC side did not take effect and the comparison is void.
        if torch.equal(linear_layer(), ac_layer()):
            raise AssertionError("the AC router gave the linear router's output: its feature weights had no effect")
    linear, adaptive = run(linear_layer), run(ac_layer)
    linear_times, ac_times = [], []
    for _ in range(2):
        linear()
        adaptive()
    for _ in range(repeats):
        linear_times.append(elapsed_seconds(linear, device))
        ac_times.append(elapsed_seconds(adaptive, device))
    return statistics.median(linear_times), statistics.median(ac_times)


def token_router_section(repeats: int, device: torch.device) -> None:
    print("\n## token router cost, batched experts+routers forward+backward: linear vs AC (feature weights from "
          "the previous block's assignments)")
    print(f"{'shape':<27}{'precision':<16}{'tokens':>8}{'linear_ms':>11}{'ac_ms':>9}{'ac/linear':>11}")
    for shape, precision in ((DEMO, FP32), (PAPER, FP32), (PAPER, BF16_AUTOCAST)):
        shape_repeats = 20 if device.type == "cuda" else repeats
        linear, adaptive = time_token_routers(shape, shape_repeats, precision == BF16_AUTOCAST, device)
        print(f"{shape.name:<27}{precision:<16}{shape.batch * shape.seq_len:>8}{linear * 1e3:>11.1f}"
              f"{adaptive * 1e3:>9.1f}{adaptive / linear:>10.2f}x", flush=True)


# ------------------------------------------------------------------------------------------ decoding step

DECODE_BATCHES = (1, 4, 8, 16, 64)
# Layer calls per timed sample: one is microseconds on a GPU, up to a third of a second on the CPU.
DECODE_CALLS = {"cuda": 50, "cpu": 3}


def time_decode_paths(shape: LayerShape, batch: int, repeats: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[float, float]:
    """(gathered seconds, all-groups seconds) per call of the experts + routers on one token per row, inference,
    weights in `dtype` (a merged model's), after checking that both paths give the same output."""
    torch.manual_seed(0)
    experts = AdapterExperts(shape.hidden, shape.groups, shape.experts, shape.adapter_dim, shape.top_k,
                             scaling=1.0, dropout=0.0, device=device, dtype=dtype).eval()
    with torch.no_grad():
        experts.adapter_up.normal_(std=0.02)
    x = torch.randn(batch, 1, shape.hidden, device=device, dtype=dtype)
    down = torch.randn(batch, 1, shape.hidden, device=device, dtype=dtype)
    group_ids = torch.arange(batch, device=device) % shape.groups
    with torch.inference_mode():
        gathered_out = experts._gathered(x, down, group_ids, None)[0]
        all_groups_out = experts._one_token_rows(x, down, group_ids, None)[0]
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(all_groups_out, gathered_out, **tolerance)

    per_sample = DECODE_CALLS.get(device.type, 3)

    def calls(path: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(per_sample):
                    path(x, down, group_ids, None)
        return run

    gathered, all_groups = calls(experts._gathered), calls(experts._one_token_rows)
    for _ in range(2):
        gathered()
        all_groups()
    gathered_times, all_groups_times = [], []
    for _ in range(repeats):  # interleaved, so that background load hits both alike
        gathered_times.append(elapsed_seconds(gathered, device) / per_sample)
        all_groups_times.append(elapsed_seconds(all_groups, device) / per_sample)
    return statistics.median(gathered_times), statistics.median(all_groups_times)


def decode_section(repeats: int, device: torch.device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\n## decoding step, one token per row, experts + routers ({dtype}, inference): each row's group weights "
          "gathered (a copy per row) vs every group's experts on every row, other groups masked")
    print(f"{'shape':<27}{'rows':>6}{'gathered_us':>13}{'all_groups_us':>15}{'all/gathered':>14}")
    for shape in (DEMO, PAPER):
        for batch in DECODE_BATCHES:
            gathered, all_groups = time_decode_paths(shape, batch, repeats, dtype, device)
            print(f"{shape.name:<27}{batch:>6}{gathered * 1e6:>13.1f}{all_groups * 1e6:>15.1f}"
                  f"{all_groups / gathered:>13.2f}x", flush=True)
            print(f"decode_all_groups_over_gathered_{shape.name.split()[0]}_rows{batch}: {all_groups / gathered:.3f}")


# ------------------------------------------------------------------------------------------ train step


AC_SUFFIX = "+ac"


def build_trainable(label: str, seq_len: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """`label`: a variant name, with `+ac` for its AC-router form (`moce+ac`)."""
    from transformers import AutoModelForCausalLM

    from moce_model.model.adapters import add_lora
    from moce_model.model.config import MoCEConfig
    from moce_model.model.modeling import MoCEForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M))
    variant = label.removesuffix(AC_SUFFIX)
    token_router = "ac" if label.endswith(AC_SUFFIX) else "linear"
    config = MoCEConfig(variant=variant, num_groups=4, experts_per_group=4, top_k=2, adapter_dim=16,
                        token_router=token_router)
    model = add_lora(MoCEForCausalLM.from_base(base, config), r=8, alpha=16, dropout=0.05)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (4, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "cluster_ids": torch.arange(4) % 4}
    return model, optimizer, batch


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB (VmRSS: now, VmHWM: peak of this process image)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(variant: str, seq_len: int, steps: int) -> None:
    """Run in a fresh subprocess: resident memory after building one variant, and its peak over train steps.

    VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
    """
    model, optimizer, batch = build_trainable(variant, seq_len)
    rss_after_build = _status_mib("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # restart the peak counter after the build
        peak_scope = "train steps"
    except OSError:
        peak_scope = "build + train steps"
    for _ in range(steps):
        train_step(model, optimizer, batch)
    print(json.dumps({"variant": variant, "peak_rss_mib": _status_mib("VmHWM"), "peak_scope": peak_scope,
                      "rss_after_build_mib": rss_after_build}))


def measure_peak_memory(variant: str, seq_len: int, steps: int) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.moe_layer", "--memory-child", variant, "--seq-len", str(seq_len),
         "--steps", str(steps)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory measurement of {variant} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def train_step_section(seq_len: int, steps: int, token_router: str = "linear") -> None:
    print(f"\n## train step, LoRA r=8 + experts, SmolLM2-135M-shaped model (random weights), 4x{seq_len} tokens")
    print("   moce: 4 groups x 4 experts, top-2, adapter 16; dense_adapter: one adapter 16, no router")
    labels = ["moce", "dense_adapter"]
    if token_router == "ac":
        print("   moce+ac: moce with the AC router")
        labels.insert(1, "moce" + AC_SUFFIX)
    # Memory first, each variant in its own fresh process, before this process holds any model.
    memory = {label: measure_peak_memory(label, seq_len, steps=2) for label in labels}
    models = {label: build_trainable(label, seq_len) for label in labels}
    for variant, (model, optimizer, batch) in models.items():
        train_step(model, optimizer, batch)  # warm-up
    times: dict[str, list[float]] = {variant: [] for variant in models}
    for _ in range(steps):
        for variant, (model, optimizer, batch) in models.items():
            started = time.perf_counter()
            train_step(model, optimizer, batch)
            times[variant].append(time.perf_counter() - started)
    del models
    median = {variant: statistics.median(values) for variant, values in times.items()}
    print(f"   peak RSS measured over {memory['moce']['peak_scope']} in a fresh process per variant")
    print(f"{'variant':<15}{'step_s (median)':>17}{'tokens/s':>10}{'peak_rss_MiB':>14}{'rss_after_build_MiB':>21}")
    for variant in median:
        tokens_per_second = 4 * seq_len / median[variant]
        print(f"{variant:<15}{median[variant]:>17.3f}{tokens_per_second:>10.0f}"
              f"{memory[variant]['peak_rss_mib']:>14.0f}{memory[variant]['rss_after_build_mib']:>21.0f}")
    print(f"train_step_ratio_moce_over_dense_adapter: {median['moce'] / median['dense_adapter']:.3f}")
    if "moce" + AC_SUFFIX in median:
        print(f"train_step_ratio_moce_ac_over_moce: {median['moce' + AC_SUFFIX] / median['moce']:.3f}")


def layer_section(repeats: int, device: torch.device) -> dict[tuple[str, str, bool], float]:
    print("## MoE layer forward+backward: batched (per-sequence group weights, bmm) vs reference loop "
          "(groups x experts, boolean masks)")
    print(f"{'shape':<27}{'precision':<16}{'timed part':<34}{'tokens':>8}{'batched_ms':>12}{'reference_ms':>14}"
          f"{'speedup':>9}")
    rows = [
        (DEMO, FP32, "experts+routers (base MLP excluded)", False, repeats),
        (DEMO, FP32, "full block (base MLP + experts)", True, repeats),
        (PAPER, FP32, "experts+routers (base MLP excluded)", False, max(3, repeats // 2)),
        (PAPER, BF16_AUTOCAST, "experts+routers (base MLP excluded)", False, repeats),
    ]
    speedups = {}
    for shape, precision, label, with_base, shape_repeats in rows:
        if device.type == "cuda":
            shape_repeats = 20  # milliseconds each on a GPU
        batched, reference = time_layer(shape, shape_repeats, with_base, bf16_autocast=precision == BF16_AUTOCAST,
                                        device=device)
        speedups[(shape.name, precision, with_base)] = reference / batched
        print(f"{shape.name:<27}{precision:<16}{label:<34}{shape.batch * shape.seq_len:>8}{batched * 1e3:>12.1f}"
              f"{reference * 1e3:>14.1f}{reference / batched:>8.2f}x", flush=True)
    print("   (paper shape: the 11008-wide base MLP runs identically in both and is excluded from the timing)")
    print(f"   ({BF16_AUTOCAST}: float32 weights, forward under bf16 autocast, as the Trainer runs the paper's "
          "QLoRA setting with bf16=True)")
    return speedups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-train-step", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-layer", action="store_true", help="only the train-step section")
    parser.add_argument("--decode-only", action="store_true", help="only the decoding-step comparison")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU train step is bench.train_step)")
    parser.add_argument("--token-router", choices=("linear", "ac"), default="linear",
                        help="ac: also time the AC router beside the linear one (layer and train step)")
    parser.add_argument("--memory-child", choices=("moce", "moce" + AC_SUFFIX, "dense_adapter"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        peak_memory_child(args.memory_child, args.seq_len, args.steps)
        return 0

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, device {device.type}")
    if args.decode_only:
        decode_section(max(5, args.repeats), device)
        return 0
    speedups = {} if args.skip_layer else layer_section(args.repeats, device)
    if not args.skip_layer and args.token_router == "ac":
        token_router_section(args.repeats, device)
    if not args.skip_layer:
        decode_section(max(5, args.repeats), device)
    if not args.skip_train_step and device.type == "cpu":
        train_step_section(args.seq_len, args.steps, args.token_router)
    if speedups:
        print(f"speedup_paper_shape_fp32: {speedups[(PAPER.name, FP32, False)]:.2f}")
        # The paper trains with bf16 compute, so the paper shape's headline figure is at that precision.
        print(f"speedup_paper_shape: {speedups[(PAPER.name, BF16_AUTOCAST, False)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
