"""Tokenize a split once and cut padded batches from it by row index.

Clients hold only row indices into the shared tokenized set, so a hundred simulated clients
cost a hundred index lists, not a hundred copies of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

IGNORE = -100


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The instruction prompt: the tokenizer's chat template where it has one."""
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return list(ids)
    return tokenizer(f"Question: {question}\nAnswer: ", add_special_tokens=True)["input_ids"]


@dataclass
class TokenizedSet:
    """Token ids per example; ``labels`` are class ids or per-token targets (-100 = no loss)."""

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    pad_id: int
    causal: bool
    prompts: list[list[int]] | None = None  # causal only: prompt ids, for generation
    answers: list[str] | None = None  # causal only: reference answers

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
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, causal: bool
) -> TokenizedSet:
    pad_id = int(tokenizer.pad_token_id)
    if not causal:
        encoded = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)
        return TokenizedSet(encoded["input_ids"], list(dataset["label"]), pad_id, causal=False)
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    prompts: list[list[int]] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for question, answer in zip(list(dataset["text"]), list(dataset["answer"]), strict=True):
        prompt = prompt_ids(tokenizer, question)[: max_length - 1]
        reply = (tokenizer(answer, add_special_tokens=False)["input_ids"] + eos)[
            : max_length - len(prompt)
        ]
        inputs.append(prompt + reply)
        # Loss on the answer tokens only: prompt positions are ignored.
        targets.append([IGNORE] * len(prompt) + reply)
        prompts.append(prompt)
    return TokenizedSet(
        inputs, targets, pad_id, causal=True, prompts=prompts, answers=list(dataset["answer"])
    )
