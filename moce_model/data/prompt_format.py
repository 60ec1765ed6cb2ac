"""Prompt formats: how an instruction (system, instruction, input) and its response become the model's text.

An experiment uses one format for everything: training labels, generation and evaluation all render prompts
through the same `PromptFormat`, so a model is always asked in the form it was trained on.

- `chat_template`: the tokenizer's own chat template (instruct models such as SmolLM2-Instruct).
- `human_assistant`: the reference code's format for base models without a chat template (LLaMA-2-7B):
  ``{bos}### System:\\n{system}\\n### Human:\\n{instruction}\\n{input}\\n### Assistant:\\n{response}{eos}``.
  As in the reference code, the system block is left out when there is no system prompt (and the input line
  when there is no input); unlike it, the text is tokenised without adding a second BOS.
- `auto`: `chat_template` when the tokenizer has one, else `human_assistant`.

Formats render text, special tokens included; it is always tokenised with ``add_special_tokens=False``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

# Label of the tokens the LM loss ignores (the prompt, padding): torch's and transformers' default.
IGNORE_INDEX = -100
Message = dict[str, str]
AUTO = "auto"
# Placeholders (Unicode private-use characters) rendered in place of a request's parts to learn a format's markup.
_SYSTEM_MARK, _USER_MARK = "\ue000system\ue000", "\ue000user\ue000"


# Between a routing text's system part and the rest: a character no valid instruction holds (C0 controls are
# rejected by the instructions' validation), so the encoder can take the system prompt apart when the experiment
# embeds it as the Instructor instruction (`embedder.instruction_source: system_prompt`). For every other setting
# the encoder reads it as a line break, which makes the text the one line per part it always was.
SYSTEM_SEPARATOR = "\x1e"


def routing_text(system: str | None, instruction: str | None, input: str | None) -> str:
    """The text the router embeds: the non-empty parts of system, instruction and input, stripped; the system
    part, when there is one, ends with SYSTEM_SEPARATOR and the others are one per line.

    Never the response, never a prompt format's markup, never few-shot examples: at inference the router
    sees only the request itself.
    """
    body = "\n".join(part.strip() for part in (instruction, input) if part and part.strip())
    head = system.strip() if system else ""
    if head and body:
        return head + SYSTEM_SEPARATOR + body
    return head or body


def split_routing_text(text: str) -> tuple[str, str]:
    """(system part, the rest) of a `routing_text`; the system part is empty when it had none."""
    head, separator, body = text.partition(SYSTEM_SEPARATOR)
    return (head, body) if separator else ("", text)


class PromptFormat(ABC):
    """A prompt format bound to a tokenizer. Subclasses define how messages are rendered."""

    name: str
    # Between an instruction and its input inside the user turn.
    input_separator: str

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> str:
        """A conversation (system / user / assistant messages) as text.

        `add_generation_prompt` ends with the header of the assistant's answer; `continue_final_message`
        leaves a final assistant message open (no end-of-turn marker) so the model continues it.
        """

    def messages(self, system: str | None, instruction: str, input: str | None) -> list[Message]:
        """One item's prompt as messages: an optional system turn, then one user turn."""
        user = f"{instruction}{self.input_separator}{input}" if input else instruction
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def prompt(self, system: str | None, instruction: str, input: str | None) -> str:
        """Everything before the response: what the model is given to answer the item."""
        return self.render(self.messages(system, instruction, input), add_generation_prompt=True)

    def completion(self, system: str | None, instruction: str, input: str | None, response: str) -> str:
        """What follows `prompt(...)` when `response` answers it, end-of-turn marker included (what training
        teaches, so the model learns to answer and to stop)."""
        messages = self.messages(system, instruction, input)
        prompt = self.render(messages, add_generation_prompt=True)
        full = self.render(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"prompt format {self.name!r} does not render the prompt as a prefix of the answered conversation; "
                "cannot separate the response from the prompt"
            )
        return full[len(prompt) :]

    def request_text(self, prompt: str) -> str | None:
        """The routing text (system + user turn) of a prompt this format rendered, None when `prompt` is not
        one: what a model that routes by itself embeds when it is handed a rendered prompt."""
        # Without a system turn first: a template's default system prompt is markup, not part of the request.
        for messages in (
            [{"role": "user", "content": _USER_MARK}],
            [{"role": "system", "content": _SYSTEM_MARK}, {"role": "user", "content": _USER_MARK}],
        ):
            markup = self.render(messages, add_generation_prompt=True)
            pattern = re.escape(markup).replace(re.escape(_SYSTEM_MARK), "(?P<system>.*?)")
            match = re.fullmatch(pattern.replace(re.escape(_USER_MARK), "(?P<user>.*)"), prompt, flags=re.DOTALL)
            if match:
                return routing_text(match.groupdict().get("system"), match["user"], None)
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text (it already holds its special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(
        self, system: str | None, instruction: str, input: str | None, response: str
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example; labels are IGNORE_INDEX on the prompt, so the loss is on the
        response and its end-of-turn marker only."""
        prompt = self.prompt(system, instruction, input)
        prompt_ids = self.encode(prompt)
        full_ids = self.encode(prompt + self.completion(system, instruction, input, response))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"prompt format {self.name!r}: the tokens of the prompt are not a prefix of the tokens of prompt + "
                f"response (the tokenizer merges across the boundary at {prompt[-20:]!r}); cannot label the response"
            )
        return full_ids, [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's own chat template; an empty system prompt lets the template apply its default."""

    name = "chat_template"
    input_separator = "\n\n"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"prompt format 'chat_template': the tokenizer {_tokenizer_name(tokenizer)} has no chat template; "
                f"use 'human_assistant' (or 'auto', which picks it for tokenizers without a template)"
            )
        super().__init__(tokenizer)

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )


