"""Held-out loss scoring of a routed `moce` model, one item per forward pass against batches that mix clusters,
side by side in one run.

    python -m bench.evaluation                                   # demo shape (SmolLM2-135M dims), fp32, 2 threads
    python -m bench.evaluation --shape tiny --items 6 --batch-size 4 --repeats 1   # seconds (what the tests run)

The model is the demo-sized base with routed experts attached (4 groups x 4 experts, top-2; random weights: the
cost of a forward pass does not depend on them). The items are synthetic held-out items of every domain, rendered
in the chat format and scored as the evaluation scores them (`MoCELM.loglikelihood_with_counts`, the reference
answer after the prompt); a router that spreads the items over the four clusters routes them, so batches mix
clusters. Tokenisation is character-level (no Hub needed), so an item has more tokens than with the demo's BPE
tokenizer: `tokens/item` says how many. Both ways score the same items in the same process, interleaved
`--repeats` times (median), and each item's loss is compared between them (`max_abs_loss_diff`). `--autocast` adds
the batched way under bf16 autocast (`evaluation.autocast: bfloat16`): its speed and its largest loss difference
from float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.generate import attach_experts
from bench.train_step import SHAPES, build_base


class SpreadingRouter:
    """Four clusters by a checksum of the routing text: neighbouring items land in different clusters."""

    num_clusters = 4

    def assign(self, texts):
        return np.array([sum(text.encode()) % self.num_clusters for text in texts])


def build_lm(shape_name: str, dtype: torch.dtype, batch_size: int):
    from moce_model.evaluation.lm import MoCELM
    from tests.tiny_models import make_char_tokenizer

    shape = SHAPES[shape_name]
    model = attach_experts(build_base(shape, torch.device("cpu"), dtype).eval(), shape.adapter_dim)
    return MoCELM.from_objects(model, make_char_tokenizer(), router=SpreadingRouter(), batch_size=batch_size,
                               max_length=2048)


def held_out_pairs(lm, items: int, seed: int) -> list[tuple[str, str]]:
    from moce_model.data.synthetic import DOMAINS, generate_synthetic

    per_domain = -(-items // len(DOMAINS))
    by_domain = [generate_synthetic(per_domain, seed=seed, split="heldout", domains=[d]).to_dicts() for d in DOMAINS]
    rows = [row for same_index in zip(*by_domain) for row in same_index][:items]  # the domains in turn
    return [(lm.render_prompt(r["system"], r["instruction"], r["input"]),
             lm.render_continuation(r["system"], r["instruction"], r["input"], r["response"])) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autocast", action="store_true",
                        help="also the batched way under bf16 autocast (float32 weights, bf16 matmuls)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()
    lm = build_lm(args.shape, dtype, args.batch_size)
    pairs = held_out_pairs(lm, args.items, args.seed)
    clusters = lm.clusters_for([context for context, _ in pairs])
    tokens = statistics.mean(len(lm.tok_encode(c + r)) for c, r in pairs)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; {SHAPES[args.shape].name} {args.dtype}; "
          f"{len(pairs)} held-out items, {tokens:.0f} tokens/item, clusters {sorted(set(clusters))}; "
          f"batch {args.batch_size}; median of {args.repeats}")

    def score(batch_size: int, autocast: torch.dtype | None) -> tuple[float, list[float]]:
        lm.batch_size = batch_size
        lm.mixed_precision_dtype = autocast  # HFLM's autocast of each forward pass (evaluation.autocast)
        started = time.perf_counter()
        scored = lm.loglikelihood_with_counts(pairs, move_trailing_whitespace=False)
        return time.perf_counter() - started, [-logprob / count for logprob, count, _ in scored]

    ways = {"per_item": (1, None), "batched": (args.batch_size, None)}
    if args.autocast:  # the same batches with the matmuls in bf16: what `evaluation.autocast: bfloat16` buys
        ways["batched_bf16_autocast"] = (args.batch_size, torch.bfloat16)
    for batch_size, autocast in ways.values():  # warm-up
        score(batch_size, autocast)
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    losses: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved: drift of a shared machine hits every way alike
        for name, (batch_size, autocast) in ways.items():
            elapsed, losses[name] = score(batch_size, autocast)
            seconds[name].append(elapsed)
    rates = {name: len(pairs) / statistics.median(values) for name, values in seconds.items()}
    load_after = os.getloadavg()
    diffs = {name: max(abs(a - b) for a, b in zip(losses["per_item"], losses[name], strict=True)) for name in ways}
    print(f"{'way':<24}{'items/s':>10}{'median_s':>10}{'max_abs_loss_diff_vs_per_item':>32}")
    for name, values in seconds.items():
        print(f"{name:<24}{rates[name]:>10.2f}{statistics.median(values):>10.2f}{diffs[name]:>32.2e}")
    print(f"batched_over_per_item_items_per_s: {rates['batched'] / rates['per_item']:.2f}")
    print(f"max_abs_loss_diff: {diffs['batched']:.2e}")
    if args.autocast:
        print(f"bf16_autocast_over_batched_items_per_s: {rates['batched_bf16_autocast'] / rates['batched']:.2f}")
    print(f"load_average_1_5_15: before {' '.join(f'{v:.2f}' for v in load_before)}, "
          f"after {' '.join(f'{v:.2f}' for v in load_after)} ({os.cpu_count()} cpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
