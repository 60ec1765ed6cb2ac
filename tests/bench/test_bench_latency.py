"""bench.latency runs end to end at a tiny shape on the CPU, and what it times is a real routed greedy decode."""

from __future__ import annotations

import numpy as np
import torch

from bench import latency
from bench.generate import attach_experts
from bench.train_step import SHAPES, build_base


def test_latency_prints_every_phase_for_each_batch(capsys) -> None:
    assert latency.main(["--device", "cpu", "--shape", "tiny", "--embedders", "tiny", "--batches", "1,3",
                         "--prompt-chars", "40", "--new-tokens", "3", "--repeats", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny ")]
    assert [int(row.split()[1]) for row in rows] == [1, 3]
    for row in rows:
        share = float(row.split()[-1].rstrip("%"))
        assert 0 < share < 100


def test_timed_request_decodes_greedily_in_the_routers_groups(tmp_path) -> None:
    from moce_model.clustering.embedding import load_embedder
    from moce_model.clustering.router import ClusterRouter
    from tests.tiny_models import make_char_tokenizer

    device = torch.device("cpu")
    model = attach_experts(build_base(SHAPES["tiny"], device, torch.float32), SHAPES["tiny"].adapter_dim)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=1.0)  # groups that change the output
    tokenizer = make_char_tokenizer()
    tokenizer.padding_side = "left"
    embedder = load_embedder({"model": str(latency.save_random_encoder(latency.ENCODERS["tiny"], tmp_path))},
                             device="cpu")
    prompts = ["Add two and three.", "Write a function that reverses a list of numbers."]
    vectors = embedder.encode(prompts)
    router = ClusterRouter(embedder, np.stack([vectors[1], vectors[0], -vectors[0], -vectors[1]]))
    seconds, generated, groups = latency.request_phases(model, tokenizer, router, prompts, prompts, 5, device)
    assert set(seconds) == set(latency.PHASES) and all(value >= 0 for value in seconds.values())
    assert groups.tolist() == [1, 0]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model.generation_config.eos_token_id = None  # the timed decode does not stop at an end token either
    with torch.inference_mode():
        expected = model.generate(**batch, cluster_ids=groups, max_new_tokens=5, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    assert generated.tolist() == expected[:, batch["input_ids"].shape[1]:].tolist()
