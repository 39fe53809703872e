"""Trainer settings and client sampling: schedules, work units, SGD, accumulation, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.config import TrainConfig, load_config
from fedlora.engines.server_round import sample_clients
from fedlora.experiment import build
from fedlora.tensors import is_head
from fedlora.training import (
    batch_stream,
    learning_rate,
    set_learning_rate,
    standard_optimizer,
    steps_per_round,
)
from tests.conftest import TINY, read_metrics, run_cli, trained


def test_schedules_warm_up_then_decay_to_zero() -> None:
    linear = TrainConfig(lr=1.0, scheduler="linear", warmup_steps=4)
    assert [learning_rate(linear, s, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(linear, 54, 104) == pytest.approx(0.5)
    assert learning_rate(linear, 104, 104) == 0.0
    cosine = TrainConfig(lr=2.0, scheduler="cosine")
    assert learning_rate(cosine, 0, 10) == 2.0 and learning_rate(cosine, 5, 10) == pytest.approx(
        1.0
    )
    assert learning_rate(TrainConfig(lr=0.3), 7, 10) == 0.3


def test_work_counted_in_steps_or_epochs() -> None:
    assert steps_per_round(TrainConfig(local_steps=5), 1000) == 5
    epochs = TrainConfig(local_epochs=2, batch_size=8, grad_accum=2)
    assert steps_per_round(epochs, 100) == 13  # ceil(2 * 100 / 16)
    assert steps_per_round(TrainConfig(local_epochs=1, batch_size=64), 10) == 1


def test_batches_cover_every_row_once_per_pass() -> None:
    stream = batch_stream(list(range(10, 20)), 5, seed=3)
    first_pass = next(stream) + next(stream)
    assert sorted(first_pass) == list(range(10, 20))
    assert next(batch_stream(list(range(10, 20)), 5, seed=3)) == first_pass[:5]


def test_client_sampling_is_seeded_and_sized() -> None:
    assert sample_clients(6, None, None, seed=0, round_index=0) == list(range(6))
    picked = sample_clients(20, 5, None, seed=0, round_index=3)
    assert len(picked) == 5 and len(set(picked)) == 5 and picked == sorted(picked)
    assert sample_clients(20, 5, None, seed=0, round_index=3) == picked
    assert sample_clients(20, 5, None, seed=0, round_index=4) != picked
    assert len(sample_clients(20, None, 0.25, seed=1, round_index=0)) == 5


def test_sgd_accumulation_schedule_epochs_and_sampling_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sgd"
    # Work in epochs: a copy of the tiny config without its local_steps (set one of the two).
    config = tmp_path / "epochs.toml"
    lines = (TINY / "fedit.toml").read_text().splitlines()
    config.write_text("\n".join(line for line in lines if not line.startswith("local_steps")))
    code, output = run_cli(
        "run", str(config), "--out", str(out), "--quiet",
        "--set", "train.optimizer=sgd", "--set", "train.grad_accum=2",
        "--set", "train.scheduler=cosine", "--set", "train.warmup_steps=1",
        "--set", "train.local_epochs=0.5", "--set", "federation.clients_per_round=2",
        "--set", "eval.every=2", "--set", "experiment.rounds=3",
    )  # fmt: skip
    assert code == 0, output
    rows = trained(read_metrics(out))
    assert [len(r["clients"]) for r in rows] == [2, 2, 2]
    assert ["accuracy" in r for r in rows] == [False, True, True]  # every 2 rounds and the last
    assert all(r["examples"] == r["steps"] * 2 * 8 for r in rows)  # 2 micro-batches of 8 a step


def test_head_lr_gives_the_head_its_own_rate_under_the_schedule() -> None:
    """SGD, no momentum: one step moves every tensor by lr × its gradient, so a 1000x smaller
    head rate moves the head 1000x less than the same step at the common rate, while the LoRA
    factors move exactly as without head_lr. The schedule keeps the head/body ratio."""
    experiment = build(
        load_config(TINY / "fedit.toml", ["train.optimizer=sgd", "train.momentum=0"])
    )
    trainer, start = experiment.trainer, experiment.method.context.initial
    rows = experiment.clients[0]

    def moved(config: TrainConfig) -> dict[str, float]:
        trainer.config = config
        state = trainer.train(dict(start), rows, 0, 0, lambda name: True).state
        return {k: float((state[k] - start[k]).norm()) for k in start}

    base = experiment.config.train.model_copy(update={"local_steps": 1})
    common = moved(base)
    slow = moved(base.model_copy(update={"head_lr": base.lr / 1000}))
    for name, distance in common.items():
        if is_head(name):
            assert slow[name] == pytest.approx(distance / 1000, rel=1e-3), name
        else:
            assert slow[name] == distance, name
    scheduled = base.model_copy(update={"head_lr": 0.5, "lr": 2.0, "scheduler": "linear"})
    optimizer = standard_optimizer(
        [(n, torch.nn.Parameter(v.clone())) for n, v in start.items()], scheduled
    )
    set_learning_rate(optimizer, scheduled, 5, 10)  # halfway down the linear decay
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.25]
