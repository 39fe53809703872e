"""The run loop, written once for every topology and placement.

A run is: resume (or start), the initial model's record (round 0), then per round the privacy
budget's check, the topology's round (``Round.run``), the privacy spent, the evaluation when it
is due (every ``eval.every`` rounds, the last, and the last the budget allows), the round's
record to the listeners and files, and a checkpoint. The topology (a server's rounds, gossip,
the cloud-edge split) supplies the round; where the clients' state is kept, and so what a
checkpoint holds, is the ``Keeper``'s: every client in the run's one file (``CentralKeeper``:
in one process, on a pool, an observer) or each host's own clients in its own directory (a
deployment, ``fedlora.engines.distributed``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedlora.channel import Channel, Ledger
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_fits,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.engines.client import ClientRuntime
from fedlora.engines.layout import refuse_deployment
from fedlora.experiment import Experiment
from fedlora.report import TEST_KEYS
from fedlora.training import WITHHELD


@dataclass
class RunResult:
    metrics: list[dict]
    ledger: Ledger
    stores: dict[int, dict]
    notes: list[str] = field(default_factory=list)  # engine-specific Markdown for summary.md
    stopped: str | None = None  # why the run ended before its last round (privacy budget)


class Round(Protocol):
    """One topology's round, whatever the placement (``rounds``: server, gossip, split)."""

    exp: Experiment
    runtime: ClientRuntime  # the clients' state this process holds
    channel: Channel  # its ledger is the run's

    def open(self, start_round: int, run_dir: Path) -> None:
        """Before the first round of this process's run (start hosts, tell them where to start)."""

    def close(self) -> list[str]:
        """After the last round, also after a failure: stop hosts; the summary's notes."""
        ...

    def write_round_files(self, run_dir: Path) -> None:
        """Its own files after each round, beside metrics.jsonl and ledger.jsonl."""

    def finish(self, run_dir: Path, metrics: list[dict]) -> list[str]:
        """Its own files at the end of the run; the summary's notes."""
        ...

    def run(self, round_index: int, progress: Progress, task: TaskID) -> dict:
        """The round's record, before evaluation and times."""
        ...

    def evaluate(self) -> dict[str, float]: ...

    def scheduled(self, round_index: int) -> dict[int, int]:
        """The parties that run local steps in the round, and how many (privacy accounting)."""
        ...

    def initial(self) -> None:
        """Before round 0's record (a deployment's hosts report their own models)."""

    def restored(self, start_round: int) -> None:
        """After a resume from ``start_round`` completed rounds."""


def summarize_clients(per_client: list[dict[str, float]]) -> dict[str, float]:
    """Mean and spread of per-client metrics (methods that evaluate each client's own model)."""
    summary: dict[str, float] = {}
    keys = dict.fromkeys(key for metrics in per_client for key in metrics)  # in first-seen order
    for key in keys:  # a client without an own test share has no own_<metric>
        values = np.asarray([m[key] for m in per_client if key in m])
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std())
        summary[f"{key}_min"] = float(values.min())
    return summary


def without_withheld(exp: Experiment, record: dict) -> dict:
    """A round's record without the clients' loss and example counts where they withhold them."""
    if exp.withholds_client_stats:
        for key in WITHHELD:
            record.pop(key, None)
    return record


def work_record(
    exp: Experiment,
    ledger: Ledger,
    round_index: int,
    clients: list[int],
    losses: list[float],
    steps: int,
    examples: int,
) -> dict:
    """What a round with a server (or a cloud) reports: who trained, how much, and the bytes
    sent each way (without the clients' loss and example counts where they withhold them)."""
    record = {
        "round": round_index + 1,
        "clients": clients,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "steps": steps,
        "examples": examples,
        "bytes_up": ledger.total("up", round_index),
        "bytes_down": ledger.total("down", round_index),
        "cumulative_bytes": ledger.through_round(round_index),
    }
    return without_withheld(exp, record)


def round_line(record: dict, rounds: int) -> str:
    shown = {k: v for k, v in record.items() if k == "train_loss" or k in TEST_KEYS}
    values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
    return f"round {record['round']}/{rounds}: {values}, {record['seconds']:.1f} s"


