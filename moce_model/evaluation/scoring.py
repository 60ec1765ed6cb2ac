"""Scoring continuations (log-probabilities), the half of `MoCELM` that scores (`BatchedScoring`).

The project's own benchmarks (held-out loss) are scored by `score_pairs`: longest first, in batches of
`batch_size` that mix routes (each row passes its own route to the model), right-padded with an attention
mask. A request's score does not depend on what it is batched with: the model routes every sequence by its own
row, the mask keeps padding out of attention and of the expert-use counts, and the right padding leaves each
real token's position as in the request alone. lm-eval's requests keep HFLM's own scoring loop (its logits cache
for multiple-choice tasks, `batch_size="auto"`, data parallelism): its batches, right-padded with token 0 and
without a mask, are told apart row by row here (`_scored_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moce_model.evaluation.routes import Route


def score_pairs(lm: Any, encoded: Sequence[tuple[str | None, Sequence[int], Sequence[int]]],
                routes: Sequence[Route | None], batch_size: int) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether it is the greedy one) of each (context, context tokens,
    continuation tokens), in the requests' order. `routes`: each request's route; `lm` a `MoCELM`, whose
    `_model_call` runs each batch. A request longer than the model's window keeps its last `max_length` + 1
    tokens, as lm-eval does. `batch_size` 1 scores one request per model call."""
    if len(routes) != len(encoded):
        raise ValueError(f"{len(routes)} routes for {len(encoded)} requests")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = [lm._fed_tokens(context_tokens, continuation_tokens) for _, context_tokens, continuation_tokens in encoded]
    # Longest first, as HFLM: a batch is padded to its first row, and running out of memory happens at once.
    order = sorted(range(len(encoded)), key=lambda index: -len(rows[index]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(rows[chunk[0]])
        inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for position, index in enumerate(chunk):
            inputs[position, :len(rows[index])] = torch.tensor(rows[index], dtype=torch.long)
            mask[position, :len(rows[index])] = 1
        logits = lm._model_call(inputs.to(lm.device), mask.to(lm.device), routes=[routes[i] for i in chunk],
                                contexts=[encoded[i][0] for i in chunk])
        for position, index in enumerate(chunk):
            continuation = torch.tensor(list(encoded[index][2]), dtype=torch.long, device=logits.device)
            end = len(rows[index])
            # Only the continuation's positions, in float32: the log-softmax over the vocabulary is the costly
            # part, and its sum over many tokens should not round in bf16.
            log_probs = torch.log_softmax(logits[position, end - len(continuation):end].float(), dim=-1)
            picked = log_probs.gather(1, continuation[:, None]).squeeze(1)
            results[index] = (float(picked.sum()), bool((log_probs.argmax(dim=-1) == continuation).all()))
    return results  # type: ignore[return-value]


class BatchedScoring:
    """The scoring half of `MoCELM` (its state is made in `MoCELM.__init__`)."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._counting() and self._row_routes is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        for strings, context_tokens, continuation_tokens in requests:
            # Rolling windows have no (context, continuation) strings: they count, but belong to no prompt.
            context = strings[0] if strings else None
            fed = self._fed_tokens(context_tokens, continuation_tokens)
            stripped = len(fed)
            while stripped and fed[stripped - 1] == 0:
                stripped -= 1
            self._scored_inputs.setdefault(tuple(fed[:stripped]), {})[len(fed)] = context
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scored_inputs.clear()

    def _fed_tokens(self, context_tokens: Sequence[int], continuation_tokens: Sequence[int]) -> tuple[int, ...]:
        """What HFLM feeds the model to score a request (see HFLM._loglikelihood_tokens): the row's tokens."""
        return tuple((list(context_tokens) + list(continuation_tokens))[-(self.max_length + 1):][:-1])

    def _scored_rows(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[str | None], list[tuple[int, ...]]]:
        """[B, T] True on the real tokens of a right-padded scoring batch of HFLM's, each row's context and its
        real tokens. Where two scored inputs differ only by trailing token-0s, the longer one that fits the row
        is taken."""
        mask = torch.zeros(inputs.shape, dtype=torch.bool, device=inputs.device)
        contexts: list[str | None] = []
        rows: list[tuple[int, ...]] = []
        for row_index, row in enumerate(inputs.tolist()):
            stripped = len(row)
            while stripped and row[stripped - 1] == 0:
                stripped -= 1
            lengths = {n: c for n, c in self._scored_inputs.get(tuple(row[:stripped]), {}).items() if n <= len(row)}
            if not lengths:
                raise RuntimeError(f"scoring batch row {row_index} matches no scored request: cannot tell its "
                                   "padding apart")
            length = max(lengths)
            mask[row_index, :length] = True
            contexts.append(lengths[length])
            rows.append(tuple(row[:length]))
        return mask, contexts, rows

    def _encoded_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) of a request as lm-eval's `TemplateLM.loglikelihood` encodes them
        (an empty context is the prefix token), so that scores are lm-eval's."""
        if context:
            return self._encode_pair(context, continuation)
        continuation_tokens = self.tok_encode(continuation, add_special_tokens=False)
        if continuation_tokens and continuation_tokens[0] == self.prefix_token_id:
            return continuation_tokens[:1], continuation_tokens[1:]
        return [self.prefix_token_id], continuation_tokens

    def loglikelihood_with_counts(
        self, pairs: Sequence[tuple[str, str]], move_trailing_whitespace: bool = True
    ) -> list[tuple[float, int, bool]]:
        """(log-probability, number of continuation tokens, is-greedy) per (context, continuation), scored in
        batches of `batch_size` that mix routes (`score_pairs`).

        lm-eval moves a context's trailing whitespace into the continuation (word boundaries); a prompt
        rendered in a prompt format ends in the format's newline, which belongs to the prompt, so callers
        scoring answers to rendered prompts pass `move_trailing_whitespace=False`.
        """
        encoded = []
        for context, continuation in pairs:
            if move_trailing_whitespace or not context:
                context_tokens, continuation_tokens = self._encoded_pair(context, continuation)
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
            encoded.append((context, context_tokens, continuation_tokens))
        if self.hashes_prompt:
            routes = [self._hashed_group(context_tokens) for _, context_tokens, _ in encoded]
        else:
            routes = self.routes_for([context for context, _ in pairs])
        batch_size = self.batch_size
        if batch_size == "auto":
            batch_size = self._detect_batch_size()
        scored = score_pairs(self, encoded, routes, int(batch_size))
        return [(logprob, len(tokens), greedy) for (logprob, greedy), (_, _, tokens) in zip(scored, encoded)]
