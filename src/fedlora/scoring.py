"""Scores of a causal language model: multiple choice by log-likelihood, generated answers by
exact match and token F1.

Multiple choice follows lm-evaluation-harness's definitions: a choice's score is the summed
log-probability of its tokens after the prompt; ``mc_accuracy`` picks the highest score,
``mc_accuracy_norm`` the highest score per character of the choice (``acc_norm``). It costs
one forward of each prompt, not one per choice: the prompt's keys and values are cached, the
first token of every choice is read off the prompt's last position, and only the choices'
remaining tokens run, against the cache. The evaluator shares even that forward with the
test loss: the reference answer's forward holds the prompt's cache (``cached_choice_scores``).

Exact match and F1 compare answers after SQuAD's normalisation (lower case, no punctuation, no
articles a/an/the, single spaces); F1 is over the normalised words. An optional regex pulls
the answer out of both texts first (its last match; its first group where it has one), as
for arithmetic answers whose last number is what counts.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable

import torch
from transformers import DynamicCache

from fedlora.data.tokenized import TokenizedSet

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)
# Choice rows per forward against a copied prompt cache (its memory is rows x prompt length).
CONTINUATION_ROWS = 32


def normalize_answer(text: str) -> str:
    text = text.lower().translate(PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def extract_answer(text: str, pattern: re.Pattern[str] | None, fallback: bool) -> str:
    """The last match of ``pattern`` in ``text`` (its first group if it has groups); with no
    match, ``text`` itself if ``fallback`` (a reference) else "" (a prediction that states no
    answer is wrong)."""
    if pattern is None:
        return text
    matches = list(pattern.finditer(text))
    if not matches:
        return text if fallback else ""
    last = matches[-1]
    return last.group(1) if pattern.groups else last.group(0)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, seq in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


ItemsHook = Callable[[list[int]], None]  # told which items (positions in the batch) a forward holds


def choice_loglikelihoods(
    model: torch.nn.Module,
    data: TokenizedSet,
    rows: list[int],
    device: torch.device,
    on_items: ItemsHook | None = None,
) -> list[list[float]]:
    """Per item of ``rows``, each choice's summed log-probability given the item's context:
    one forward of the contexts, then ``cached_choice_scores``."""
    assert data.contexts is not None and data.continuations is not None
    contexts = [data.contexts[r] for r in rows]
    ids, mask = right_padded(contexts, data.pad_id)
    lengths = torch.tensor([len(c) for c in contexts])
    last = sorted(set((lengths - 1).tolist()))  # only these positions' logits are needed
    if on_items is not None:
        on_items(list(range(len(rows))))
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        use_cache=True,
        logits_to_keep=torch.tensor(last, device=device),
    )
    column = torch.tensor([last.index(n - 1) for n in lengths.tolist()], device=device)
    first = out.logits[torch.arange(len(rows), device=device), column]
    tails = [data.continuations[r] for r in rows]
    return cached_choice_scores(
        model, out.past_key_values, lengths.to(device), first, tails, on_items
    )


def cached_choice_scores(
    model: torch.nn.Module,
    cache: DynamicCache,
    lengths: torch.Tensor,
    first: torch.Tensor,
    tails: list[list[list[int]]],
    on_items: ItemsHook | None = None,
) -> list[list[float]]:
    """Each choice's log-probability given its item's context, where item i's context is the
    first ``lengths[i]`` columns of row i of ``cache`` (later columns, padding or a reference
    answer, are masked out) and ``first[i]`` holds the logits after it. A choice's first
    token is read off ``first``; its later tokens run against a copy of the cache rows they
    need, ``CONTINUATION_ROWS`` choices per forward; ``on_items`` is told the item of each
    row of every such forward."""
    logprobs = torch.log_softmax(first.float(), dim=-1)
    scores = [[float(logprobs[i, tail[0]]) for tail in row] for i, row in enumerate(tails)]
    longer = [(i, j) for i, row in enumerate(tails) for j, tail in enumerate(row) if len(tail) > 1]
    for start in range(0, len(longer), CONTINUATION_ROWS):
        pairs = longer[start : start + CONTINUATION_ROWS]
        if on_items is not None:
            on_items([i for i, _ in pairs])
        values = continuation_scores(model, cache, lengths, pairs, [tails[i][j] for i, j in pairs])
        for (i, j), value in zip(pairs, values, strict=True):
            scores[i][j] += value
    return scores


def continuation_scores(
    model: torch.nn.Module,
    cache: DynamicCache,
    lengths: torch.Tensor,
    pairs: list[tuple[int, int]],
    tails: list[list[int]],
) -> list[float]:
    """The log-probability of each tail's tokens after its first, the tails right-padded and
    placed after the cache's columns, at the positions that follow their contexts."""
    device = lengths.device
    items = torch.tensor([i for i, _ in pairs], device=device)
    cached = cache.layers[0].keys.shape[-2]
    width = max(len(t) for t in tails) - 1
    inputs = torch.zeros((len(tails), width), dtype=torch.long, device=device)
    tail_mask = torch.zeros((len(tails), width), dtype=torch.long, device=device)
    for k, tail in enumerate(tails):
        inputs[k, : len(tail) - 1] = torch.tensor(tail[:-1])
        tail_mask[k, : len(tail) - 1] = 1
    context = lengths[items].unsqueeze(-1)
    context_mask = (torch.arange(cached, device=device) < context).long()
    selected = DynamicCache(
        ddp_cache_data=[(layer.keys[items], layer.values[items]) for layer in cache.layers]
    )
    logits = model(
        input_ids=inputs,
        attention_mask=torch.cat([context_mask, tail_mask], dim=1),
        position_ids=context + torch.arange(width, device=device),
        past_key_values=selected,
        use_cache=False,
    ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [
        float(sum(logprobs[k, t - 1, tail[t]] for t in range(1, len(tail))))
        for k, tail in enumerate(tails)
    ]


def choice_metrics(
    scores: list[list[float]], gold: list[int], chars: list[list[int]]
) -> dict[str, float]:
    """``mc_accuracy`` (argmax of the summed log-probabilities) and ``mc_accuracy_norm``
    (argmax of log-probability per character of the choice)."""
    plain = [max(range(len(s)), key=s.__getitem__) == g for s, g in zip(scores, gold, strict=True)]
    normed = [
        max(range(len(s)), key=lambda j, s=s, c=c: s[j] / c[j]) == g
        for s, g, c in zip(scores, gold, chars, strict=True)
    ]
    return {
        "mc_accuracy": sum(plain) / len(plain),
        "mc_accuracy_norm": sum(normed) / len(normed),
    }