def sync_base(exp: Experiment) -> None:
    """Bring the shared frozen base to W0 + the method's merged offset (FLoRA), if any."""
    offset = exp.method.base_offset()
    if offset is not None:
        exp.slots.merge_into_base(offset)


class Keeper(Protocol):
    """Where the clients' state is checkpointed."""

    def save(self, loop: RunLoop, completed: int) -> None: ...

    def resume(self, loop: RunLoop) -> int: ...


class CentralKeeper:
    """Every client's state in the run's one checkpoint file (one process, a pool, an
    observer): the method's state, the stores and optimizer states, metrics, ledger and the
    central DP state."""

    def save(self, loop: RunLoop, completed: int) -> None:
        runtime = loop.round.runtime
        checkpoint = Checkpoint(
            completed,
            loop.exp.method.state_dict(),
            runtime.stores,
            runtime.optimizers,
            loop.metrics,
            loop.round.channel.ledger.to_json(),
            loop.privacy_state(),
        )
        save_checkpoint(loop.run_dir, checkpoint)

    def resume(self, loop: RunLoop) -> int:
        checkpoint = load_checkpoint(loop.run_dir)
        if checkpoint is None:
            return 0
        path = loop.run_dir / CHECKPOINT
        refuse_deployment(path, checkpoint.extra)
        loop.load_server_state(path, checkpoint)
        clients = len(loop.exp.clients)
        outside = sorted(c for c in (*checkpoint.stores, *checkpoint.optimizers) if c >= clients)
        if outside:
            raise CheckpointError(f"checkpoint {path}: client {outside[0]}, the run has {clients}")
        runtime = loop.round.runtime
        runtime.stores.update(checkpoint.stores)
        runtime.optimizers = checkpoint.optimizers
        return checkpoint.completed_rounds


