"""Per-request routing of the evaluator (`RequestRouting`, a part of `MoCELM`): each request's route (its
cluster, its two clusters with weights under soft assignment, or its `random_group` hash group) from its
routing text, and the routing arguments of a model call whose rows may each have their own route.

lm-eval requests are routed by their own document; the document's task is looked up by name, in the tasks the
evaluation handed over (`use_tasks`), else in one task index built with the run's `include_path` (lm-eval's
CLI hands the model neither its tasks nor its `--include_path`: `moce-lm-eval` passes the run's task folders as the
model argument `include_path`, which `lm_eval` itself needs spelled out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from lm_eval.api.instance import Instance

from moce_model.clustering.router import load_model_router
from moce_model.clustering.soft import SoftClusters
from moce_model.data.instructions import routing_text
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import random_group_ids

Item = TypeVar("Item")
Result = TypeVar("Result")


class SequenceRouter(Protocol):
    def assign(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class SoftRoute:
    """The route of a request a soft assignment gives two groups: its nearest and second-nearest cluster, and
    their weights (summing to 1). A hard request's route is its cluster (an int)."""

    clusters: tuple[int, int]
    weights: tuple[float, float]


Route = int | SoftRoute


def _route_order(route: Route | None) -> tuple:
    """Sort key of routes: no route first, then by cluster, a soft route after its nearest cluster's hard one."""
    if route is None:
        return (-1,)
    if isinstance(route, SoftRoute):
        return (*route.clusters, route.weights[1])
    return (route,)


def _needs_centroids(model: torch.nn.Module) -> bool:
    """Whether the model is a MoCE model routed by cluster (a plain causal LM never is)."""
    return isinstance(model.config, MoCEConfig) and model.config.needs_centroids


def load_router(model_dir: Path, model: torch.nn.Module) -> SequenceRouter | None:
    """The directory's cluster router when the model routes by cluster, else None (base model, pesc...)."""
    if not _needs_centroids(model):
        return None

    router = load_model_router(model_dir)
    if router is None:
        raise FileNotFoundError(
            f"{model_dir}: the {getattr(model.config, 'variant', '?')!r} model routes by cluster but the "
            "directory holds no centroids.npy"
        )
    return router


def document_routing_text(task: Any, doc: Mapping[str, Any]) -> str:
    """The routing text of an lm-eval document: its zero-shot prompt, i.e. the task's description (the system
    part) and `doc_to_text(doc)` (the instruction). Few-shot exemplars and answers never enter it.

    Multiple-input tasks (Winogrande) put each choice into its own context and `doc_to_text` returns the index
    of the gold one; their routing text is every choice, so it does not single out the answer.
    """
    config = getattr(task, "config", None)
    description = task.resolve_field(doc, getattr(config, "description", None)) or ""
    text = task.doc_to_text(doc)
    if getattr(task, "multiple_input", 0):
        text = "\n".join(str(choice) for choice in task.doc_to_choice(doc))
    if not isinstance(text, str):
        raise TypeError(
            f"task {getattr(task, 'task_name', '?')!r}: doc_to_text returned {type(text).__name__}, not a prompt string"
        )
    return routing_text(description if isinstance(description, str) else str(description), text, "")



