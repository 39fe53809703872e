"""Validation splits (carved or given), given test files, study grids chosen by validation, and
the plateau and verdict rules (issue 11)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from fedlora.config import ConfigError, DataConfig, PartitionConfig, load_config
from fedlora.data.partition import partition
from fedlora.data.sources import load_split
from tests.conftest import TINY, read_metrics, run_cli

FRUIT = ["apple", "pear", "plum", "grape", "melon", "lemon", "cherry", "peach"]
VEHICLE = ["truck", "train", "plane", "boat", "car", "bus", "bike", "ship"]


def write_toy(path: Path, rows: int, seed: int = 0, labels: tuple[str, ...] = ()) -> Path:
    """A keyword task a tiny random BERT learns in a few dozen steps: fruit words or vehicle
    words; each text ends in a unique row tag, so a text names its row. ``labels`` overrides
    the label of the first rows (to plant a label the training file lacks)."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        words, label = (FRUIT, "fruit") if i % 2 else (VEHICLE, "vehicle")
        label = labels[i] if i < len(labels) else label
        lines.append(" ".join(rng.choice(words) for _ in range(5)) + f",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_overrides(data: Path, *more: str, clients: int = 2) -> list[str]:
    """A tiny config on a toy file: IID clients, short sequences."""
    return [
        f"data.dataset={json.dumps(str(data))}",
        "model.max_length=16",
        "partition.kind=iid",
        f"partition.num_clients={clients}",
        *more,
    ]


def as_sets(overrides: list[str]) -> list[str]:
    """``--set`` arguments of the CLI."""
    return [arg for override in overrides for arg in ("--set", override)]


# -- the carved validation split -----------------------------------------------------------------


def test_validation_split_is_disjoint_stratified_and_leaves_test_alone() -> None:
    """On BBC News: validation, test and every client's rows are disjoint and together the whole
    corpus; validation has the training data's class shares; adding a validation split moves
    no test row (the same split_seed fixing the rows is tested on a small file below)."""
    split = load_split(DataConfig(validation_fraction=0.2), needs_answers=False)
    plain = load_split(DataConfig(), needs_answers=False)
    assert split.validation is not None
    assert list(split.test["text"]) == list(plain.test["text"])  # test is untouched

    val, test = set(split.validation["text"]), set(split.test["text"])
    clients = partition(split.train, PartitionConfig(), 5, seed=0)
    client_texts = [set(split.train.select(rows)["text"]) for rows in clients]
    assert not val & test
    for texts in client_texts:
        assert not texts & val and not texts & test
    assert set().union(*client_texts) == set(split.train["text"])
    assert len(val) + len(test) + len(split.train) == 2127  # deduplicated BBC News
    assert len(val) == math.ceil(0.2 * len(plain.train))

    # Stratified: each class's share of the validation set is its share of the training data
    # the validation set was carved from (train + validation), to within one example.
    carved_from = np.concatenate([split.train["label"], split.validation["label"]])
    expected = np.bincount(carved_from, minlength=5) / len(carved_from)
    shares = np.bincount(split.validation["label"], minlength=5) / len(val)
    assert np.abs(shares - expected).max() <= 1 / len(val)


def test_split_seed_fixes_the_validation_rows(tmp_path: Path) -> None:
    data = write_toy(tmp_path / "toy.csv", 80)

    def validation_rows(split_seed: int) -> list[str]:
        config = DataConfig(dataset=str(data), validation_fraction=0.25, split_seed=split_seed)
        validation = load_split(config, needs_answers=False).validation
        assert validation is not None
        return list(validation["text"])

    assert validation_rows(1) == validation_rows(1)
    assert set(validation_rows(1)) != set(validation_rows(2))


def test_validation_fraction_too_large_is_a_config_error(tmp_path: Path) -> None:
    data = write_toy(tmp_path / "toy.csv", 10)  # 8 training rows after the test split
    with pytest.raises(ConfigError, match=r"validation_fraction 0\.9 of 8 .* 0 training rows"):
        load_split(DataConfig(dataset=str(data), validation_fraction=0.9), False)
    with pytest.raises(ConfigError, match=r"gives 1 validation .* at least one of each of the 2"):
        load_split(DataConfig(dataset=str(data), validation_fraction=0.1), False)
    lonely = write_toy(tmp_path / "lonely.csv", 10, labels=("rare",))
    with pytest.raises(ConfigError, match=r"classes \['rare'\] have fewer than 2 training"):
        load_split(
            DataConfig(dataset=str(lonely), validation_fraction=0.3, test_file=str(data)), False
        )
    with pytest.raises(ConfigError, match=r"either validation_file .* or validation_fraction"):
        load_config(
            TINY / "fedit.toml", ["data.validation_fraction=0.2", "data.validation_file='v.csv'"]
        )
    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "run"), "--quiet",
        *as_sets(toy_overrides(data, "data.validation_fraction=0.9")),
    )  # fmt: skip
    assert code == 2 and "data.validation_fraction 0.9" in output and "Traceback" not in output


