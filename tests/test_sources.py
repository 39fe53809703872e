"""Data sources: the packaged corpora and local files, with clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.config import ConfigError, DataConfig
from fedlora.data.sources import bbc_news, chatterbot, load_split


def test_bbc_news_is_deduplicated_with_five_topics() -> None:
    data = bbc_news()
    assert len(data) == 2225 - 98
    assert data.features["label"].names == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]
    assert len(set(data["text"])) == len(data)


def test_bbc_split_is_fixed_and_stratified() -> None:
    first = load_split(DataConfig(), needs_answers=False)
    again = load_split(DataConfig(), needs_answers=False)
    assert list(first.test["text"]) == list(again.test["text"])
    assert len(first.test) == 426 and len(first.train) == 1701
    shares = [list(first.test["label"]).count(c) / len(first.test) for c in range(5)]
    totals = [list(bbc_news()["label"]).count(c) / 2127 for c in range(5)]
    assert shares == pytest.approx(totals, abs=0.01)


def test_chatterbot_pairs_have_categories() -> None:
    data = chatterbot()
    assert len(data) > 1000 and {"text", "answer", "label"} <= set(data.column_names)
    assert "tech_support" in data.features["label"].names


def test_local_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [
        {"review": f"text number {i}", "stars": "good" if i % 2 else "bad", "site": i % 3}
        for i in range(40)
    ]
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\n" + "".join(f"{r['review']},{r['stars']}\n" for r in rows))
    for path in (jsonl, csv):
        split = load_split(
            DataConfig(dataset=str(path), text_column="review", label_column="stars"), False
        )
        assert split.label_names == ["bad", "good"]
        assert len(split.train) + len(split.test) == 40
    kept = load_split(
        DataConfig(dataset=str(jsonl), text_column="review", label_column="stars"), False
    )
    assert "site" in kept.train.column_names  # other columns stay, for natural partitions


def test_local_file_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"body": "a", "label": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"data\.text_column 'text' is not a column.*body"):
        load_split(DataConfig(dataset=str(path)), False)
    with pytest.raises(
        ConfigError,
        match=r"format 'text' reads data\.answer_column 'answer', which is not a column",
    ):
        load_split(DataConfig(dataset=str(path), text_column="body"), True)
    with pytest.raises(ConfigError, match="has no answers"):
        load_split(DataConfig(dataset="bbc-news"), True)  # a causal LM needs prompt/answer pairs
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_split(DataConfig(dataset=str(tmp_path / "x.txt")), False)
