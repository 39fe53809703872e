"""Conversations to tokens: the chat template, the loss mask, truncation, multiple-choice
continuations.

A conversation is rendered to one string by a chat template: the tokenizer's own where it has
one (``data.chat_template = "auto"``), else ``PLAIN_TEMPLATE``. The string is tokenized once,
so training sees exactly the tokens a chat model sees. Loss falls on every assistant turn:
an assistant turn is the text that rendering the turn adds after the generation prompt, i.e.
what the model would have to generate (its content and the template's end-of-turn marker).
It is found by rendering the conversation up to the turn with the generation prompt, and up
to and including the turn, and taking the difference; the tokens that overlap it carry loss.
A template whose renderings are not prefixes of each other is refused (set
``data.chat_template = "none"``).

Too long for ``model.max_length``: ``truncation = "left"`` cuts the oldest tokens (the start
of the prompt) and keeps the record if its last answer still fits whole behind at least one
token of prompt; otherwise, and always under ``"drop"``, the record is dropped, and the run
counts and reports it. An answer is never cut.

Multiple choice is scored as lm-evaluation-harness scores it: the log-likelihood of each
choice's tokens after the prompt, where a choice's tokens are those of prompt + choice after
the prompt's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from fedlora.config import ConfigError

IGNORE = -100

# For tokenizers without a chat template (or data.chat_template = "none"). Each turn ends in a
# newline and each generated part starts after one, so tokens never straddle a turn boundary.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User:\n{{ message['content'] }}\n\n"
    "{% else %}Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)

Truncation = Literal["left", "drop"]


@dataclass(frozen=True)
class Rendering:
    """How conversations become tokens: the template choice and the length policy."""

    chat_template: Literal["auto", "none"] = "auto"
    truncation: Truncation = "left"

    def template(self, tokenizer: PreTrainedTokenizerBase) -> str:
        if self.chat_template == "auto" and tokenizer.chat_template:
            return str(tokenizer.chat_template)
        return PLAIN_TEMPLATE


@dataclass
class Encoded:
    """One conversation's tokens: input ids, per-token targets (IGNORE = no loss) and the
    prompt before its last answer (what generation and multiple-choice scoring start from).
    Empty ``ids``: the record does not fit ``max_length`` and is dropped."""

    ids: list[int]
    targets: list[int]
    prompt: list[int]


def render(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict[str, str]],
    generation_prompt: bool,
) -> str:
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    return str(text)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]], str]:
    """(rendered conversation, character spans of its assistant turns, the rendered prompt
    before the last turn with the generation prompt)."""
    full = render(tokenizer, template, messages, generation_prompt=False)
    spans, before = [], ""
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:k], generation_prompt=True)
        upto = render(tokenizer, template, messages[: k + 1], generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)) or len(upto) == len(before):
            raise ConfigError(
                "the tokenizer's chat template does not render a conversation's turns as "
                "prefixes of each other, so its assistant turns cannot be located; set "
                'data.chat_template = "none" (fedlora\'s plain template)'
            )
        spans.append((len(before), len(upto)))
    return full, spans, before


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    rendering: Rendering,
    messages: list[dict[str, str]],
    max_length: int,
) -> Encoded:
    """Tokens and loss mask of one conversation, truncated as ``rendering`` says."""
    template = rendering.template(tokenizer)
    full, spans, before = assistant_spans(tokenizer, template, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = list(encoded["offset_mapping"])
    targets = [
        token
        if any(start < end_span and end > start_span for start_span, end_span in spans)
        else IGNORE
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]
    prompt = tokenizer(before, add_special_tokens=False)["input_ids"][-(max_length - 1) :]
    if len(ids) <= max_length:
        return Encoded(ids, targets, prompt)
    last_start = spans[-1][0]
    answer_begins = next(i for i, (_, end) in enumerate(offsets) if end > last_start)
    cut = len(ids) - max_length
    if rendering.truncation == "drop" or cut >= answer_begins:
        return Encoded([], [], [])
    return Encoded(ids[cut:], targets[cut:], prompt)


def continuations(
    tokenizer: PreTrainedTokenizerBase, context: str, choices: list[str]
) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each choice's: the tokens of context + choice after the
    context's own (lm-evaluation-harness's rule), or the choice's alone where joining them
    changes the context's last tokens, so that every choice extends the same context."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    tails = []
    for choice in choices:
        whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
        if whole[: len(context_ids)] == context_ids:
            tails.append(whole[len(context_ids) :])
        else:
            tails.append(tokenizer(choice, add_special_tokens=False)["input_ids"])
    return context_ids, tails


def encode_choices(
    tokenizer: PreTrainedTokenizerBase,
    rendering: Rendering,
    messages: list[dict[str, str]],
    choices: list[str],
    max_length: int,
) -> tuple[list[int], list[list[int]]]:
    """The scoring context of a multiple-choice record (its conversation up to the answer,
    with the generation prompt) and each choice's continuation; the context is cut from the
    left so that it and the longest choice fit ``max_length``."""
    template = rendering.template(tokenizer)
    context = render(tokenizer, template, messages[:-1], generation_prompt=True)
    context_ids, tails = continuations(tokenizer, context, choices)
    room = max_length - max(len(tail) for tail in tails)
    if room < 1:
        raise ConfigError(
            f"model.max_length {max_length} is shorter than a choice's tokens; raise it"
        )
    return context_ids[-room:], tails


def messages_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """A dataset row's turns as plain dicts (datasets returns them as such already; this
    drops any extra keys a struct column may carry)."""
    return [{"role": t["role"], "content": t["content"]} for t in record["messages"]]
