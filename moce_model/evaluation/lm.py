"""`MoCELM`: the lm-eval model class for merged MoCE model directories and plain HF model directories.

Every request is assigned to its cluster (the model directory's embedder embeds the input side of the
request, the nearest centroid gives the group) and the model runs with that group's experts. A directory
without centroids (the base model, and variants that do not route by cluster) runs every request through
the same path without cluster ids, so all models are evaluated by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from transformers import StoppingCriteria, StoppingCriteriaList


class SequenceRouter(Protocol):
    def assign(self, texts: Sequence[str]) -> np.ndarray: ...


def load_router(model_dir: Path, model: torch.nn.Module) -> SequenceRouter | None:
    """The directory's cluster router when the model routes by cluster, else None (base model, pesc...)."""
    if not getattr(model.config, "routes_by_cluster", False):
        return None
    from moce_model.routing import load_model_router

    router = load_model_router(model_dir)
    if router is None:
        raise FileNotFoundError(
            f"{model_dir}: the {getattr(model.config, 'variant', '?')!r} model routes by cluster but the "
            "directory holds no centroids.npy"
        )
    return router


@register_model("moce")
class MoCELM(LM):
    """lm-eval model over a causal LM with optional sequence-level cluster routing.

    Build it from a directory with `MoCELM(pretrained=dir)` (what lm-eval's `model_args` does), or from
    objects with `MoCELM.from_objects(model, tokenizer, router)`.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        batch_size: int | str = 8,
        max_length: int | str = 2048,
        max_gen_toks: int | str = 256,
        device: str | None = "cpu",
        dtype: str = "float32",
        use_chat_template: bool | str = True,
        max_batch_size: int | None = None,
        num_threads: int | str | None = None,
        **unused_lm_eval_args: Any,
    ) -> None:
        super().__init__()
        if pretrained is None:
            raise ValueError("MoCELM needs `pretrained` (a model directory); use MoCELM.from_objects otherwise")
        model_dir = Path(pretrained)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        import moce_model.modeling  # noqa: F401  registers the MoCE architecture with the Auto classes

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._setup(model, tokenizer, load_router(model_dir, model), batch_size, max_length, max_gen_toks,
                    device or "cpu", use_chat_template, str(model_dir))

    @classmethod
    def from_objects(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        router: SequenceRouter | None = None,
        batch_size: int = 8,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        device: str = "cpu",
        use_chat_template: bool = True,
        name: str = "model",
    ) -> MoCELM:
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._setup(model, tokenizer, router, batch_size, max_length, max_gen_toks, device, use_chat_template, name)
        return lm

    def _setup(self, model, tokenizer, router, batch_size, max_length, max_gen_toks, device,
               use_chat_template, name) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.router = router
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device(device)
        self.name = name
        if isinstance(use_chat_template, str):
            use_chat_template = use_chat_template.lower() in ("1", "true", "yes")
        self.use_chat_template = bool(use_chat_template) and bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError(f"{name}: tokenizer has neither a BOS nor an EOS token to start empty contexts")
        self.prefix_token_id = int(prefix)
        self._routing_text: dict[str, str] = {}
        self._cluster_cache: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ prompts

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if self.use_chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages as the model's prompt and remember the prompt's input side for routing."""
        if self.use_chat_template:
            rendered = self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )
        else:
            rendered = "\n\n".join(m["content"] for m in chat_history)
            if add_generation_prompt:
                rendered += "\n\n"
        self._routing_text[rendered] = input_side_text(chat_history)
        return rendered

    def render_prompt(
        self, messages: list[dict[str, str]], assistant_prefix: str = "", routing_text: str | None = None
    ) -> str:
        """The context string for a chat whose answer the model writes (optionally prefilled).

        `routing_text` overrides what the router embeds (default: the system and user turns).
        """
        rendered = self.apply_chat_template(messages, add_generation_prompt=True) + assistant_prefix
        self._routing_text[rendered] = routing_text if routing_text is not None else input_side_text(messages)
        return rendered

    def render_continuation(self, messages: list[dict[str, str]], response: str) -> str:
        """The text after the prompt when `response` answers `messages`: what training scores (with the
        end-of-turn marker, so the model is also scored on stopping)."""
        if not self.use_chat_template:
            return response
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return full[len(prompt):]

    # ------------------------------------------------------------------------------------------ routing

    def clusters_for(self, contexts: Sequence[str]) -> list[int | None]:
        """The expert group that answers each context (None for every context without a router)."""
        if self.router is None:
            return [None] * len(contexts)
        missing = sorted({c for c in contexts if c not in self._cluster_cache})
        if missing:
            texts = [self._routing_text.get(c, c) for c in missing]
            assigned = np.asarray(self.router.assign(texts)).reshape(-1)
            if assigned.shape[0] != len(missing):
                raise ValueError(f"router returned {assigned.shape[0]} clusters for {len(missing)} texts")
            self._cluster_cache.update(zip(missing, (int(a) for a in assigned)))
        return [self._cluster_cache[c] for c in contexts]

    def _routing_kwargs(self, clusters: Sequence[int | None]) -> dict[str, torch.Tensor]:
        if self.router is None:
            return {}
        return {"cluster_ids": torch.tensor(list(clusters), dtype=torch.long, device=self._device)}

    # ----------------------------------------------------------------------------------- tokenisation

    def tok_encode(self, text: str) -> list[int]:
        # Rendered chat prompts already carry their special tokens; plain prompts get none, for all models.
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _encode_pair(self, context: str, continuation: str, move_trailing_whitespace: bool = True
                     ) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip()) if move_trailing_whitespace else 0
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        context_tokens = self.tok_encode(context)
        return whole[: len(context_tokens)], whole[len(context_tokens):]

    # ----------------------------------------------------------------------------------- log-likelihood

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scored = self.loglikelihood_with_counts([req.args for req in requests])
        return [(logprob, greedy) for logprob, _, greedy in scored]

    def loglikelihood_with_counts(
        self, pairs: Sequence[tuple[str, str]], move_trailing_whitespace: bool = True
    ) -> list[tuple[float, int, bool]]:
        """(log-probability, number of continuation tokens, is-greedy) per (context, continuation).

        lm-eval moves a context's trailing whitespace into the continuation (word boundaries); a rendered
        chat prompt ends in the template's newline, which belongs to the prompt, so callers scoring answers
        to chat prompts pass `move_trailing_whitespace=False`.
        """
        encoded = []
        for context, continuation in pairs:
            if context:
                context_tokens, continuation_tokens = self._encode_pair(context, continuation, move_trailing_whitespace)
            else:
                context_tokens, continuation_tokens = [self.prefix_token_id], self.tok_encode(continuation)
            if not continuation_tokens:
                raise ValueError(f"empty continuation after tokenisation for context {context[-80:]!r}")
            encoded.append((context_tokens, continuation_tokens))
        clusters = self.clusters_for([context for context, _ in pairs])
        return self._score_tokens(encoded, clusters)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        clusters: list[int | None] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args[:1]
            cluster = self.clusters_for([text])[0]
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                windows.append(lm_eval_utils.make_disjoint_window(window))
                clusters.append(cluster)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _, _) in zip(owners, self._score_tokens(windows, clusters)):
            totals[owner] += logprob
        return totals

    @torch.inference_mode()
    def _score_tokens(
        self, encoded: Sequence[tuple[list[int], list[int]]], clusters: Sequence[int | None]
    ) -> list[tuple[float, int, bool]]:
        results: list[tuple[float, int, bool] | None] = [None] * len(encoded)
        # Longest first so that each batch pads little; left padding puts every continuation at the end,
        # so only the last positions' logits are needed.
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        for batch in _chunks(order, self.batch_size):
            inputs, n_targets = [], []
            for i in batch:
                context_tokens, continuation_tokens = encoded[i]
                whole = (context_tokens + continuation_tokens)[-(self.max_length + 1):]
                inputs.append(whole[:-1])
                n_targets.append(len(continuation_tokens))
            input_ids, attention_mask = self._left_pad(inputs)
            keep = max(n_targets)
            routing = self._routing_kwargs([clusters[i] for i in batch])
            if getattr(self.model.config, "variant", None) == "random_group":
                # Hash the context only, as training hashes the prompt and generation the prompt it is given.
                prompt_mask = attention_mask.clone()
                for row, count in enumerate(n_targets):
                    if count > 1:
                        prompt_mask[row, -(count - 1):] = 0
                routing["prompt_mask"] = prompt_mask
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask,
                position_ids=_position_ids(attention_mask), logits_to_keep=keep, **routing,
            ).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(batch):
                continuation = torch.tensor(encoded[i][1], device=self._device)
                row_log_probs = log_probs[row, keep - len(continuation):]
                token_log_probs = row_log_probs.gather(-1, continuation[:, None]).squeeze(-1)
                greedy = bool((row_log_probs.argmax(-1) == continuation).all())
                results[i] = (float(token_log_probs.sum()), len(continuation), greedy)
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self.generate([req.args[0] for req in requests], [req.args[1] for req in requests])

    @torch.inference_mode()
    def generate(self, contexts: Sequence[str], gen_kwargs: Sequence[dict[str, Any]] | dict[str, Any]) -> list[str]:
        """Greedy continuations of `contexts`, each cut at its first stop sequence (`until`)."""
        if isinstance(gen_kwargs, dict):
            gen_kwargs = [gen_kwargs] * len(contexts)
        outputs: list[str | None] = [None] * len(contexts)
        clusters = self.clusters_for(contexts)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, kwargs in enumerate(gen_kwargs):
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("MoCELM evaluates with greedy decoding only; got do_sample with temperature > 0")
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
            groups.setdefault((until, max_new), []).append(i)
        for (until, max_new), members in groups.items():
            encoded = {i: self.tok_encode(contexts[i])[-(self.max_length - max_new):] for i in members}
            ordered = sorted(members, key=lambda i: -len(encoded[i]))
            for batch in _chunks(ordered, self.batch_size):
                input_ids, attention_mask = self._left_pad([encoded[i] for i in batch])
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new,
                    do_sample=False, temperature=None, top_p=None, top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopOnStrings(self.tokenizer, until, input_ids.shape[1])]),
                    **self._routing_kwargs([clusters[i] for i in batch]),
                )
                new_tokens = generated[:, input_ids.shape[1]:]
                for row, i in enumerate(batch):
                    text = self.tokenizer.decode(new_tokens[row], skip_special_tokens=True)
                    outputs[i] = cut_at_stop(text, until)
        return outputs  # type: ignore[return-value]

    def _left_pad(self, sequences: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, tokens in enumerate(sequences):
            if tokens:
                input_ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
                attention_mask[row, width - len(tokens):] = 1
        return input_ids.to(self._device), attention_mask.to(self._device)


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains a stop string.

    transformers' own `stop_strings` pre-processes the whole vocabulary on every `generate` call, which costs
    more than the generation itself for short demo answers; decoding the new tokens per step is cheap.
    """

    def __init__(self, tokenizer: Any, until: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.until = [stop for stop in until if stop]
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.until:
            return done
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        for row, text in enumerate(texts):
            done[row] = any(stop in text for stop in self.until)
        return done


def input_side_text(messages: Iterable[dict[str, str]]) -> str:
    """What the router embeds: the system and user turns, never the assistant's answers."""
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant" and m["content"])


def cut_at_stop(text: str, until: Iterable[str]) -> str:
    cut = len(text)
    for stop in until:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