# -- validation metrics from every engine ---------------------------------------------------------


@pytest.mark.parametrize("name", ["fedit", "declora", "dlora"])
def test_every_engine_reports_validation_metrics(name: str, tmp_path: Path) -> None:
    """Simulation, gossip and split engines: every evaluation round carries val_* next to the
    test metrics; for FedIT they equal a naive one-example-at-a-time recomputation on the
    validation rows."""
    import torch
    from rich.console import Console

    from fedlora.engines.placements import local_loop
    from fedlora.experiment import build

    data = write_toy(tmp_path / "toy.csv", 40)
    overrides = toy_overrides(
        data,
        "data.validation_fraction=0.25",
        "experiment.rounds=1",
        "train.local_steps=2",
        clients=3,  # a ring needs three nodes
    )
    experiment = build(load_config(TINY / f"{name}.toml", overrides))
    engine = local_loop(experiment, tmp_path, Console(quiet=True))
    last = engine.run(show_progress=False).metrics[-1]
    assert experiment.split.validation is not None
    for key in ("accuracy", "macro_f1"):
        assert 0.0 <= last[key] <= 1.0 and 0.0 <= last[f"val_{key}"] <= 1.0
    assert last["val_loss"] > 0.0 and "test_loss" in last
    if name == "declora":
        assert "node_val_accuracy" in last  # every node's own model on the validation rows
    if name == "dlora":
        assert "val_accuracy_std" in last  # each user's adapter, summarized
    if name != "fedit":
        return
    validation = experiment.evaluator.validation
    assert validation is not None and len(validation) == len(experiment.split.validation)
    experiment.slots.load(experiment.method.global_state())
    model = experiment.slots.model.eval()
    hits, losses = [], []
    with torch.no_grad():
        for row, label in enumerate(experiment.split.validation["label"]):
            ids = torch.tensor([validation.input_ids[row]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
            top = logits.max()
            log_normalizer = top + np.log(np.exp(logits - top).sum())
            hits.append(int(logits.argmax()) == label)
            losses.append(log_normalizer - logits[label])  # cross-entropy of one example
    assert last["val_accuracy"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert last["val_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)


# -- given test and validation files ---------------------------------------------------------------


def test_given_files_are_used_exactly(tmp_path: Path) -> None:
    """With data.test_file and data.validation_file, the training file is all training data and
    the test and validation sets are exactly the files' rows, labels encoded as training's."""
    train = write_toy(tmp_path / "train.csv", 30, seed=0)
    test = write_toy(tmp_path / "test.csv", 9, seed=1)
    val = write_toy(tmp_path / "val.csv", 7, seed=2)
    config = DataConfig(
        dataset=str(train), test_file=str(test), validation_file=str(val), test_fraction=0.5
    )
    split = load_split(config, needs_answers=False)
    assert split.validation is not None

    def file_rows(path: Path) -> list[tuple[str, ...]]:
        return [tuple(line.rsplit(",", 1)) for line in path.read_text().splitlines()[1:]]

    def split_rows(dataset) -> list[tuple[str, ...]]:
        return [
            (t, split.label_names[y])
            for t, y in zip(dataset["text"], dataset["label"], strict=True)
        ]

    assert split_rows(split.test) == file_rows(test)
    assert split_rows(split.validation) == file_rows(val)
    assert sorted(split_rows(split.train)) == sorted(file_rows(train))  # test_fraction unused

    out = tmp_path / "run"
    overrides = toy_overrides(
        train, f"data.test_file={json.dumps(str(test))}",
        f"data.validation_file={json.dumps(str(val))}", "experiment.rounds=1",
        "train.local_steps=1",
    )  # fmt: skip
    code, output = run_cli(
        "run",
        str(TINY / "fedit.toml"),
        "--out",
        str(out),
        *as_sets(overrides),
    )
    assert code == 0, output
    assert "val_accuracy" in read_metrics(out)[-1] and "val_" in output  # the final table
    summary = (out / "summary.md").read_text()
    assert "30 training examples, 9 test" in summary and "7 validation" in summary
    assert "final val_accuracy" in summary


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"data\.test_file '.*nowhere\.csv' is not an existing"),
        ("column", r"data\.text_column 'text' is not a column of .*val\.csv; columns are: body"),
        ("label", r"data\.test_file .*: labels \['boat'\] do not occur in the training data"),
    ],
)
def test_given_file_errors_are_one_clear_line(case: str, message: str, tmp_path: Path) -> None:
    train = write_toy(tmp_path / "train.csv", 20)
    val = tmp_path / "val.csv"
    val.write_text("body,label\nsome words,fruit\n")
    odd = write_toy(tmp_path / "odd.csv", 4, labels=("boat",))  # "boat" is not a label
    given = {"missing": ("test_file", tmp_path / "nowhere.csv"), "column": ("validation_file", val)}
    key, path = given.get(case, ("test_file", odd))
    settings = [f"data.{key}={json.dumps(str(path))}"]
    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "run"), "--quiet",
        *as_sets(toy_overrides(train, *settings)),
    )  # fmt: skip
    assert code == 2, output
    text = " ".join(output.split())
    assert re.search(message, text), output
    assert "Traceback" not in output and text.count("error:") == 1


