"""Where the time of one request to a merged MoCE model goes, dual-stage routing included, per phase:
tokenise the prompt, embed its request with the clustering encoder, assign the nearest centroid, prefill, and
each decoding step; p50 and p95 over repeats, at batch 1 and 16, and the embedder's share of the whole request.

    python -m bench.latency --device cuda --shape paper --embedders e5-large,instructor-xl   # one GPU
    python -m bench.latency --shape demo --embedders minilm                                 # the demo, on CPU
    python -m bench.latency --shape tiny --embedders tiny --new-tokens 4 --repeats 2        # seconds (tests)

Weights are random (the cost of a forward pass does not depend on them): the language model is the base of the
shape with the merged `moce` experts attached (4 groups x 4 experts, top-2), the encoders are random encoders of
the named checkpoints' shapes saved as sentence-transformers directories and loaded through the project's own
embedder loader and router (`moce_model.clustering.embedding.load_embedder`, `moce_model.clustering.router.ClusterRouter`).
Tokenisation uses a character-level tokenizer (no Hub on the GPU machine), so its time is a lower bound for a BPE
tokenizer. Decoding uses transformers' default dynamic cache, eager.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.generate import attach_experts
from bench.train_step import SHAPES, build_base


@dataclass(frozen=True)
class EncoderShape:
    """An encoder of a published checkpoint's dimensions (transformers config class name + its sizes)."""

    name: str
    architecture: str
    sizes: dict
    kind: str = "sentence-transformers"


ENCODERS = {
    "minilm": EncoderShape("all-MiniLM-L6-v2 dims", "bert", dict(hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536)),
    "e5-large": EncoderShape("e5-large dims", "bert", dict(hidden_size=1024, num_hidden_layers=24,
                             num_attention_heads=16, intermediate_size=4096)),
    "instructor-xl": EncoderShape("instructor-xl dims (T5-XL encoder)", "t5", dict(d_model=2048, num_layers=24,
                                  num_heads=32, d_kv=64, d_ff=5120), kind="instructor"),
    "tiny": EncoderShape("tiny", "bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)),
}
PHASES = ("tokenise", "embed", "assign", "prefill", "decode_per_token")


def save_random_encoder(shape: EncoderShape, directory: Path) -> Path:
    """A random encoder of `shape` as a sentence-transformers directory (mean pooling, unit-norm output)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from tests.tiny_models import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if shape.architecture == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=512, **shape.sizes))
    else:
        model = T5EncoderModel(T5Config(vocab_size=vocab, **shape.sizes))
    raw = directory / "raw"
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=256)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()]).save(str(directory / "st"))
    return directory / "st"


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95))


def timed(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def request_phases(model, tokenizer, router, prompts: list[str], requests: list[str], new_tokens: int,
                   device: torch.device) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Seconds of each phase of one batched request (decode: per generated token), the greedy tokens generated
    [B, new_tokens] and the groups the router chose [B]."""
    out: dict[str, object] = {}
    seconds = {
        "tokenise": timed(lambda: out.update(batch=tokenizer(prompts, return_tensors="pt", padding=True)), device),
        "embed": timed(lambda: out.update(vectors=router.encoder.encode(requests)), device),
    }
    seconds["assign"] = timed(lambda: out.update(groups=router.assign_embeddings(out["vectors"])), device)
    batch = {key: value.to(device) for key, value in out["batch"].items()}
    groups = torch.as_tensor(out["groups"], device=device)
    with torch.inference_mode():
        seconds["prefill"] = timed(lambda: out.update(prefill=model(**batch, cluster_ids=groups, use_cache=True)),
                                   device)
        cache = out["prefill"].past_key_values
        token = out["prefill"].logits[:, -1:].argmax(-1)
        mask = batch["attention_mask"]
        steps, generated = [], [token]
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)

            def step(token=token, mask=mask):
                out["step"] = model(input_ids=token, attention_mask=mask, past_key_values=cache, cluster_ids=groups,
                                    use_cache=True)

            steps.append(timed(step, device))
            token = out["step"].logits[:, -1:].argmax(-1)
            generated.append(token)
    seconds["decode_per_token"] = statistics.median(steps) if steps else 0.0
    return seconds, torch.cat(generated, dim=1), groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--embedders", default="minilm", help=f"comma-separated, of {sorted(ENCODERS)}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-chars", type=int, default=256, help="prompt length (characters = tokens here)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = [name for name in args.embedders.split(",") if name]
    unknown = sorted(set(names) - set(ENCODERS))
    if unknown:
        parser.error(f"unknown embedder(s) {unknown}; choose from {sorted(ENCODERS)}")

    from moce_model.clustering.embedding import load_embedder
    from moce_model.clustering.router import ClusterRouter
    from tests.tiny_models import make_char_tokenizer

    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = attach_experts(build_base(shape, device, dtype), shape.adapter_dim)
    tokenizer = make_char_tokenizer()
    tokenizer.padding_side = "left"
    words = "Write a function that returns the sum of the squares of a list of integers and explain it. "
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; {shape.name} {dtype} + moce experts; prompt {args.prompt_chars} tokens, "
          f"{args.new_tokens} new tokens; p50 / p95 over {args.repeats} requests, milliseconds")
    print(f"{'embedder':<38}{'batch':>6}" + "".join(f"{phase:>20}" for phase in PHASES)
          + f"{'request_ms':>14}{'embed_share':>13}")
    with tempfile.TemporaryDirectory() as temp:
        for embedder_name in names:
            encoder_shape = ENCODERS[embedder_name]
            directory = save_random_encoder(encoder_shape, Path(temp) / embedder_name)
            spec = {"model": str(directory), "kind": encoder_shape.kind}
            if encoder_shape.kind == "instructor":
                spec["instruction"] = "Represent the instruction for clustering:"
            embedder = load_embedder(spec, device=str(device))
            dimension = embedder.encode(["probe"]).shape[1]
            centroids = np.random.default_rng(0).standard_normal((4, dimension)).astype(np.float32)
            router = ClusterRouter(embedder, centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
            for batch in [int(b) for b in args.batches.split(",") if b]:
                prompts = [(f"{i} " + words * (args.prompt_chars // len(words) + 1))[: args.prompt_chars]
                           for i in range(batch)]
                runs = [request_phases(model, tokenizer, router, prompts, prompts, args.new_tokens, device)[0]
                        for _ in range(args.repeats + 1)][1:]  # the first request warms up every kernel
                # the first new token comes out of the prefill; each of the others is one decoding step
                totals = [sum(r[p] for p in PHASES[:-1]) + r["decode_per_token"] * (args.new_tokens - 1) for r in runs]
                shares = [r["embed"] / total for r, total in zip(runs, totals)]
                cells = "".join(f"{'%.2f / %.2f' % tuple(1e3 * v for v in percentiles([r[p] for r in runs])):>20}"
                                for p in PHASES)
                p50, p95 = percentiles(totals)
                print(f"{encoder_shape.name:<38}{batch:>6}{cells}{'%.0f / %.0f' % (1e3 * p50, 1e3 * p95):>14}"
                      f"{statistics.median(shares):>12.1%}", flush=True)
            del embedder, router
    return 0


if __name__ == "__main__":
    sys.exit(main())
