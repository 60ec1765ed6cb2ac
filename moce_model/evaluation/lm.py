"""`MoCELM`: lm-eval's Hugging Face model class (`HFLM`) for merged MoCE directories and plain HF model
directories, with every request routed to its expert group.

HFLM does the work of an evaluator: tokenisation, longest-first batching, `batch_size="auto"`, data parallelism
under `accelerate launch`, progress bars, the logits cache of multiple-choice tasks, stop sequences. This class
adds routing. Every request gets its expert group first:

- `moce` / `cluster_only`: the directory's embedder embeds the request's routing text and the nearest centroid
  is its cluster. For an lm-eval request the routing text is its own document's zero-shot prompt (the task's
  description and `doc_to_text(doc)`, see `document_routing_text`): never the few-shot exemplars or their
  answers, never the prompt format's markup. For a prompt made by `render_prompt` it is the item's
  system + instruction + input (`moce_model.data.instructions.routing_text`, as the centroids were fit).
- `random_group`: the model's own hash of the request's context tokens (training hashes the prompt).
- the base model, `pesc`, `dense_adapter`: no routing.

With soft assignment (the model config's `soft_assignment`, or the `soft_assignment` argument), a cluster-routed
request near the boundary of two clusters is answered by both clusters' groups (`SoftAssignmentRule`); its route
is then its two clusters with their weights instead of one cluster, and its reported cluster the nearest.

Requests are then run one route at a time, so a batch never mixes routes, and the route reaches every model call
(`cluster_ids`, `cluster_weights` for a soft route, or `group_ids` for `random_group`, in `_model_call` and
`_model_generate`). Soft routes are rarely shared (the weights are continuous), so each soft request is
usually a batch of its own. All models go through
the same code, so their numbers are comparable.

Expert use on the evaluated prompts: inside `counting_expert_use(label)` a MoCE model counts, per layer, which
experts of which group every token went to, and the counts are kept under `label` (`take_expert_use`). lm-eval
requests are counted under their own task's name. Counted are the tokens the model reads: every prompt token,
the reference continuation of a scored request (without the right padding HFLM adds), and each generated token
fed back while its sequence is still being generated.

Prompts are rendered in the experiment's prompt format (`moce_model.data.prompt_format`), the one the model was
trained with: lm-eval's chat hook (`apply_chat_template`) renders few-shot conversations with it, and
`render_prompt` renders the project's own benchmark items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import moce_model.model.modeling  # noqa: F401
from moce_model.clustering.router import (
    CENTROIDS_FILE,
    check_routing_files,
    load_model_router,
)
from moce_model.clustering.soft import SoftAssignmentRule, SoftClusters
from moce_model.data.instructions import routing_text
from moce_model.data.prompt_format import AUTO, make_prompt_format
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM, random_group_ids
from moce_model.variants import GroupChoice

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


@register_model("moce")
class MoCELM(HFLM):
    """lm-eval model over a causal LM with optional sequence-level routing.

    From a directory: `MoCELM(pretrained=dir, prompt_format=..., device=..., dtype=...)` (what lm-eval's
    `--model moce --model_args pretrained=DIR` does); from objects: `MoCELM.from_objects(model, tokenizer)`.
    """

    def __init__(
        self,
        pretrained: str | Path | torch.nn.Module,
        prompt_format: str = AUTO,
        router: SequenceRouter | None = None,
        batch_size: int | str = 8,
        max_length: int | str = 2048,
        max_gen_toks: int | str = 256,
        device: str = "cpu",
        dtype: str = "float32",
        num_threads: int | str | None = None,
        soft_assignment: SoftAssignmentRule | bool | None = None,
        **hflm_kwargs: Any,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))

        model_dir: Path | None = None
        if isinstance(pretrained, (str, Path)):
            model_dir = Path(pretrained)
            if not (model_dir / "config.json").is_file():
                raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
            if (model_dir / CENTROIDS_FILE).is_file():
                check_routing_files(model_dir)  # before loading the weights: a mixed-up directory fails at once
            pretrained = str(model_dir)
        else:
            pretrained = pretrained.to(device)
        super().__init__(
            pretrained=pretrained, backend="causal", device=device, dtype=dtype, batch_size=batch_size,
            max_length=int(max_length), **hflm_kwargs,
        )
        self._max_gen_toks = int(max_gen_toks)
        self.model_dir = model_dir
        self.prompt_format = make_prompt_format(prompt_format, self.tokenizer)
        self.variant: str | None = getattr(self.model.config, "variant", None)
        clusters = getattr(router, "num_clusters", None)
        if clusters is not None and _needs_centroids(self.model):  # a router of the caller's, not the directory's
            self.model.config.check_num_clusters(clusters, where="MoCELM router")
        if router is None and model_dir is not None:
            router = load_router(model_dir, self.model)  # checked against config.json by check_routing_files
        if router is None and _needs_centroids(self.model):
            raise ValueError(f"the {self.variant!r} model routes by cluster: give it a router (centroids + embedder)")
        # Groups chosen by a hash of the prompt tokens (no router, no clustering): resolved per request here.
        self.hashes_prompt = isinstance(self.model.config, MoCEConfig) \
            and self.model.config.group_choice is GroupChoice.HASH
        self.router = router
        self.soft_assignment = self._soft_assignment_rule(soft_assignment)
        # lm-eval tasks by name, for routing requests by their documents (`use_tasks`).
        self.tasks: dict[str, Any] = {}
        # Context rendered by `render_prompt` -> its item's routing text.
        self._routing_text: dict[str, str] = {}
        self._cluster_of_text: dict[str, int] = {}
        # Routing text -> its soft route, for the texts a soft assignment gives two groups.
        self._soft_route_of_text: dict[str, SoftRoute] = {}
        # Routing text -> its embedding, kept when the router embeds (for the map of the evaluated prompts).
        self._embedding_of_text: dict[str, np.ndarray] = {}
        # The route of the requests being run (None: the model is called without routing).
        self._active_group: Route | None = None
        # Expert use counted so far: label -> [layers, groups, experts] (token, expert) assignments.
        self._expert_use: dict[str, np.ndarray] = {}
        self._expert_use_label: str | None = None
        # The unpadded inputs of the scored requests being run: (inputs without trailing 0s) -> real length ->
        # the request's context. HFLM right-pads scoring batches with token 0 and calls the model without a
        # mask; this tells padding apart from a real trailing token 0, and each row's prompt.
        self._scored_inputs: dict[tuple[int, ...], dict[int, str | None]] = {}
        # The prompts being generated from, by their tokens: each generated row's prompt.
        self._generation_contexts: dict[tuple[int, ...], str] = {}
        # Expert use per prompt: label -> context -> [layers, groups, experts].
        self._prompt_expert_use: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def from_objects(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        router: SequenceRouter | None = None,
        prompt_format: str = AUTO,
        batch_size: int | str = 8,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        device: str = "cpu",
        soft_assignment: SoftAssignmentRule | bool | None = None,
    ) -> MoCELM:
        """An already built model and tokenizer (tests, and callers that hold the model in memory)."""
        return cls(pretrained=model, tokenizer=tokenizer, router=router, prompt_format=prompt_format,
                   batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks, device=device,
                   soft_assignment=soft_assignment)

    def _soft_assignment_rule(self, setting: SoftAssignmentRule | bool | None) -> SoftAssignmentRule | None:
        """The rule requests are routed by: `setting` None follows the model config's `soft_assignment`; False
        routes hard; True applies the config's margin and temperature; a rule applies itself. A model that does
        not route by cluster (base model, pesc, dense_adapter, random_group) has no clusters to mix and is routed
        as always, whatever the setting (`self.soft_assignment` is then None)."""
        if not _needs_centroids(self.model):
            return None
        config = self.model.config
        if setting is None:
            rule = config.soft_assignment_rule
        elif isinstance(setting, SoftAssignmentRule):
            rule = setting
        elif isinstance(setting, bool):
            rule = config.soft_assignment_settings if setting else None
        else:
            raise ValueError(f"soft_assignment must be a SoftAssignmentRule, true, false or None; got {setting!r}")
        if rule is not None and not hasattr(self.router, "assign_soft"):
            raise ValueError(f"soft_assignment={rule} needs a router with assign_soft (a ClusterRouter); "
                             f"{type(self.router).__name__} assigns one cluster per text")
        return rule

    # ------------------------------------------------------------------------------------------ settings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        return self.batch_size_per_gpu

    @batch_size.setter
    def batch_size(self, value: int | str) -> None:
        if str(value).startswith("auto"):
            name, _, schedule = str(value).partition(":")
            self.batch_size_per_gpu, self.batch_schedule = name, float(schedule or 1)
        else:
            self.batch_size_per_gpu = int(value)

    def get_model_info(self) -> dict:
        # HFLM's version asks the Hub for the model's revision; these models are local directories.
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "prompt_format": self.prompt_format.name,
        }

    # ------------------------------------------------------------------------------------------ prompts

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if self.prompt_format.name == "chat_template":
            return self.tokenizer.chat_template
        return self.prompt_format.name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's chat hook: the conversation (few-shot turns included) in the experiment's prompt format."""
        return self.prompt_format.render(
            chat_history, add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt
        )

    def render_prompt(
        self,
        system: str | None,
        instruction: str,
        input: str | None = "",
        fewshot: Sequence[tuple[str, str]] = (),
        assistant_prefix: str = "",
    ) -> str:
        """The context for an item the model answers, in the prompt format (optionally after few-shot
        (question, answer) turns, and with the answer's start prefilled); the item's routing text is
        remembered for the context."""
        messages = self.prompt_format.messages(system, instruction, input)
        turns = [m for question, answer in fewshot
                 for m in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]
        split = 1 if messages[0]["role"] == "system" else 0
        context = self.prompt_format.render(messages[:split] + turns + messages[split:]) + assistant_prefix
        self._routing_text[context] = routing_text(system, instruction, input)
        return context

    def render_continuation(self, system: str | None, instruction: str, input: str | None, response: str) -> str:
        """The text after `render_prompt(system, instruction, input)` when `response` answers it: what training
        scores (with the end-of-turn marker, so the model is also scored on stopping)."""
        return self.prompt_format.completion(system, instruction, input, response)

    # ------------------------------------------------------------------------------------------ routing

    def use_tasks(self, tasks: Mapping[str, Any]) -> None:
        """lm-eval tasks (name -> Task) whose requests this model will route by their documents."""
        self.tasks.update(tasks)

    def _task(self, name: str) -> Any:
        if name not in self.tasks:
            # lm-eval's own CLI does not hand the tasks to the model; load the task by name once.
            from lm_eval.tasks import TaskManager

            loaded = TaskManager().load([name])["tasks"]
            if name not in loaded:
                raise KeyError(f"lm-eval task {name!r} is unknown; pass the evaluated tasks with MoCELM.use_tasks")
            self.tasks[name] = loaded[name]
        return self.tasks[name]

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
        route = self._active_group
        if route is None:
            return {}
        if isinstance(route, SoftRoute):
            return {
                "cluster_ids": torch.tensor([route.clusters] * batch_size, dtype=torch.long, device=self.device),
                "cluster_weights": torch.tensor([route.weights] * batch_size, dtype=torch.float32, device=self.device),
            }
        key = "group_ids" if self.hashes_prompt else "cluster_ids"
        return {key: torch.full((batch_size,), route, dtype=torch.long, device=self.device)}

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

    def _by_group(self, items: Sequence[Item], groups: Sequence[Route | None],
                  run: Callable[[list[Item]], list[Result]], tasks: Sequence[str | None] | None = None
                  ) -> list[Result]:
        """`run` on the items of one route at a time (with that route active); results in the items' order.

        `tasks`: each item's lm-eval task; while expert use is recorded and no caller has named what it is
        counted for, the items of each task run apart so that each task's expert use is counted under its name."""
        by_task = tasks is not None and self._expert_use_label is None and self._moce_model() is not None
        members: dict[tuple[Route | None, str | None], list[int]] = {}
        for index, group in enumerate(groups):
            task = tasks[index] if by_task else None  # type: ignore[index]
            members.setdefault((group, task), []).append(index)
        results: list[Result | None] = [None] * len(items)
        with self._batch_size_fixed_across_processes():
            for group, task in sorted(members, key=lambda key: (_route_order(key[0]), key[1] or "")):
                counting = self.counting_expert_use(task) if task is not None else contextlib.nullcontext()
                with self._routed(group), counting:
                    outputs = run([items[i] for i in members[(group, task)]])
                for index, output in zip(members[(group, task)], outputs, strict=True):
                    results[index] = output
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------ expert use

    def _moce_model(self):
        """The MoCE model being evaluated, or None for a model without experts (the base model)."""

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model if isinstance(model, MoCEForCausalLM) else None

    def _counting(self) -> bool:
        moce = self._moce_model()
        return moce is not None and moce.routing_context.record_expert_use

    @contextlib.contextmanager
    def counting_expert_use(self, label: str) -> Iterator[None]:
        """Count the expert use of the model calls inside under `label` (nothing for a model without experts).
        Nested, the inner label takes the calls made inside it."""
        moce = self._moce_model()
        if moce is None:
            yield
            return
        outer = self._expert_use_label
        was_recording = moce.routing_context.record_expert_use
        if outer is not None:
            self._flush_expert_use()
        else:
            moce.reset_expert_use()
            moce.set_expert_use_recording(True, filler_token_id=self.tokenizer.pad_token_id)
            moce.set_per_sequence_expert_use(True)
        self._expert_use_label = label
        try:
            yield
        finally:
            self._flush_expert_use()
            self._expert_use_label = outer
            if outer is None:
                moce.set_expert_use_recording(was_recording)
                moce.set_per_sequence_expert_use(False)

    def _flush_expert_use(self) -> None:
        moce = self._moce_model()
        counts = moce.expert_use_counts_by_layer().numpy().astype(np.int64)
        label = self._expert_use_label
        self._expert_use[label] = self._expert_use[label] + counts if label in self._expert_use else counts
        moce.reset_expert_use()

    def take_expert_use(self) -> dict[str, np.ndarray]:
        """label -> [layers, groups, experts] (token, expert) assignment counts, and forget them."""
        taken, self._expert_use = self._expert_use, {}
        return taken

    def take_prompt_expert_use(self) -> dict[str, dict[str, np.ndarray]]:
        """label -> prompt (the context as rendered) -> [layers, groups, experts]: the same counts per prompt, for
        the prompts the evaluator could tell apart (scored and generated requests with a context), and forget
        them."""
        taken, self._prompt_expert_use = self._prompt_expert_use, {}
        return taken

    def _attribute_rows(self, contexts: Sequence[str | None]) -> None:
        """Add the per-sequence counts of the model calls since the last attribution to each row's prompt."""
        moce = self._moce_model()
        counts = moce.take_per_sequence_expert_use()
        if counts is None or self._expert_use_label is None:
            return
        counts = counts.numpy()  # [layers, rows, groups, experts]
        if counts.shape[1] != len(contexts):
            raise RuntimeError(f"{counts.shape[1]} sequences recorded for a batch of {len(contexts)}")
        per_prompt = self._prompt_expert_use.setdefault(self._expert_use_label, {})
        shape = (counts.shape[0], counts.shape[2], counts.shape[3])
        for row, context in enumerate(contexts):
            if context is None:
                continue
            total = per_prompt.setdefault(context, np.zeros(shape, dtype=np.int64))
            total += counts[:, row]

    @contextlib.contextmanager
    def _expert_use_paused(self) -> Iterator[None]:
        moce = self._moce_model()
        recording = moce is not None and moce.routing_context.record_expert_use
        if recording:
            filler = moce._expert_use_filler_token_id
            if self._expert_use_label is not None:
                self._flush_expert_use()
            moce.set_expert_use_recording(False)
        try:
            yield
        finally:
            if recording:
                moce.reset_expert_use()
                moce.set_expert_use_recording(True, filler_token_id=filler)

    def _detect_batch_size(self, requests: Sequence | None = None, pos: int = 0):
        # The batch-size search runs made-up batches: not evaluation tokens.
        with self._expert_use_paused():
            return super()._detect_batch_size(requests, pos)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._counting():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        for strings, context_tokens, continuation_tokens in requests:
            # What HFLM feeds the model for this request (see HFLM._loglikelihood_tokens). Rolling windows have
            # no (context, continuation) strings: they count, but belong to no prompt.
            context = strings[0] if strings else None
            fed = list(context_tokens + continuation_tokens)[-(self.max_length + 1):][:-1]
            stripped = len(fed)
            while stripped and fed[stripped - 1] == 0:
                stripped -= 1
            self._scored_inputs.setdefault(tuple(fed[:stripped]), {})[len(fed)] = context
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scored_inputs.clear()

    def _scored_rows(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """[B, T] True on the real tokens of a right-padded scoring batch, and each row's context. Where two
        scored inputs differ only by trailing token-0s, the longer one that fits the row is taken."""
        mask = torch.zeros(inputs.shape, dtype=torch.bool, device=inputs.device)
        contexts: list[str | None] = []
        for row_index, row in enumerate(inputs.tolist()):
            stripped = len(row)
            while stripped and row[stripped - 1] == 0:
                stripped -= 1
            lengths = {n: c for n, c in self._scored_inputs.get(tuple(row[:stripped]), {}).items() if n <= len(row)}
            if not lengths:
                raise RuntimeError(f"scoring batch row {row_index} matches no scored request: cannot tell its "
                                   "padding apart for the expert-use counts")
            length = max(lengths)
            mask[row_index, :length] = True
            contexts.append(lengths[length])
        return mask, contexts

    # ------------------------------------------------------------------------------------ model calls

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        routing = self._routing_kwargs(inps.shape[0])
        contexts = None
        if self._counting():
            routing["expert_use_mask"], contexts = self._scored_rows(inps)
        if not routing:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(inps, **routing).logits
        if contexts is not None:
            self._attribute_rows(contexts)
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        output = super()._model_generate(context, max_length, stop, **generation_kwargs,
                                         **self._routing_kwargs(context.shape[0]))
        if self._counting():
            mask = generation_kwargs.get("attention_mask")
            rows = [tuple(t for t, m in zip(tokens, keep) if m) for tokens, keep in
                    zip(context.tolist(), mask.tolist() if mask is not None else [[1] * context.shape[1]] * len(context))]
            self._attribute_rows([self._generation_contexts.get(row) for row in rows])
        return output

    # ----------------------------------------------------------------------------------- lm-eval requests

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        groups = self._groups(requests, lambda r: self._context_tokens(*r.args))
        return self._by_group(requests, groups, lambda subset: HFLM.loglikelihood(self, subset, disable_tqdm),
                              [r.task_name for r in requests])

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows, each window run with its request's group."""
        request_groups = self._groups(requests, lambda r: self.tok_encode(r.args[0]))
        windows, groups, owners, tasks = [], [], [], []
        for index, request in enumerate(requests):
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                windows.append((None, *lm_eval_utils.make_disjoint_window(window)))
                groups.append(request_groups[index])
                owners.append(index)
                tasks.append(request.task_name)
        scored = self._by_group(windows, groups, lambda subset: self._loglikelihood_tokens(
            subset, disable_tqdm=disable_tqdm,
            override_bs=self._detect_batch_size() if self.batch_size == "auto" else None), tasks)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scored):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        for request in requests:
            kwargs = request.args[1]
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("MoCELM evaluates with greedy decoding only; got do_sample with temperature > 0")
        groups = self._groups(requests, lambda r: self.tok_encode(r.args[0]))
        if self._moce_model() is not None:
            # Each generated row's prompt, by its tokens (rows HFLM truncates are not attributed to a prompt).
            self._generation_contexts = {tuple(self.tok_encode(r.args[0])): r.args[0] for r in requests}
        try:
            return self._by_group(requests, groups, lambda subset: HFLM.generate_until(self, subset, disable_tqdm),
                                  [r.task_name for r in requests])
        finally:
            self._generation_contexts = {}

    def _context_tokens(self, context: str, continuation: str) -> list[int]:
        """The context tokens a (context, continuation) request is scored after, as HFLM encodes them."""
        if not context:
            return [self.prefix_token_id]
        return self._encode_pair(context, continuation)[0]

    # ------------------------------------------------------------------- the project's own benchmarks

    def generate(self, contexts: Sequence[str], gen_kwargs: Sequence[dict[str, Any]] | dict[str, Any]) -> list[str]:
        """Greedy continuations of `contexts` (made by `render_prompt`), each cut at its first stop sequence."""
        if isinstance(gen_kwargs, dict):
            gen_kwargs = [gen_kwargs] * len(contexts)
        # No task and no document: each request is routed by its context's routing text.
        requests = [Instance("generate_until", {}, (context, dict(kwargs)), index)
                    for index, (context, kwargs) in enumerate(zip(contexts, gen_kwargs, strict=True))]
        return self.generate_until(requests, disable_tqdm=True)

    def loglikelihood_with_counts(
        self, pairs: Sequence[tuple[str, str]], move_trailing_whitespace: bool = True
    ) -> list[tuple[float, int, bool]]:
        """(log-probability, number of continuation tokens, is-greedy) per (context, continuation).

        lm-eval moves a context's trailing whitespace into the continuation (word boundaries); a prompt
        rendered in a prompt format ends in the format's newline, which belongs to the prompt, so callers
        scoring answers to rendered prompts pass `move_trailing_whitespace=False`.
        """
        encoded = []
        for context, continuation in pairs:
            if move_trailing_whitespace or not context:
                context_tokens = self._context_tokens(context, continuation)
                continuation_tokens = (self.tok_encode(continuation, add_special_tokens=False) if not context
                                       else self._encode_pair(context, continuation)[1])
            else:
                whole = self.tok_encode(context + continuation)
                context_tokens = self.tok_encode(context)
                if whole[: len(context_tokens)] != context_tokens:
                    raise ValueError(
                        f"the tokens of context {context[-40:]!r} are not a prefix of context + continuation"
                    )
                continuation_tokens = whole[len(context_tokens):]
            if not continuation_tokens:
                raise ValueError(f"empty continuation after tokenisation for context {context[-80:]!r}")
            encoded.append(((context, continuation), context_tokens, continuation_tokens))
        if self.hashes_prompt:
            groups = [self._hashed_group(context_tokens) for _, context_tokens, _ in encoded]
        else:
            groups = self.routes_for([context for context, _ in pairs])
        scored = self._by_group(encoded, groups,
                                lambda subset: self._loglikelihood_tokens(subset, disable_tqdm=True))
        return [(logprob, len(tokens), greedy) for (logprob, greedy), (_, _, tokens) in zip(scored, encoded)]