class HumanAssistantFormat(PromptFormat):
    """The reference code's `### System / ### Human / ### Assistant` format, for base models."""

    name = "human_assistant"
    input_separator = "\n"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "eos_token", None):
            raise ValueError(
                f"prompt format 'human_assistant' ends every response with the EOS token, but the tokenizer "
                f"{_tokenizer_name(tokenizer)} has none"
            )
        super().__init__(tokenizer)

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> str:
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude each other")
        parts = [self.tokenizer.bos_token or ""]
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system":
                if index != 0:
                    raise ValueError(
                        f"prompt format 'human_assistant': a system message must come first (it is #{index})"
                    )
                if content:
                    parts.append(f"### System:\n{content}\n")
            elif role == "user":
                parts.append(f"### Human:\n{content}\n")
            elif role == "assistant":
                parts.append(f"### Assistant:\n{content}")
                if not (continue_final_message and index == len(messages) - 1):
                    parts.append(self.tokenizer.eos_token)
            else:
                raise ValueError(f"prompt format 'human_assistant': unknown message role {role!r} (message #{index})")
        if add_generation_prompt:
            parts.append("### Assistant:\n")
        return "".join(parts)


PROMPT_FORMATS: dict[str, type[PromptFormat]] = {
    ChatTemplateFormat.name: ChatTemplateFormat,
    HumanAssistantFormat.name: HumanAssistantFormat,
}


def resolve_prompt_format_name(name: str, tokenizer: Any) -> str:
    """The concrete format `name` stands for with this tokenizer (`auto` picks by the chat template)."""
    if name == AUTO:
        return ChatTemplateFormat.name if getattr(tokenizer, "chat_template", None) else HumanAssistantFormat.name
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; known: {[AUTO, *PROMPT_FORMATS]}")
    return name


def make_prompt_format(name: str, tokenizer: Any) -> PromptFormat:
    """The named prompt format (or `auto`) bound to `tokenizer`."""
    return PROMPT_FORMATS[resolve_prompt_format_name(name, tokenizer)](tokenizer)


def tokenize_example(
    fmt: PromptFormat, system: str | None, instruction: str, input: str | None, response: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels of one training example in `fmt`, cut at max_length."""
    input_ids, labels = fmt.tokenize(system, instruction, input, response)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _tokenizer_name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
