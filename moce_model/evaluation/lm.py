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

Requests of different routes are batched together: the route of every row reaches the model call
(`cluster_ids` [B], `cluster_ids` + `cluster_weights` [B, 2] where a row has a soft route, or `group_ids` for
`random_group`, in `_model_call` and `_model_generate`), and the model routes each sequence by its own row. The
project's own held-out loss is scored by `scoring.score_pairs` (right padding with an attention mask);
lm-eval's requests and all generation go through HFLM's loops (longest-first batches, left-padded generation),
whose rows are matched to their requests by their tokens (`routes.RequestRouting._by_rows`). All models go
through the same code, so their numbers are comparable.

Expert use on the evaluated prompts: inside `counting_expert_use(label)` a MoCE model counts, per layer, which
experts of which group every token went to, and the counts are kept under `label` (`take_expert_use`). lm-eval
requests are counted under their own task's name. Counted are the tokens the model reads: every prompt token,
the reference continuation of a scored request (without the right padding HFLM adds), and each generated token
fed back while its sequence is still being generated.

Prompts are rendered in the experiment's prompt format (`moce_model.prompt_format`), the one the model was
trained with: lm-eval's chat hook (`apply_chat_template`) renders few-shot conversations with it, and
`render_prompt` renders the project's own benchmark items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs

from moce_model.clustering.router import CENTROIDS_FILE, check_routing_files
from moce_model.clustering.soft import SoftAssignmentRule
from moce_model.data.instructions import routing_text
from moce_model.data.prompt_format import AUTO, make_prompt_format
from moce_model.evaluation.routes import (  # noqa: F401  SoftRoute, document_routing_text: part of this module's API
    RequestRouting,
    Route,
    SequenceRouter,
    SoftRoute,
    _needs_centroids,
    document_routing_text,
    load_router,
)
from moce_model.evaluation.scoring import BatchedScoring
from moce_model.model.config import MoCEConfig
from moce_model.model.modeling import MoCEForCausalLM
from moce_model.variants import GroupChoice