class RunLoop:
    """Start or resume, rounds, evaluation cadence, budget stop, records and run files."""

    def __init__(
        self,
        round_: Round,
        run_dir: Path,
        console: Console | None = None,
        keeper: Keeper | None = None,
    ) -> None:
        self.round = round_
        self.exp = round_.exp
        self.run_dir = run_dir
        self.console = console or Console()
        self.keeper = keeper or CentralKeeper()
        self.privacy = self.exp.privacy
        self.metrics: list[dict] = []
        # called with each round's record as it is kept (experiment trackers, fedlora.trackers)
        self.round_listeners: list[Callable[[dict], None]] = []
        self._charges: dict[int, dict[int, int]] = {}  # per round: privacy steps charged

    # -- checkpoints ------------------------------------------------------------------------
    def resume(self) -> int:
        start = self.keeper.resume(self)
        if start:
            self.round.restored(start)
        return start

    def load_server_state(self, path: Path, checkpoint: Checkpoint) -> None:
        """What the run's writer keeps whatever the placement: the method's state (and the
        base it moved), the metrics, the ledger and the central DP state."""
        check_fits(path, checkpoint.method, self.exp.method.state_dict(), "method tensor")
        try:
            self.exp.method.load_state_dict(checkpoint.method)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit method state: {error}") from None
        sync_base(self.exp)
        self.metrics = checkpoint.metrics
        self.round.channel.ledger = Ledger.from_json(checkpoint.ledger)
        central = self.privacy.central if self.privacy else None
        if central is not None:
            if "privacy" not in checkpoint.extra:
                raise CheckpointError(
                    f"checkpoint {path} holds no central DP state (the clip norm); it was not "
                    "written by a run with privacy.mechanism 'central'"
                )
            central.load_state(checkpoint.extra["privacy"])

    def privacy_state(self) -> dict:
        central = self.privacy.central if self.privacy else None
        return {"privacy": central.state()} if central is not None else {}

    # -- the loop ---------------------------------------------------------------------------
    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        rounds = self.exp.config.experiment.rounds
        sync_base(self.exp)  # a method may start from a moved base (FRLoRA: W0 − s·B0·A0)
        stopped, notes = None, []
        self.round.open(start_round, self.run_dir)
        try:
            if start_round == 0:
                self.round.initial()
                self._keep(self.initial_record(), show_progress)
                self._write_metrics()  # a run stopped before its first round still has it
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=self.console,
                disable=not show_progress or not self.console.is_terminal,  # logs: _keep's lines
            ) as progress:
                for round_index in range(start_round, rounds):
                    if stopped := self.budget_stop(round_index):
                        self.console.print(f"stopped: {stopped}", highlight=False, soft_wrap=True)
                        break
                    self._keep(self.run_round(round_index, progress), show_progress)
                    self._write_round_files()
                    self.keeper.save(self, round_index + 1)
            notes = self.round.finish(self.run_dir, self.metrics)
        finally:
            notes = self.round.close() + notes
        runtime = self.round.runtime
        return RunResult(self.metrics, self.round.channel.ledger, runtime.stores, notes, stopped)

    def run_round(self, round_index: int, progress: Progress) -> dict:
        """One round's record: the topology's round, the privacy spent so far, the evaluation
        if due, then its times (evaluation counts in ``seconds``)."""
        began = time.perf_counter()
        title = f"round {round_index + 1}/{self.exp.config.experiment.rounds}"
        task = progress.add_task(title, total=None, status="")
        record = self.round.run(round_index, progress, task)
        train_seconds = time.perf_counter() - began
        if self.privacy is not None:
            record.update(self.privacy.record(round_index, self._spent(round_index)))
        if self.evaluation_due(round_index):
            metrics = self.test_metrics()
            record.update(metrics)
            shown = [
                f"{k} {v:.4f}" for k, v in metrics.items() if "_" not in k.removeprefix("test_")
            ]
            progress.update(task, status=", ".join(shown))
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - began
        return record

    def _keep(self, record: dict, show_progress: bool) -> None:
        """A round's record into the metrics (logs get one line a round)."""
        self.metrics.append(record)
        for listener in self.round_listeners:
            listener(record)
        if show_progress and not self.console.is_terminal:
            line = round_line(record, self.exp.config.experiment.rounds)
            self.console.print(line, highlight=False, soft_wrap=True)

    def initial_record(self) -> dict:
        """Round 0: the initial model, evaluated before any training, so that every curve
        starts where training did (nothing trained, nothing sent yet). Evaluation draws no
        random numbers and leaves no state behind, so the rounds after it are unchanged."""
        began = time.perf_counter()
        record: dict = {"round": 0, "steps": 0, "examples": 0, "cumulative_bytes": 0}
        record.update(self.test_metrics())
        record["train_seconds"] = 0.0
        record["seconds"] = time.perf_counter() - began
        return record

    # -- evaluation -------------------------------------------------------------------------
    def evaluation_due(self, round_index: int) -> bool:
        """Whether the round ends with an evaluation (every ``eval.every`` rounds, the last,
        and the last the privacy budget allows)."""
        config = self.exp.config
        last = round_index + 1 == config.experiment.rounds
        last = last or self.budget_stop(round_index + 1) is not None
        return last or (round_index + 1) % config.eval.every == 0

    def test_metrics(self) -> dict[str, float]:
        """The round's evaluation as a record holds it: "loss" alone would be ambiguous next
        to train_loss, so it is ``test_loss`` (and ``test_loss_std`` ...)."""
        metrics = self.round.evaluate()
        return {("test_" + k if k.startswith("loss") else k): v for k, v in metrics.items()}

    # -- the privacy budget -----------------------------------------------------------------
    def _spent(self, through_round: int) -> dict[int, int]:
        """The privacy steps charged in rounds 0..through_round (``fedlora.privacy.budget``)."""
        assert self.privacy is not None
        for r in range(through_round + 1):
            if r not in self._charges:
                self._charges[r] = self.privacy.charge(self.round.scheduled(r))
        return self.privacy.total(self._charges[r] for r in range(through_round + 1))

    def budget_stop(self, round_index: int) -> str | None:
        """Why the round may not run (it would exceed ``privacy.max_epsilon``), or None.
        Every process of a distributed run asks and gets the same answer."""
        if self.privacy is None:
            return None
        return self.privacy.refusal(round_index, self._spent(round_index))

    # -- files ------------------------------------------------------------------------------
    def _write_metrics(self) -> None:
        (self.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(m) + "\n" for m in self.metrics)
        )

    def _write_round_files(self) -> None:
        self._write_metrics()
        self.round.channel.ledger.write_jsonl(self.run_dir / "ledger.jsonl")
        self.round.write_round_files(self.run_dir)
