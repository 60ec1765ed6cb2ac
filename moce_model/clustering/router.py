"""Stage 1 of MoCE routing: raw text -> expert group, by the nearest k-means centroid of its embedding.

Only the input side of a request (system + instruction + input) is embedded, built by `routing_text`: the
same function makes the texts the centroids are fit on, the texts of training rows, of generation prompts
and of benchmark items, so an item is routed on exactly what the clusters were defined on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from moce_model.clustering.encoder import load_embedder
from moce_model.clustering.soft import SoftAssignmentRule, SoftClusters
from moce_model.data.prompt_format import PROMPT_FORMATS, routing_text
from moce_model.variants import MOCE_MODEL_TYPE, check_clusters_match_groups

CENTROIDS_FILE = "centroids.npy"


EMBEDDER_FILE = "embedder.json"

# A model directory's own copy of its embedder (a local or packaged encoder, which `embedder.json` names by a path
# or a package that exist only where the model was made): the router reads it in place of the reference.
EMBEDDER_COPY_DIR = "embedder"

MODEL_CONFIG_FILE = "config.json"


class TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32, rows L2-normalised."""
        ...


def validate_centroids(centroids: np.ndarray, source: str) -> np.ndarray:
    array = np.asarray(centroids)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{source}: centroids must be a non-empty [k, d] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{source}: centroids must be floating point, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        row = int(np.argwhere(~np.isfinite(array))[0, 0])
        raise ValueError(f"{source}: centroid row {row} is not finite")
    return array


class ClusterRouter:
    """Assigns texts to the nearest centroid (Euclidean, on the encoder's L2-normalised embeddings).

    For unit-norm centroids (spherical k-means) this is the highest cosine similarity.
    """

    def __init__(self, encoder: TextEncoder, centroids: np.ndarray) -> None:
        self.encoder = encoder
        self.centroids = validate_centroids(centroids, source="ClusterRouter")
        self._half_squared_norms = 0.5 * np.einsum("kd,kd->k", self.centroids, self.centroids)

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def _scores(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"embeddings of shape {embeddings.shape} do not match centroids of dimension {self.centroids.shape[1]}"
            )
        # argmin |e - c|^2 == argmax (e.c - |c|^2 / 2), one matmul for the batch.
        return embeddings, embeddings @ self.centroids.T - self._half_squared_norms

    def assign_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return self._scores(embeddings)[1].argmax(axis=1).astype(np.int64)

    def assign_soft_embeddings(self, embeddings: np.ndarray, rule: SoftAssignmentRule) -> SoftClusters:
        """Nearest and second-nearest cluster of each embedding, with the weights of `rule`. The nearest is
        `assign_embeddings`'s (the same scores), so a hard row goes exactly where the hard rule sends it."""
        embeddings, scores = self._scores(embeddings)
        rows = np.arange(scores.shape[0])
        nearest = scores.argmax(axis=1)
        if self.num_clusters == 1:
            second = nearest.copy()
            weights = np.tile(np.array([1.0, 0.0]), (scores.shape[0], 1))
        else:
            others = scores.copy()
            others[rows, nearest] = -np.inf
            second = others.argmax(axis=1)
            # The two distances in float64 straight from the vectors: the scores lose the small gaps near a
            # boundary to cancellation.
            as64 = embeddings.astype(np.float64)
            centroids = self.centroids.astype(np.float64)
            weights = rule.weights(np.linalg.norm(as64 - centroids[nearest], axis=1),
                                   np.linalg.norm(as64 - centroids[second], axis=1))
        return SoftClusters(clusters=np.stack([nearest, second], axis=1).astype(np.int64), weights=weights)

    def assign(self, texts: Sequence[str]) -> np.ndarray:
        """int64 cluster id per text (texts are the input side: system + instruction + input)."""
        texts = self._checked_texts(texts)
        if not texts:
            return np.zeros(0, dtype=np.int64)
        return self.assign_embeddings(self.encoder.encode(texts))

    @staticmethod
    def _checked_texts(texts: Sequence[str]) -> list[str]:
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {index} is {type(text).__name__}, not str")
        return texts

    def assign_soft(self, texts: Sequence[str], rule: SoftAssignmentRule) -> SoftClusters:
        """`assign` with a second cluster for the texts near a boundary (`SoftAssignmentRule`)."""
        texts = self._checked_texts(texts)
        if not texts:
            return SoftClusters(clusters=np.zeros((0, 2), dtype=np.int64), weights=np.zeros((0, 2)))
        return self.assign_soft_embeddings(self.encoder.encode(texts), rule)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, encoder_factory: Callable[[Mapping[str, Any]], TextEncoder]
    ) -> "ClusterRouter":
        """Router of a merged model directory: `centroids.npy` + the embedder reference in `embedder.json`.

        The directory is checked first (`check_routing_files`): the centroids readable and finite, as many as
        the model's groups, the embedder reference present, the same as the one in `config.json`, and giving
        vectors of the centroids' dimension. Each error names the file.
        """
        model_dir = Path(model_dir)
        centroids, spec = check_routing_files(model_dir)
        embedder_path = model_dir / EMBEDDER_FILE
        try:
            encoder = encoder_factory(spec)
        except ValueError as err:
            raise ValueError(f"{embedder_path}: {err}") from err
        dimension = getattr(encoder, "dimension", None)
        if dimension is not None and int(dimension) != centroids.shape[1]:
            raise ValueError(
                f"{embedder_path}: the embedder {spec['model']!r} gives {int(dimension)}-d vectors but "
                f"{model_dir / CENTROIDS_FILE} holds {centroids.shape[1]}-d centroids; the directory mixes artifacts "
                f"of different runs"
            )
        return cls(encoder, centroids)


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable JSON ({type(err).__name__}: {err})") from err


