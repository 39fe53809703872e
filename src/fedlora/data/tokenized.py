"""Tokenize a split once and cut padded batches from it by row index.

Clients hold only row indices into the shared tokenized set, so a hundred simulated clients
cost a hundred index lists, not a hundred copies of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from fedlora.data.chat import IGNORE, Rendering, encode_choices, encode_conversation, messages_of


@dataclass
class TokenizedSet:
    """Token ids per example; ``labels`` are class ids or per-token targets (-100 = no loss)."""

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    pad_id: int
    causal: bool
    prompts: list[list[int]] | None = None  # causal only: prompt ids, for generation
    answers: list[str] | None = None  # causal only: reference answers
    # Multiple choice only: per item, each choice's tokens after its context (the context is
    # ``contexts``), the correct choice's index and each choice's length in characters.
    contexts: list[list[int]] | None = None
    continuations: list[list[list[int]]] | None = None
    gold: list[int] | None = None
    choice_chars: list[list[int]] | None = None

    @property
    def multiple_choice(self) -> bool:
        return self.continuations is not None

    def unfit_rows(self) -> list[int]:
        """Rows that did not fit ``model.max_length`` (empty: dropped by the truncation rule)."""
        return [row for row, ids in enumerate(self.input_ids) if not ids]

    def select(self, rows: list[int]) -> TokenizedSet:
        """The set restricted to ``rows``, in that order."""

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[r] for r in rows]

        return TokenizedSet(
            [self.input_ids[r] for r in rows],
            [self.labels[r] for r in rows],  # type: ignore[misc]
            self.pad_id,
            self.causal,
            pick(self.prompts),
            pick(self.answers),
            pick(self.contexts),
            pick(self.continuations),
            pick(self.gold),
            pick(self.choice_chars),
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded batch of the given rows."""
        width = max(len(self.input_ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = self.input_ids[r]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        if self.causal:
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for i, r in enumerate(rows):
                target = self.labels[r]
                labels[i, : len(target)] = torch.tensor(target)
        else:
            labels = torch.tensor([self.labels[r] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def prompt_batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Left-padded prompts, ready for ``generate``."""
        assert self.prompts is not None
        width = max(len(self.prompts[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = self.prompts[r]
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tokenize(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    causal: bool,
    rendering: Rendering | None = None,
) -> TokenizedSet:
    """Classification: the text, truncated. Causal: each conversation through its chat
    template with loss on the assistant turns (``fedlora.data.chat``); a record that does not
    fit gets no tokens (see ``unfit_rows``)."""
    pad_id = int(tokenizer.pad_token_id)
    if not causal:
        encoded = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)
        return TokenizedSet(encoded["input_ids"], list(dataset["label"]), pad_id, causal=False)
    rendering = rendering or Rendering()
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    prompts: list[list[int]] = []
    for record in dataset:
        encoded = encode_conversation(tokenizer, rendering, messages_of(record), max_length)
        inputs.append(encoded.ids)
        targets.append(encoded.targets)
        prompts.append(encoded.prompt)
    tokens = TokenizedSet(
        inputs, targets, pad_id, causal=True, prompts=prompts, answers=list(dataset["answer"])
    )
    if "choices" in dataset.column_names:
        contexts, tails = [], []
        for record in dataset:
            context, choice_ids = encode_choices(
                tokenizer, rendering, messages_of(record), record["choices"], max_length
            )
            contexts.append(context)
            tails.append(choice_ids)
        add_choices(tokens, dataset, contexts, tails)
    return tokens


def add_choices(
    tokens: TokenizedSet,
    dataset: Dataset,
    contexts: list[list[int]],
    tails: list[list[list[int]]],
) -> None:
    """Attach the multiple-choice parts (the tokens given, the rest from ``dataset``)."""
    tokens.contexts = contexts
    tokens.continuations = tails
    tokens.gold = list(dataset["gold"])
    tokens.choice_chars = [[len(choice) for choice in row] for row in dataset["choices"]]