class RequestRouting:
    """The routing half of `MoCELM` (its state is made in `MoCELM.__init__`)."""

    def use_tasks(self, tasks: Mapping[str, Any]) -> None:
        """lm-eval tasks (name -> Task) whose requests this model will route by their documents."""
        self.tasks.update(tasks)

    def use_task_manager(self, task_manager: Any) -> None:
        """The lm-eval task index (`TaskManager`) the evaluation loads its tasks from: tasks not handed over with
        `use_tasks` are looked up in it (so in its include path too)."""
        self._task_manager = task_manager

    def _task(self, name: str) -> Any:
        if name not in self.tasks:
            # lm-eval's own CLI hands the model neither its tasks nor its task index: load the task by name once,
            # from the index of the run (`use_task_manager`), else from the include path (the model argument
            # include_path), else from lm-eval's registry.
            for task_manager in self._task_indexes():
                if name in task_manager.all_tasks:
                    self.tasks[name] = task_manager.load([name])["tasks"][name]
                    return self.tasks[name]
            where = (f"the include path {self.include_path} nor lm-eval's registry" if self.include_path
                     else "lm-eval's registry (run lm-eval as `moce-lm-eval`, which hands the model the run's "
                          "--include_path; `lm_eval` needs the model argument include_path=DIR as well)")
            raise KeyError(f"lm-eval task {name!r} is neither in the evaluated tasks (MoCELM.use_tasks) nor in " + where)
        return self.tasks[name]

    def _task_indexes(self) -> Iterator[Any]:
        """The task indexes to look a task up in, each built once when first needed (lm-eval's registry index
        reads thousands of YAML files: it is built only for a task the include path lacks)."""
        if self._task_manager is not None:
            yield self._task_manager
            return
        from lm_eval.tasks import TaskManager

        if self.include_path is not None:
            if "include_path" not in self._task_index_cache:
                self._task_index_cache["include_path"] = TaskManager(include_path=self.include_path,
                                                                     include_defaults=False)
            yield self._task_index_cache["include_path"]
        if "registry" not in self._task_index_cache:
            self._task_index_cache["registry"] = TaskManager()
        yield self._task_index_cache["registry"]

    def routing_text_of(self, request: Instance) -> str:
        """What the router embeds for an lm-eval request (see the module docstring)."""
        if request.task_name is not None and request.doc is not None:
            if request.request_type == "loglikelihood_rolling":
                return routing_text("", request.args[0], "")  # the document is the text itself; no few-shot
            return document_routing_text(self._task(request.task_name), request.doc)
        return self._context_routing_text(request.args[0])

    def _context_routing_text(self, context: str) -> str:
        if context not in self._routing_text:
            raise KeyError(
                f"no routing text for the context ending {context[-60:]!r}: render it with render_prompt, or "
                "evaluate lm-eval requests that carry their task and document"
            )
        return self._routing_text[context]

    def clusters_for_texts(self, texts: Sequence[str]) -> list[int | None]:
        """The cluster of each routing text (None for every text without a router); each text is embedded once.
        With soft assignment, the nearest cluster (`routes_for_texts` gives the second one too)."""
        if self.router is None:
            return [None] * len(texts)
        self._route_texts(texts)
        return [self._cluster_of_text[t] for t in texts]

    def routes_for_texts(self, texts: Sequence[str]) -> list[Route | None]:
        """The route of each routing text: its cluster, or its `SoftRoute` where a soft assignment mixes two."""
        if self.router is None:
            return [None] * len(texts)
        self._route_texts(texts)
        return [self._soft_route_of_text.get(t, self._cluster_of_text[t]) for t in texts]

    def _route_texts(self, texts: Sequence[str]) -> None:
        missing = sorted({t for t in texts if t not in self._cluster_of_text})
        if not missing:
            return
        rule, soft = self.soft_assignment, None
        embeds = hasattr(self.router, "encoder") and hasattr(
            self.router, "assign_embeddings" if rule is None else "assign_soft_embeddings")
        if embeds:
            embeddings = np.asarray(self.router.encoder.encode(missing), dtype=np.float32)
            self._embedding_of_text.update(zip(missing, embeddings))
            if rule is None:
                assigned = np.asarray(self.router.assign_embeddings(embeddings)).reshape(-1)
            else:
                soft = self.router.assign_soft_embeddings(embeddings, rule)
        elif rule is None:
            assigned = np.asarray(self.router.assign(missing)).reshape(-1)
        else:
            soft = self.router.assign_soft(missing, rule)
        if soft is not None:
            assigned = self._keep_soft_routes(missing, soft)
        if assigned.shape[0] != len(missing):
            raise ValueError(f"router returned {assigned.shape[0]} clusters for {len(missing)} texts")
        self._cluster_of_text.update(zip(missing, (int(a) for a in assigned)))

    def _keep_soft_routes(self, texts: list[str], soft: SoftClusters) -> np.ndarray:
        if soft.clusters.shape[0] != len(texts):
            raise ValueError(f"router returned {soft.clusters.shape[0]} soft assignments for {len(texts)} texts")
        for index in np.nonzero(soft.soft)[0]:
            first, second = (int(c) for c in soft.clusters[index])
            self._soft_route_of_text[texts[index]] = SoftRoute(
                clusters=(first, second), weights=(float(soft.weights[index, 0]), float(soft.weights[index, 1]))
            )
        return soft.nearest

    def clusters_for(self, contexts: Sequence[str]) -> list[int | None]:
        """The cluster that answers each context rendered by `render_prompt` (None without a router); with soft
        assignment the nearest of the two."""
        if self.router is None:
            return [None] * len(contexts)
        return self.clusters_for_texts([self._context_routing_text(c) for c in contexts])

    def routes_for(self, contexts: Sequence[str]) -> list[Route | None]:
        """The route of each context rendered by `render_prompt`: its cluster or its `SoftRoute`."""
        if self.router is None:
            return [None] * len(contexts)
        return self.routes_for_texts([self._context_routing_text(c) for c in contexts])

    def soft_routes_for(self, contexts: Sequence[str]) -> list[SoftRoute | None]:
        """The soft route of each context rendered by `render_prompt` and already routed; None where it was routed
        to one group (or not routed, or not rendered here)."""
        routes = []
        for context in contexts:
            text = self._routing_text.get(context)
            routes.append(self._soft_route_of_text.get(text) if text is not None else None)
        return routes

    def routing_embeddings_for(self, contexts: Sequence[str]) -> list[np.ndarray | None]:
        """The router's embedding of each context rendered by `render_prompt` and already routed (None where the
        router does not embed, or the context was not routed)."""
        embeddings = []
        for context in contexts:
            text = self._routing_text.get(context)
            embeddings.append(self._embedding_of_text.get(text) if text is not None else None)
        return embeddings

    def clusters_for_documents(self, documents: Sequence[tuple[str, Mapping[str, Any]]]) -> list[int | None]:
        """The cluster of each (lm-eval task name, document), as its requests were routed."""
        if self.router is None:
            return [None] * len(documents)
        return self.clusters_for_texts([document_routing_text(self._task(name), doc) for name, doc in documents])

    @property
    def routes(self) -> bool:
        """Whether requests go to different expert groups (by cluster or by the random_group hash)."""
        return self.router is not None or self.hashes_prompt

    def _hashed_group(self, context_tokens: Sequence[int]) -> int:
        config = self.model.config
        tokens = torch.tensor([list(context_tokens)], dtype=torch.long)
        return int(random_group_ids(tokens, None, config.num_groups, config.random_group_seed))

    def _groups(self, requests: Sequence[Instance], context_tokens: Callable[[Instance], Sequence[int]]
                ) -> list[Route | None]:
        if self.hashes_prompt:
            return [self._hashed_group(context_tokens(request)) for request in requests]
        if self.router is None:
            return [None] * len(requests)
        return self.routes_for_texts([self.routing_text_of(request) for request in requests])

    def _routing_kwargs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The routing arguments of a model call whose every row has the active route."""
        return self._routing_kwargs_for_rows([self._active_group] * batch_size)

    def _routing_kwargs_for_rows(self, routes: Sequence[Route | None]) -> dict[str, torch.Tensor]:
        """The routing arguments of a model call with each row's own route (the model routes every sequence by
        its row of `cluster_ids` / `group_ids`, so a batch may mix routes). A hard row among soft ones is the
        pair (its cluster, itself) with the weights (1, 0): the model runs it as a hard row."""
        if all(route is None for route in routes):
            return {}
        if any(route is None for route in routes):
            raise RuntimeError(f"a batch mixes routed and unrouted rows: {list(routes)}")
        device = self.device
        if any(isinstance(route, SoftRoute) for route in routes):
            if self.hashes_prompt:
                raise RuntimeError("a random_group model has no soft routes")
            pairs = [route.clusters if isinstance(route, SoftRoute) else (route, route) for route in routes]
            weights = [route.weights if isinstance(route, SoftRoute) else (1.0, 0.0) for route in routes]
            return {"cluster_ids": torch.tensor(pairs, dtype=torch.long, device=device),
                    "cluster_weights": torch.tensor(weights, dtype=torch.float32, device=device)}
        key = "group_ids" if self.hashes_prompt else "cluster_ids"
        return {key: torch.tensor(list(routes), dtype=torch.long, device=device)}

    def _rows_routing_kwargs(self, rows: Sequence[Hashable]) -> dict[str, torch.Tensor]:
        """The routing arguments of a model call inside `_by_rows`: each row's route by its model input."""
        if self._row_routes is None:
            return self._routing_kwargs(len(rows))
        routes = []
        for index, row in enumerate(rows):
            if row not in self._row_routes:
                raise RuntimeError(f"batch row {index} is none of the requests being run: its route is unknown")
            routes.append(self._row_routes[row])
        return self._routing_kwargs_for_rows(routes)

    @contextlib.contextmanager
    def _routed(self, group: Route | None) -> Iterator[None]:
        saved, self._active_group = self._active_group, group
        try:
            yield
        finally:
            self._active_group = saved

    @contextlib.contextmanager
    def _batch_size_fixed_across_processes(self) -> Iterator[None]:
        """With data parallelism, ranks hold different groups and so make different numbers of calls; HFLM's
        `batch_size="auto"` search is a collective, so it runs once here, on every rank, before the groups."""
        if self.world_size <= 1 or self.batch_size != "auto":
            yield
            return
        with self._routed(0 if self.routes else None):
            detected = self._detect_batch_size()
        saved, self.batch_size_per_gpu = self.batch_size_per_gpu, detected
        try:
            yield
        finally:
            self.batch_size_per_gpu = saved

    def _by_rows(self, items: Sequence[Item], groups: Sequence[Route | None], keys: Sequence[Hashable],
                 run: Callable[[list[Item]], list[Result]], tasks: Sequence[str | None] | None = None
                 ) -> list[Result]:
        """`run` on the items of every route at once: each row of a model call made inside is routed by its own
        route, found by its model input (`keys[i]`, the tokens the model call sees for item i: HFLM batches the
        items and calls the model with tokens alone). Results in the items' order.

        Items whose model inputs are equal but whose routes differ cannot be told apart in a batch: they run in
        rounds, one route of such an input per round (lm-eval also merges requests with equal inputs into one
        row). `tasks`: each item's lm-eval task; while expert use is recorded and no caller has named what it is
        counted for, the items of each task run apart so that each task's expert use is counted under its name."""
        by_task = tasks is not None and self._expert_use_label is None and self._moce_model() is not None
        routes_of_key: dict[tuple[str | None, Hashable], list[Route | None]] = {}
        for index, (group, key) in enumerate(zip(groups, keys, strict=True)):
            task = tasks[index] if by_task else None  # type: ignore[index]
            seen = routes_of_key.setdefault((task, key), [])
            if group not in seen:
                seen.append(group)
        members: dict[tuple[str | None, int], list[int]] = {}
        for index, (group, key) in enumerate(zip(groups, keys, strict=True)):
            task = tasks[index] if by_task else None  # type: ignore[index]
            ordered = sorted(routes_of_key[(task, key)], key=_route_order)
            members.setdefault((task, ordered.index(group)), []).append(index)
        results: list[Result | None] = [None] * len(items)
        with self._batch_size_fixed_across_processes():
            for task, round_ in sorted(members, key=lambda member: (member[0] or "", member[1])):
                indices = members[(task, round_)]
                counting = self.counting_expert_use(task) if task is not None else contextlib.nullcontext()
                routed = any(groups[i] is not None for i in indices)
                saved, self._row_routes = self._row_routes, ({keys[i]: groups[i] for i in indices} if routed else None)
                try:
                    with counting:
                        outputs = run([items[i] for i in indices])
                finally:
                    self._row_routes = saved
                for index, output in zip(indices, outputs, strict=True):
                    results[index] = output
        return results  # type: ignore[return-value]