def check_routing_files(model_dir: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The centroids and embedder reference of a model directory, checked against each other and the config.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for an unreadable or
    inconsistent one: centroids not a finite [k, d] float array; `config.json` of a cluster-routed variant whose
    `num_groups` differs from k (prompts would reach groups that were never trained, or fail for some clusters);
    `embedder.json` not an object with a non-empty `model`, or different from the embedder in `config.json`.
    """
    model_dir = Path(model_dir)
    centroids_path = model_dir / CENTROIDS_FILE
    embedder_path = model_dir / EMBEDDER_FILE
    if not centroids_path.is_file():
        raise FileNotFoundError(f"{centroids_path}: missing; this model directory cannot route by cluster")
    if not embedder_path.is_file():
        raise FileNotFoundError(f"{embedder_path}: missing; the embedder reference is needed to route")
    try:
        raw_centroids = np.load(centroids_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{centroids_path}: unreadable ({type(err).__name__}: {err})") from err
    centroids = validate_centroids(raw_centroids, source=str(centroids_path))
    spec = _read_json_file(embedder_path)
    if not isinstance(spec, dict):
        raise ValueError(f"{embedder_path}: expected a JSON object, got {type(spec).__name__}")
    if not isinstance(spec.get("model"), str) or not spec["model"].strip():
        raise ValueError(
            f"{embedder_path}: the embedder reference needs a non-empty 'model', got {spec.get('model')!r}"
        )
    config_path = model_dir / MODEL_CONFIG_FILE
    if config_path.is_file():
        config = _read_json_file(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")

        if config.get("model_type") == MOCE_MODEL_TYPE:

            try:
                check_clusters_match_groups(
                    config.get("variant"), config.get("num_groups"), centroids.shape[0],
                    where=f"{centroids_path} with {config_path}",
                )
            except ValueError as err:
                raise ValueError(f"{err}; merge the model again with the centroids it was trained with") from err
        if config.get("embedder") is not None and config["embedder"] != spec:
            raise ValueError(
                f"{embedder_path} names embedder {spec} but {config_path} was trained with {config['embedder']}"
            )
    return centroids, spec


def load_model_router(model_dir: str | Path) -> ClusterRouter | None:
    """The directory's router with the project's embedder loader, or None when it holds no centroids. The
    directory's copy of the embedder (`EMBEDDER_COPY_DIR`) is read where it has one."""
    model_dir = Path(model_dir)
    if not (model_dir / CENTROIDS_FILE).is_file():
        return None
    copy = model_dir / EMBEDDER_COPY_DIR
    if copy.is_dir():
        return ClusterRouter.from_model_dir(model_dir, lambda spec: load_embedder(spec, files=copy))
    return ClusterRouter.from_model_dir(model_dir, load_embedder)


class PromptRouter:
    """Stage 1 for a model handed token ids only (`generate(input_ids)`, `transformers.pipeline`): decode each
    prompt, take its request (system + user turn) out of the prompt format's markup when it is in one (else the
    whole text is the request), embed it and pick the nearest centroid."""

    def __init__(self, tokenizer: Any, router: ClusterRouter) -> None:
        self.tokenizer = tokenizer
        self.router = router
        self.formats = []
        for format_class in PROMPT_FORMATS.values():
            try:
                self.formats.append(format_class(tokenizer))
            except ValueError:  # e.g. chat_template for a tokenizer without one
                continue

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: Any | None = None) -> "PromptRouter | None":
        """The router of a model directory, with its tokenizer. `config`: the loaded model's config; given, the
        tokenizer is loaded without reading config.json again, which where the MoCE classes are not registered
        (the model loaded as remote code) would stop at transformers' question whether to trust remote code."""
        router = load_model_router(model_dir)
        if router is None:
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir, **({} if config is None else {"config": config})), router)

    def request_text(self, prompt: str) -> str | None:
        """The request inside a rendered prompt, or None when no prompt format of this tokenizer rendered it."""
        for prompt_format in self.formats:
            request = prompt_format.request_text(prompt)
            if request is not None:
                return request
        return None

    def assign_token_ids(self, input_ids: Any, attention_mask: Any | None = None) -> np.ndarray:
        """Cluster of each row of `input_ids` [B, T] (padding, where `attention_mask` is 0, left out)."""
        return self.router.assign(self._request_texts(input_ids, attention_mask))

    def assign_token_ids_soft(self, input_ids: Any, attention_mask: Any | None, rule: SoftAssignmentRule
                              ) -> SoftClusters:
        """`assign_token_ids` with a second cluster for the prompts near a boundary (`SoftAssignmentRule`)."""
        return self.router.assign_soft(self._request_texts(input_ids, attention_mask), rule)

    def _request_texts(self, input_ids: Any, attention_mask: Any | None) -> list[str]:
        texts = []
        for row, ids in enumerate(input_ids.tolist()):
            if attention_mask is not None:
                ids = [token for token, keep in zip(ids, attention_mask[row].tolist()) if keep]
            prompt = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text = self.request_text(prompt)
            if text is None:  # plain text (e.g. a text-generation pipeline without a template): all of it
                text = routing_text(None, self.tokenizer.decode(ids, skip_special_tokens=True), None)
            if not text:
                raise ValueError(f"prompt {row} of the batch is empty: nothing to route by")
            texts.append(text)
        return texts