# -- study grids ----------------------------------------------------------------------------------


def write_study(path: Path, data: Path, validation: bool = True, metric: str = "") -> Path:
    """A 1-seed study with one grid arm: lr 1e-8 (nothing trains), 0.05 (learns the toy) and 3
    (AdamW steps that wreck it): the best point lies inside the grid, so no edge step is taken
    (tests/test_evidence.py covers those)."""
    sets = toy_overrides(data, "experiment.rounds=3", "train.local_steps=8")
    if validation:
        sets.append("data.validation_fraction=0.25")
    selection = f'[selection]\nmetric = "{metric}"\n' if metric else ""
    path.write_text(
        f'name = "toy_grid"\nseeds = [0]\nmetrics = ["accuracy"]\nset = {json.dumps(sets)}\n'
        f"{selection}"
        f'[[arms]]\nlabel = "FedIT"\nconfig = "{TINY / "fedit.toml"}"\n'
        'grid = { "train.lr" = [1e-8, 0.05, 3.0] }\n'
        '[[claims]]\nclaim = "FedIT beats itself"\narm = "FedIT"\nreference = "FedIT"\n'
    )
    return path


def test_study_grid_picks_the_better_validation_value(tmp_path: Path) -> None:
    """The grid's three runs (through the study's own command lines, in-process) are scored by
    val_accuracy: lr 1e-8 stays at chance, 0.05 learns the task, 3 wrecks it, so 0.05 must be
    chosen, and the table shows it with the chosen run's test accuracy."""
    from benchmarks.study import (
        choose,
        figure_arms,
        final_tasks,
        grid_tasks,
        load_study,
        report,
        results_table,
    )

    data = write_toy(tmp_path / "toy.csv", 60)
    study = load_study(write_study(tmp_path / "study.toml", data), root=tmp_path / "runs")
    tasks = grid_tasks(study)
    assert [t.overrides[-1] for t in tasks] == ["train.lr=1e-08", "train.lr=0.05", "train.lr=3.0"]
    assert final_tasks(study) == []  # nothing runs at a point before the grid is complete
    for task in tasks:
        code, output = run_cli(*task.argv())
        assert code == 0, output
    scores = {t.overrides[-1]: read_metrics(t.out)[-1]["val_accuracy"] for t in tasks}
    assert scores["train.lr=0.05"] > max(scores["train.lr=1e-08"], scores["train.lr=3.0"])
    (arm,) = study.arms
    assert choose(study, arm) == ("train.lr=0.05",)
    # The selection keeps the full budget, so the chosen grid run is seed 0's final run.
    assert [t.out for t in final_tasks(study)] == [tasks[1].out]

    table = results_table(study)
    row = next(line for line in table.splitlines() if line.startswith("| FedIT | 1 |"))
    test_accuracy = read_metrics(tasks[1].out)[-1]["accuracy"]
    assert "| train.lr=0.05 |" in row and f"{test_accuracy:.3f} ± 0.000" in row
    assert "| FedIT | train.lr=0.05 |" in table and "**chosen**" in table
    assert "fewer than two seeds" in table  # the claim's verdict: inconclusive on one seed

    # The figures draw the chosen run, the claim's reference marked (their contents:
    # tests/test_report.py).
    (drawn,) = figure_arms(study)
    assert drawn.reference and [run.path for run in drawn.runs] == [tasks[1].out]
    report(study, tmp_path / "figures")
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        "toy_grid.png",
        "toy_grid_final.png",
    }


def test_study_grid_without_validation_is_refused(tmp_path: Path) -> None:
    from benchmarks.study import StudyError, load_study

    data = write_toy(tmp_path / "toy.csv", 20)
    with pytest.raises(StudyError, match="has a grid but no validation split"):
        load_study(write_study(tmp_path / "a.toml", data, validation=False))
    with pytest.raises(StudyError, match=r"selection\.metric 'accuracy'.*never by test"):
        load_study(write_study(tmp_path / "b.toml", data, metric="accuracy"))