@register_model("moce")
class MoCELM(BatchedScoring, RequestRouting, HFLM):
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
        include_path: str | Sequence[str] | None = None,
        autocast: str = "none",
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
        if autocast not in ("none", "bfloat16", "float16"):
            raise ValueError(f"autocast={autocast!r}: expected none, bfloat16 or float16")
        hflm_kwargs.setdefault("mixed_precision_dtype", None if autocast == "none" else autocast)  # HFLM's autocast
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
        # lm-eval tasks by name, for routing requests by their documents (`use_tasks`), and the task index other
        # tasks are looked up in (`use_task_manager`, else one built with `include_path`).
        self.tasks: dict[str, Any] = {}
        self.include_path = include_path
        self._task_manager: Any = None
        self._task_index_cache: dict[str, Any] = {}
        # Context rendered by `render_prompt` -> its item's routing text.
        self._routing_text: dict[str, str] = {}
        self._cluster_of_text: dict[str, int] = {}
        # Routing text -> its soft route, for the texts a soft assignment gives two groups.
        self._soft_route_of_text: dict[str, SoftRoute] = {}
        # Routing text -> its embedding, kept when the router embeds (for the map of the evaluated prompts).
        self._embedding_of_text: dict[str, np.ndarray] = {}
        # The route of the requests being run (None: the model is called without routing), or, inside `_by_rows`,
        # each request's route by the model input of its row.
        self._active_group: Route | None = None
        self._row_routes: dict[Any, Route | None] | None = None
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
        # The batch-size search runs made-up batches: not evaluation tokens, and no request's route.
        saved, self._row_routes = self._row_routes, None
        try:
            with self._expert_use_paused(), self._routed(0 if self.routes else None):
                return super()._detect_batch_size(requests, pos)
        finally:
            self._row_routes = saved

    # ------------------------------------------------------------------------------------ model calls

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, routes: Sequence[Route | None] | None = None,
                    contexts: Sequence[str | None] | None = None) -> torch.Tensor:
        """Logits of a batch. With `routes` (`score_pairs`): each row's route, `attn_mask` its right padding and
        `contexts` its prompt. Without (HFLM's batches, right-padded with token 0 and no mask): inside `_by_rows`
        each row's route is found by its tokens, else every row has the active route."""
        counting = self._counting()
        attention = None
        if routes is not None:
            routing, attention, mask = self._routing_kwargs_for_rows(routes), attn_mask, attn_mask
        elif counting or self._row_routes is not None:
            mask, contexts, rows = self._scored_rows(inps)
            routing = self._rows_routing_kwargs(rows)
        else:
            routing = self._routing_kwargs(inps.shape[0])
        if counting:
            routing["expert_use_mask"] = mask.bool()
        if not routing and attention is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self.model(inps, attention_mask=attention, **routing).logits
        if counting:
            self._attribute_rows(contexts)
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        keep = mask.tolist() if mask is not None else [[1] * context.shape[1]] * context.shape[0]
        rows = [tuple(t for t, m in zip(tokens, kept) if m) for tokens, kept in zip(context.tolist(), keep)]
        output = super()._model_generate(context, max_length, stop, **generation_kwargs,
                                         **self._rows_routing_kwargs(rows))
        if self._counting():
            self._attribute_rows([self._generation_contexts.get(row) for row in rows])
        return output

    # ----------------------------------------------------------------------------------- lm-eval requests

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [((context, continuation), *self._encoded_pair(context, continuation))
                   for context, continuation in (request.args for request in requests)]
        groups = self._groups(requests, lambda r: self._encoded_pair(*r.args)[0])
        return self._by_rows(encoded, groups, [self._fed_tokens(c, t) for _, c, t in encoded],
                             lambda subset: self._loglikelihood_tokens(subset, disable_tqdm=disable_tqdm),
                             [r.task_name for r in requests])

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows, each window run with its request's route."""
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
        scored = self._by_rows(windows, groups, [self._fed_tokens(c, t) for _, c, t in windows],
                               lambda subset: self._loglikelihood_tokens(
                                   subset, disable_tqdm=disable_tqdm,
                                   override_bs=self._detect_batch_size() if self.batch_size == "auto" else None),
                               tasks)
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
        # Each request's prompt tokens as HFLM will feed them (truncated from the left to leave room for the
        # generated tokens): how the rows of a generation batch are told apart.
        keys = []
        for context, kwargs in (request.args for request in requests):
            room = self.max_length - normalize_gen_kwargs(dict(kwargs), self.max_gen_toks)["max_gen_toks"]
            ids, _ = self.tok_batch_encode([context], left_truncate_len=room, truncation=self.truncation)
            keys.append(tuple(ids[0].tolist()))
        groups = self._groups(requests, lambda r: self.tok_encode(r.args[0]))
        if self._moce_model() is not None:
            self._generation_contexts = {key: r.args[0] for key, r in zip(keys, requests)}  # each row's prompt
        try:
            return self._by_rows(requests, groups, keys, lambda subset: HFLM.generate_until(self, subset, disable_tqdm),
                                 [r.task_name for r in requests])
        finally:
            self._generation_contexts = {}

    # ------------------------------------------------------------------- the project's own benchmarks

    def generate(self, contexts: Sequence[str], gen_kwargs: Sequence[dict[str, Any]] | dict[str, Any]) -> list[str]:
        """Greedy continuations of `contexts` (made by `render_prompt`), each cut at its first stop sequence."""
        if isinstance(gen_kwargs, dict):
            gen_kwargs = [gen_kwargs] * len(contexts)
        # No task and no document: each request is routed by its context's routing text.
        requests = [Instance("generate_until", {}, (context, dict(kwargs)), index)
                    for index, (context, kwargs) in enumerate(zip(contexts, gen_kwargs, strict=True))]
        return self.generate_until(requests, disable_tqdm=True)
