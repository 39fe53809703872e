"""Scoring of causal language models: multiple-choice log-likelihoods against a naive loop
(one forward per choice, no cache, no padding), acc_norm by its formula, exact match, F1 and
answer extraction on hand-made cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datasets import Dataset

from fedlora.adapters import AdapterSlots
from fedlora.config import DataConfig, EvalConfig, LoraConfig
from fedlora.data.chat import Rendering
from fedlora.data.records import conversations
from fedlora.data.tokenized import tokenize
from fedlora.evaluation import Evaluator
from fedlora.models import load_base_model, load_tokenizer, model_spec
from fedlora.scoring import (
    choice_loglikelihoods,
    choice_metrics,
    exact_match,
    extract_answer,
    normalize_answer,
    token_f1,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [
    {"question": "Which is a colour?", "choices": ["red", "table", "seven"], "answer": "A"},
    {
        "question": "A much longer question about the capital city of France, which is it?",
        "choices": ["Paris", "Lyon", "Marseille on the coast", "Nice"],
        "answer": "A",
    },
    {"question": "2+2?", "choices": ["4", "five hundred and twelve"], "answer": "a"},
    {"question": "Pick the animal.", "choices": ["stone", "cat", "entertainment"], "answer": "b"},
    {"question": "Sky?", "choices": ["blue sky above", "green"], "answer": "B"},
]


@pytest.fixture(scope="module")
def scored() -> tuple[AdapterSlots, object, object, Dataset]:
    """The tiny LLaMA with random, non-zero LoRA factors (so the adapter changes the scores)
    and the items tokenized as a run tokenizes them."""
    tokenizer = load_tokenizer("tiny-llama")
    slots = AdapterSlots(
        load_base_model("tiny-llama", 1, tokenizer, seed=0),
        model_spec("tiny-llama"),
        LoraConfig(rank=4),
        1,
    )
    source = torch.Generator().manual_seed(0)
    slots.load({k: torch.randn(v.shape, generator=source) * 0.5 for k, v in slots.read().items()})
    slots.model.eval()
    table, kind = conversations(
        Dataset.from_list(ITEMS), DataConfig(format="multiple_choice"), "items"
    )
    assert kind == "multiple_choice"
    data = tokenize(table, tokenizer, 128, causal=True, rendering=Rendering())
    return slots, tokenizer, data, table


def naive_loglikelihood(model: torch.nn.Module, context: list[int], tail: list[int]) -> float:
    """One forward of context + tail alone, summing the tail tokens' log-probabilities."""
    ids = torch.tensor([context + tail])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(context) + t - 1, tail[t]]) for t in range(len(tail)))


