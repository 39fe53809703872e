"""Test-set metrics of an adapter state: accuracy and macro-F1 for classification. For causal
language models: loss and perplexity on the answers, then multiple-choice accuracy (plain and
length-normalised) on multiple-choice data, or exact match, token F1 and ROUGE-L of generated
answers on instruction data (``fedlora.scoring``). With a validation split
the same metrics of it come alongside as ``val_*``: every engine evaluates through here, so every
engine reports them, and a study can choose by validation without ever looking at test."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score
from transformers import PreTrainedTokenizerBase

from fedlora.adapters import AdapterSlots
from fedlora.compute import Compute, on_cpu
from fedlora.config import EvalConfig
from fedlora.data.tokenized import IGNORE, TokenizedSet
from fedlora.scoring import (
    cached_choice_scores,
    choice_loglikelihoods,
    choice_metrics,
    exact_match,
    extract_answer,
    token_f1,
)
from fedlora.tensors import TensorDict
from fedlora.training import to_device

RowSelector = Callable[[TokenizedSet, list[int]], None]


class Evaluator:
    def __init__(
        self,
        slots: AdapterSlots,
        test: TokenizedSet,
        tokenizer: PreTrainedTokenizerBase,
        config: EvalConfig,
        compute: Compute | None = None,
        validation: TokenizedSet | None = None,
    ):
        self.compute = compute or on_cpu()
        self.slots = slots
        self.test = test
        self.validation = validation
        self.tokenizer = tokenizer
        self.batch_size = config.batch_size
        self.max_generate = config.max_generate
        self.max_new_tokens = config.max_new_tokens
        self.pattern = re.compile(config.answer_pattern) if config.answer_pattern else None
        self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self._select: RowSelector | None = None

    def _chunks(self, count: int) -> list[list[int]]:
        rows = list(range(count))
        return [rows[i : i + self.batch_size] for i in range(0, count, self.batch_size)]

    def _batch(
        self, data: TokenizedSet, rows: list[int], prompts: bool = False
    ) -> dict[str, torch.Tensor]:
        cut = data.prompt_batch(rows) if prompts else data.batch(rows)
        return to_device(cut, self.compute.device)

    def evaluate(
        self, state: TensorDict, rows: RowSelector | None = None, own: TokenizedSet | None = None
    ) -> dict[str, float]:
        """The test metrics, the validation set's as ``val_<metric>`` when there is one, and
        with ``own`` (a client's own share of the test set) its metrics as ``own_<metric>``.
        ``rows``, if given, is told the split and data rows of every forward's batch rows
        before it runs (per-example adapter weights follow them, ``fedlora.mixing``)."""
        self._select = rows
        try:
            with torch.no_grad(), self.compute.autocast():
                self.slots.load(state)
                self.slots.model.eval()
                metrics = self._evaluate(self.test)
                for prefix, data in (("val_", self.validation), ("own_", own)):
                    if data is not None:
                        scored = self._evaluate(data)
                        metrics.update({prefix + key: value for key, value in scored.items()})
                return metrics
        finally:
            self._select = None

    def splits(self, own: TokenizedSet | None = None) -> list[TokenizedSet]:
        """The sets ``evaluate`` scores: test, then validation and ``own`` where given."""
        return [d for d in (self.test, self.validation, own) if d is not None]

    def _see(self, data: TokenizedSet, rows: list[int]) -> None:
        if self._select is not None:
            self._select(data, rows)

    def _evaluate(self, data: TokenizedSet) -> dict[str, float]:
        """The metrics of one split under the loaded state."""
        model = self.slots.model
        if not data.causal:
            predictions, labels, losses = [], [], []
            for rows in self._chunks(len(data)):
                batch = self._batch(data, rows)
                self._see(data, rows)
                out = model(**batch)
                losses.append(float(out.loss) * len(rows))
                predictions.extend(out.logits.argmax(-1).tolist())
                labels.extend(batch["labels"].tolist())
            return {
                "accuracy": float(np.mean(np.asarray(predictions) == np.asarray(labels))),
                "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
                "loss": sum(losses) / len(labels),
            }
        total_loss, total_tokens = 0.0, 0
        scores: list[list[float]] = [[] for _ in range(len(data))]
        order = sorted(range(len(data)), key=lambda r: len(data.input_ids[r]))  # less padding
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            loss, tokens, choices = self._answer_pass(model, data, rows)
            total_loss, total_tokens = total_loss + loss, total_tokens + tokens
            for row, values in zip(rows, choices, strict=True):
                scores[row] = values
        mean_loss = total_loss / max(1, total_tokens)
        metrics = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0))}
        if data.multiple_choice:
            assert data.gold is not None and data.choice_chars is not None
            metrics |= choice_metrics(scores, data.gold, data.choice_chars)
        elif self.max_generate > 0:
            metrics |= self._generation(model, data)
        return metrics

    def _answer_pass(
        self, model: torch.nn.Module, data: TokenizedSet, rows: list[int]
    ) -> tuple[float, int, list[list[float]]]:
        """(summed answer-token loss, answer tokens, choice scores) of ``rows``: one forward of
        the reference conversations, keeping logits only where a loss or a choice is read.
        Multiple-choice items whose context is a prefix of their reference (no truncation cut
        between them) are scored off that forward's cache; others get a forward of their own."""
        batch = self._batch(data, rows)
        labels = batch["labels"]
        # Position p predicts token p + 1: the positions whose next token carries loss.
        keep = set((labels[:, 1:] != IGNORE).any(0).nonzero().flatten().tolist())
        contexts = [data.contexts[r] for r in rows] if data.contexts is not None else []
        shared = bool(contexts) and all(
            data.input_ids[r][: len(c)] == c and len(c) < len(data.input_ids[r])
            for r, c in zip(rows, contexts, strict=True)
        )
        keep |= {len(c) - 1 for c in contexts} if shared else set()
        positions = sorted(keep)
        device = self.compute.device
        self._see(data, rows)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=shared,
            logits_to_keep=torch.tensor(positions, device=device),
        )
        logits = out.logits.float()
        targets = labels[:, [p + 1 for p in positions]]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        tokens = int((targets != IGNORE).sum())
        if not data.multiple_choice:
            return float(loss), tokens, [[] for _ in rows]
        assert data.continuations is not None

        def items(chosen: list[int]) -> None:  # the rows of a continuation forward
            self._see(data, [rows[i] for i in chosen])

        if not shared:
            return float(loss), tokens, choice_loglikelihoods(model, data, rows, device, items)
        lengths = torch.tensor([len(c) for c in contexts], device=device)
        column = torch.tensor([positions.index(len(c) - 1) for c in contexts], device=device)
        first = logits[torch.arange(len(rows), device=device), column]
        tails = [data.continuations[r] for r in rows]
        return (
            float(loss),
            tokens,
            cached_choice_scores(model, out.past_key_values, lengths, first, tails, items),
        )

    def _generation(self, model: torch.nn.Module, data: TokenizedSet) -> dict[str, float]:
        """Exact match, token F1 and ROUGE-L F1 of greedy generations against the reference
        answers (true generation, not teacher-forced argmax), on the first
        ``eval.max_generate`` examples."""
        assert data.answers is not None
        count = min(self.max_generate, len(data))
        matches, f1s, rouges = [], [], []
        for rows in self._chunks(count):
            batch = self._batch(data, rows, prompts=True)
            self._see(data, rows)
            generated = model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, text in zip(rows, texts, strict=True):
                reference = data.answers[row]
                rouges.append(self._rouge.score(reference, text)["rougeL"].fmeasure)
                predicted = extract_answer(text, self.pattern, fallback=False)
                wanted = extract_answer(reference, self.pattern, fallback=True)
                matches.append(exact_match(predicted, wanted))
                f1s.append(token_f1(predicted, wanted))
        return {
            "exact_match": float(np.mean(matches)),
            "f1": float(np.mean(f1s)),
            "rouge_l": float(np.mean(rouges)),
        }
