"""Evaluate model directories on the demo benchmarks and print the results and the time taken.

    python -m moce_model.evaluation --model base=/path/to/base --model moce=/path/to/merged \
        [--n-per-domain 8] [--n-loss-per-domain 200] [--prompt-format auto|chat_template|human_assistant] \
        [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch

from moce_model.common.logs import quiet_library_logs
from moce_model.data.prompt_format import AUTO, PROMPT_FORMATS
from moce_model.evaluation.report import build_report
from moce_model.evaluation.runner import evaluate_model
from moce_model.evaluation.suites import demo_benchmarks


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive number of items or 'all'")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="VARIANT=DIR",
                        help="a model directory and its variant name; repeat for several models")
    parser.add_argument("--n-per-domain", type=int, default=8,
                        help="held-out synthetic items per domain answered by generation")
    parser.add_argument("--n-loss-per-domain", type=int, default=None,
                        help="held-out synthetic items per domain scored by held-out loss (default: --n-per-domain)")
    parser.add_argument("--humaneval-items", type=_count_or_all, default=6, help="a number or 'all'")
    parser.add_argument("--gsm8k", type=Path, default=None, help="GSM8K-format JSONL (default: realmix sample)")
    parser.add_argument("--gsm8k-items", type=_count_or_all, default=6, help="a number or 'all'")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-format", default=AUTO, choices=[AUTO, *PROMPT_FORMATS],
                        help="the prompt format the models were trained with")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap every benchmark's generated tokens at this many (default: each benchmark's own)")
    parser.add_argument("--show-items", action="store_true", help="print every prompt's completion")
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: need at least 1 token")
    # Progress lines (loading, each benchmark done) on stderr as the evaluation goes; libraries' warnings only.
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_library_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = demo_benchmarks(n_per_domain=args.n_per_domain, humaneval_items=args.humaneval_items,
                            gsm8k_path=args.gsm8k, gsm8k_items=args.gsm8k_items, seed=args.seed,
                            n_loss_per_domain=args.n_loss_per_domain)
    tables, scores = [], []
    pl.Config.set_tbl_rows(100)
    for entry in args.model:
        variant, sep, directory = entry.partition("=")
        if not sep or not variant or not directory:
            parser.error(f"--model {entry!r}: expected VARIANT=DIR")
        started, cpu_started = time.perf_counter(), time.process_time()
        result = evaluate_model(Path(directory), variant, specs, batch_size=args.batch_size, seed=args.seed,
                                device=args.device, dtype=args.dtype, prompt_format=args.prompt_format,
                                max_new_tokens=args.max_new_tokens)
        # CPU time is printed too: on a shared machine wall time says more about the neighbours.
        print(f"{variant}: evaluated in {time.perf_counter() - started:.1f} s wall, "
              f"{time.process_time() - cpu_started:.1f} s CPU ({torch.get_num_threads()} threads)", flush=True)
        print(result.table)
        for benchmark, note in result.notes.items():
            print(f"  {benchmark}: {note}")
        if args.show_items:
            for row in result.items.iter_rows(named=True):
                print(f"--- {row['benchmark']} {row['item_id']} correct={row['correct']} cluster={row['cluster']}\n"
                      f"{row['completion']}")
        tables.append(result.table)
        scores.append(result.item_scores)
    print(build_report(tables, scores).markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
