"""The tokenized-data cache: a hit gives exactly the tokens the tokenizer gives, every input
that decides the tokens is in the key, and a damaged or foreign file is never trusted."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from safetensors.torch import save_file

from fedlora.config import DataConfig
from fedlora.data import token_cache
from fedlora.data.records import conversations
from fedlora.data.token_cache import FORMAT, cache_key, encode, tokenize_cached
from fedlora.data.tokenized import IGNORE, TokenizedSet
from fedlora.models import load_tokenizer
from tests.conftest import ONE, TINY, run_cli, timeless_metrics

TEXTS = [
    "Shares in the bank rose after the results were published on Monday morning.",
    "The striker scored twice in the second half to win the cup final.",
    "A new phone with a folding screen goes on sale next month.",
    "Ministers will vote on the budget before the summer recess.",
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(token_cache.CACHE_ENV, str(directory))
    return directory


def classification() -> Dataset:
    return Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2, 3]})


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors")) if directory.exists() else []


def test_a_hit_gives_the_tokenizers_own_tokens(cache: Path) -> None:
    tokenizer = load_tokenizer("tiny-bert")
    data = classification()
    first = tokenize_cached(data, tokenizer, 12, causal=False)
    assert len(files(cache)) == 1
    second = tokenize_cached(data, tokenizer, 12, causal=False)
    assert len(files(cache)) == 1
    # Independent: the tokenizer called row by row.
    expected = [tokenizer(t, truncation=True, max_length=12)["input_ids"] for t in TEXTS]
    assert first.input_ids == expected
    assert second.input_ids == expected
    assert second.labels == [0, 1, 2, 3]
    assert max(len(row) for row in second.input_ids) == 12


def test_the_cache_file_is_what_a_hit_reads(cache: Path) -> None:
    tokenizer = load_tokenizer("tiny-bert")
    data = classification()
    tokenize_cached(data, tokenizer, 12, causal=False)
    (path,) = files(cache)
    # Replace the entry by a different, well-formed set under the same key: a hit returns it.
    other = TokenizedSet([[101, 7, 102]] * 4, [3, 2, 1, 0], tokenizer.pad_token_id, causal=False)
    key = path.stem
    save_file(encode(other), str(path), metadata={"format": FORMAT, "key": key})
    hit = tokenize_cached(data, tokenizer, 12, causal=False)
    assert hit.input_ids == other.input_ids
    assert hit.labels == [3, 2, 1, 0]


@pytest.mark.parametrize("damage", ["truncated", "foreign key", "token outside vocabulary"])
def test_a_damaged_entry_is_ignored_and_rewritten(cache: Path, damage: str) -> None:
    tokenizer = load_tokenizer("tiny-bert")
    data = classification()
    good = tokenize_cached(data, tokenizer, 12, causal=False)
    (path,) = files(cache)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "foreign key":
        save_file(encode(good), str(path), metadata={"format": FORMAT, "key": "0" * 64})
    else:
        bad = TokenizedSet([[len(tokenizer) + 5]] * 4, [0, 1, 2, 3], 0, causal=False)
        save_file(encode(bad), str(path), metadata={"format": FORMAT, "key": path.stem})
    again = tokenize_cached(data, tokenizer, 12, causal=False)
    assert again.input_ids == good.input_ids
    assert again.labels == good.labels
    # Rewritten: the next read is a hit with the right tokens.
    assert tokenize_cached(data, tokenizer, 12, causal=False).input_ids == good.input_ids


def test_the_key_changes_with_everything_that_decides_the_tokens() -> None:
    tokenizer = load_tokenizer("tiny-bert")
    data = classification()
    key = cache_key(data, tokenizer, 12, causal=False)
    changed_text = Dataset.from_dict({"text": [*TEXTS[:3], TEXTS[3] + "!"], "label": [0, 1, 2, 3]})
    changed_label = Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2, 2]})
    others = {
        cache_key(data, tokenizer, 13, causal=False),
        cache_key(changed_text, tokenizer, 12, causal=False),
        cache_key(changed_label, tokenizer, 12, causal=False),
        cache_key(data, load_tokenizer("tiny-llama"), 12, causal=False),
    }
    assert key not in others and len(others) == 4
    # Calling the tokenizer with truncation changes its backend's state, not the key.
    tokenizer(TEXTS, truncation=True, max_length=7)
    assert cache_key(data, tokenizer, 12, causal=False) == key


def test_instruction_data_round_trips(cache: Path) -> None:
    tokenizer = load_tokenizer("tiny-llama")
    data, _ = conversations(
        Dataset.from_dict(
            {
                "text": ["What is the capital of France?", "Name a colour."],
                "answer": ["Paris is the capital.", "Blue."],
            }
        ),
        DataConfig(),
        "rows",
    )
    first = tokenize_cached(data, tokenizer, 64, causal=True)
    hit = tokenize_cached(data, tokenizer, 64, causal=True)
    assert len(files(cache)) == 1
    assert hit.input_ids == first.input_ids
    assert hit.labels == first.labels
    assert hit.prompts == first.prompts
    assert hit.answers == ["Paris is the capital.", "Blue."]
    for ids, targets, prompt in zip(hit.input_ids, hit.labels, hit.prompts, strict=True):
        assert ids[: len(prompt)] == prompt
        assert targets[: len(prompt)] == [IGNORE] * len(prompt)
        assert targets[len(prompt) :] == ids[len(prompt) :]


def test_off_writes_nothing_and_an_unwritable_cache_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer("tiny-bert")
    data = classification()
    expected = [tokenizer(t, truncation=True, max_length=12)["input_ids"] for t in TEXTS]
    monkeypatch.setenv(token_cache.CACHE_ENV, "off")
    assert token_cache.cache_dir() is None
    assert tokenize_cached(data, tokenizer, 12, causal=False).input_ids == expected
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(token_cache.CACHE_ENV, str(blocker / "cache"))
    assert tokenize_cached(data, tokenizer, 12, causal=False).input_ids == expected
    assert not (blocker / "cache").exists()


def test_a_run_from_the_cache_equals_a_run_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(TINY / "fedit.toml")
    monkeypatch.setenv(token_cache.CACHE_ENV, "off")
    code, output = run_cli("run", config, "--out", str(tmp_path / "plain"), *ONE)
    assert code == 0, output
    directory = tmp_path / "cache"
    monkeypatch.setenv(token_cache.CACHE_ENV, str(directory))
    for name in ("cold", "warm"):
        code, output = run_cli("run", config, "--out", str(tmp_path / name), *ONE)
        assert code == 0, output
    # The tiny config's train and test splits.
    assert len(files(directory)) == 2
    plain = timeless_metrics(tmp_path / "plain")
    assert timeless_metrics(tmp_path / "cold") == plain
    assert timeless_metrics(tmp_path / "warm") == plain