def test_choice_tokens_follow_lm_eval_rule(scored) -> None:
    """Each choice's tokens are those of context + choice after the context's own tokens,
    with the context rendered by the chat template up to the generation prompt."""
    _, tokenizer, data, table = scored
    for row, item in enumerate(table):
        context = tokenizer.apply_chat_template(
            item["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        own = tokenizer(context, add_special_tokens=False)["input_ids"]
        assert data.contexts[row] == own
        for choice, tail in zip(item["choices"], data.continuations[row], strict=True):
            whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
            assert whole[: len(own)] == own and tail == whole[len(own) :]
    assert any(len(t) > 1 for row in data.continuations for t in row)  # the cached path runs


def test_multiple_choice_loglikelihoods_equal_a_naive_loop(scored) -> None:
    slots, _, data, _ = scored
    model = slots.model
    rows = list(range(len(data)))  # contexts of different lengths: left padding is exercised
    with torch.no_grad():
        batched = choice_loglikelihoods(model, data, rows, torch.device("cpu"))
    for row in rows:
        naive = [
            naive_loglikelihood(model, data.contexts[row], tail) for tail in data.continuations[row]
        ]
        np.testing.assert_allclose(batched[row], naive, atol=1e-5, rtol=0)
        assert int(np.argmax(batched[row])) == int(np.argmax(naive))
    # The adapter matters: the base alone scores differently.
    with torch.no_grad(), slots.model.disable_adapter():
        base = choice_loglikelihoods(model, data, rows, torch.device("cpu"))
    assert (
        max(
            abs(a - b)
            for x, y in zip(base, batched, strict=True)
            for a, b in zip(x, y, strict=True)
        )
        > 1e-3
    )


def test_evaluator_accuracy_and_acc_norm_follow_their_formulas(scored) -> None:
    slots, tokenizer, data, table = scored
    evaluator = Evaluator(slots, data, tokenizer, EvalConfig(batch_size=2))
    metrics = evaluator.evaluate(slots.read())
    gold = [0, 0, 0, 1, 1]
    assert list(table["gold"]) == gold
    naive = [
        [naive_loglikelihood(slots.model, data.contexts[r], t) for t in data.continuations[r]]
        for r in range(len(data))
    ]
    lengths = [[len(c) for c in item["choices"]] for item in ITEMS]
    accuracy = np.mean([np.argmax(s) == g for s, g in zip(naive, gold, strict=True)])
    norm = np.mean(
        [
            np.argmax(np.array(s) / np.array(n)) == g
            for s, n, g in zip(naive, lengths, gold, strict=True)
        ]
    )
    assert metrics["mc_accuracy"] == pytest.approx(accuracy)
    assert metrics["mc_accuracy_norm"] == pytest.approx(norm)
    assert metrics["loss"] == pytest.approx(naive_answer_loss(slots.model, data), rel=1e-5)


def naive_answer_loss(model: torch.nn.Module, data) -> float:
    """Mean cross-entropy of every loss-carrying token, one unpadded forward per example."""
    total, count = 0.0, 0
    for ids, targets in zip(data.input_ids, data.labels, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(
                model(input_ids=torch.tensor([ids])).logits[0].double(), -1
            )
        for t in range(1, len(ids)):
            if targets[t] != -100:
                total, count = total - float(logprobs[t - 1, targets[t]]), count + 1
    return total / count


def test_evaluator_scores_items_whose_prompt_was_cut(scored) -> None:
    """A record cut from the left for training has a context that is not a prefix of its
    tokens: its choices are scored by a forward of their own, still equal to the naive loop."""
    slots, tokenizer, _, _ = scored
    long = {"question": "Read this. " * 20 + "Which?", "choices": ["red", "green"], "answer": "B"}
    table, _ = conversations(Dataset.from_list([long, *ITEMS[:2]]), DataConfig(), "items")
    data = tokenize(table, tokenizer, 80, causal=True, rendering=Rendering())
    assert data.input_ids[0][: len(data.contexts[0])] != data.contexts[0]
    metrics = Evaluator(slots, data, tokenizer, EvalConfig(batch_size=8)).evaluate(slots.read())
    naive = [
        [naive_loglikelihood(slots.model, data.contexts[r], t) for t in data.continuations[r]]
        for r in range(len(data))
    ]
    gold = data.gold
    assert metrics["mc_accuracy"] == pytest.approx(
        np.mean([np.argmax(s) == g for s, g in zip(naive, gold, strict=True)])
    )
    assert metrics["loss"] == pytest.approx(naive_answer_loss(slots.model, data), rel=1e-5)


def test_choice_metrics_on_hand_made_scores() -> None:
    scores = [[-1.0, -2.0], [-6.0, -4.0], [-3.0, -9.0]]
    chars = [[1, 10], [2, 2], [1, 10]]
    # plain argmax: 0, 1, 0; per character: -1 vs -0.2 -> 1; -3 vs -2 -> 1; -3 vs -0.9 -> 1
    assert choice_metrics(scores, [0, 1, 1], chars) == {
        "mc_accuracy": pytest.approx(2 / 3),
        "mc_accuracy_norm": pytest.approx(2 / 3),
    }


@pytest.mark.parametrize(
    ("prediction", "reference", "match", "f1"),
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),
        ("  an  apple ", "Apple.", 1.0, 1.0),
        ("Paris, France", "Paris", 0.0, 2 * (1 / 2 * 1) / (1 / 2 + 1)),
        ("blue", "red", 0.0, 0.0),
        ("the cat sat on the mat", "a cat on a mat sat", 0.0, 1.0),
        ("the", "", 1.0, 1.0),  # both normalise to nothing
    ],
)
def test_exact_match_and_f1_on_hand_made_cases(
    prediction: str, reference: str, match: float, f1: float
) -> None:
    assert exact_match(prediction, reference) == match
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_normalisation_and_answer_extraction() -> None:
    assert normalize_answer("The  Quick, brown FOX.") == "quick brown fox"
    last_number = re.compile(r"(-?[\d,]*\.?\d+)")
    assert extract_answer("3 apples and 4 pears make 7.", last_number, fallback=False) == "7"
    assert extract_answer("#### 1,250", last_number, fallback=True) == "1,250"
    assert extract_answer("no digits here", last_number, fallback=False) == ""
    assert extract_answer("no digits here", last_number, fallback=True) == "no digits here"
    boxed = re.compile(r"\\boxed\{[^}]*\}")  # no group: the whole match
    assert extract_answer(r"so \boxed{12} it is", boxed, fallback=False) == r"\boxed{12}"
    assert extract_answer("anything", None, fallback=False) == "anything"
