"""All clients in one process, sharing one frozen base model: the default engine.

The engine owns the round loop and the bookkeeping (sampling, weights, channel, evaluation,
metrics, checkpoints); the method decides what moves and how it is combined. The engine never
branches on which method it runs, only on the method's declared traits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedlora.attack import tamper
from fedlora.channel import Channel, Ledger, MessageError, Schema, schema_of
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_fits,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.engines.layout import refuse_deployment
from fedlora.experiment import Experiment
from fedlora.lora import normalized
from fedlora.tensors import TensorDict
from fedlora.training import LocalResult, derived_seed, steps_per_round

SERVER = "server"


def client_name(client: int) -> str:
    return f"client{client}"


def sample_clients(
    num_clients: int, per_round: int | None, fraction: float | None, seed: int, round_index: int
) -> list[int]:
    """The clients of one round: all, a count, or a fraction, drawn without replacement."""
    if per_round is None and fraction is None:
        return list(range(num_clients))
    count = per_round if per_round is not None else max(1, round(fraction * num_clients))
    count = min(count, num_clients)
    rng = np.random.default_rng(derived_seed(seed, round_index, 0xC1))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def summarize_clients(per_client: list[dict[str, float]]) -> dict[str, float]:
    """Mean and spread of per-client metrics (methods that evaluate each client's own model)."""
    summary: dict[str, float] = {}
    for key in per_client[0]:
        values = np.asarray([m[key] for m in per_client])
        summary[key] = float(values.mean())
        summary[f"{key}_std"] = float(values.std())
        summary[f"{key}_min"] = float(values.min())
    return summary


def round_line(record: dict, rounds: int) -> str:
    shown = {
        k: v
        for k, v in record.items()
        if k in ("train_loss", "accuracy", "macro_f1", "test_loss", "perplexity", "rouge_l")
    }
    values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
    return f"round {record['round']}/{rounds}: {values}, {record['seconds']:.1f} s"


@dataclass
class RunResult:
    metrics: list[dict]
    ledger: Ledger
    stores: dict[int, TensorDict]
    notes: list[str] = field(default_factory=list)  # engine-specific Markdown for summary.md


class SimulationEngine:
    def __init__(self, experiment: Experiment, run_dir: Path, console: Console | None = None):
        self.exp = experiment
        self.run_dir = run_dir
        self.console = console or Console()
        self.channel = Channel(limit=experiment.config.federation.max_message_bytes)
        self.stores: dict[int, TensorDict] = {c: {} for c in range(len(experiment.clients))}
        self.absent: dict[int, str] = {}  # this round's clients that sent no reply, and why
        self.optimizers: dict[int, TensorDict] = {}
        self.metrics: list[dict] = []
        if experiment.method.needs_base_weights:
            weights = experiment.slots.model.state_dict()
            experiment.method.attach_base(
                {
                    m.key: weights[f"{m.key}.base_layer.weight"].to("cpu", torch.float32, copy=True)
                    for m in experiment.slots.modules
                }
            )

    # -- one hop through the channel -------------------------------------------------------
    def _transfer(
        self,
        tensors: TensorDict,
        sender: str,
        receiver: str,
        round_index: int,
        expect: Schema | None = None,
    ) -> TensorDict:
        """Deliver ``tensors``, checked against ``expect`` at the receiver (``MessageError``
        if refused, recorded in the ledger with the reason)."""
        if not self.exp.method.communicates:
            return tensors
        return self.channel.send(tensors, sender, receiver, round_index, expect)

    # -- clients that do not answer --------------------------------------------------------
    def required_steps(self, client: int) -> int:
        return steps_per_round(self.exp.config.train, len(self.exp.clients[client]))

    def missing(self, client: int, round_index: int) -> str | None:
        """Why a sampled client sends no reply this round, or None: a seeded dropout, or a
        straggler dropped at the deadline. A pure function of the config, so every process
        agrees without asking."""
        federation = self.exp.config.federation
        if federation.dropout > 0:
            rng = np.random.default_rng(
                derived_seed(self.exp.config.experiment.seed, round_index, client, 0xD0)
            )
            if rng.random() < federation.dropout:
                return "dropout"
        deadline, needs = federation.deadline_steps, self.required_steps(client)
        if deadline is not None and federation.stragglers == "drop" and needs > deadline:
            return f"straggler: needs {needs} steps, deadline {deadline}"
        return None

    def _keeps_optimizer(self) -> bool:
        configured = self.exp.config.train.keep_optimizer_state
        return self.exp.method.keeps_optimizer_state if configured is None else configured

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        method = self.exp.method
        if method.per_client_eval:
            return summarize_clients([self.client_metrics(c) for c in range(len(self.exp.clients))])
        state = method.global_state()
        return self.exp.evaluator.evaluate(state) if state is not None else {}

    def client_metrics(self, client: int) -> dict[str, float]:
        """Client ``client``'s own model on the test set (methods with ``per_client_eval``),
        wherever it lives: here, or on its worker in a distributed deployment."""
        method = self.exp.method
        own = method.own_model(client, self.stores[client])
        with self.exp.slots.scaled(method.client_scales(client)):
            return self.exp.evaluator.evaluate(own)

    def evaluation_due(self, round_index: int) -> bool:
        """Whether the round ends with an evaluation (every ``eval.every`` rounds, the last)."""
        config = self.exp.config
        last = round_index + 1 == config.experiment.rounds
        return last or (round_index + 1) % config.eval.every == 0

    def _sync_base(self) -> None:
        """Bring the shared frozen base to W0 + the method's merged offset (FLoRA), if any."""
        offset = self.exp.method.base_offset()
        if offset is not None:
            self.exp.slots.merge_into_base(offset)

    # -- the loop --------------------------------------------------------------------------
    def resume(self) -> int:
        checkpoint = load_checkpoint(self.run_dir)
        if checkpoint is None:
            return 0
        path = self.run_dir / CHECKPOINT
        self._check_layout(path, checkpoint.extra)
        check_fits(path, checkpoint.method, self.exp.method.state_dict(), "method tensor")
        clients = len(self.exp.clients)
        outside = sorted(c for c in (*checkpoint.stores, *checkpoint.optimizers) if c >= clients)
        if outside:
            raise CheckpointError(f"checkpoint {path}: client {outside[0]}, the run has {clients}")
        try:
            self.exp.method.load_state_dict(checkpoint.method)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit method state: {error}") from None
        self._sync_base()
        self.stores.update(checkpoint.stores)
        self.optimizers = checkpoint.optimizers
        self.metrics = checkpoint.metrics
        self.channel.ledger = Ledger.from_json(checkpoint.ledger)
        return checkpoint.completed_rounds

    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        config = self.exp.config
        rounds = config.experiment.rounds
        self._sync_base()  # a method may start from a moved base (FRLoRA: W0 − s·B0·A0)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not show_progress,
        ) as progress:
            for round_index in range(start_round, rounds):
                record = self.run_round(round_index, progress)
                self.metrics.append(record)
                if show_progress and not self.console.is_terminal:  # logs get one line a round
                    self.console.print(round_line(record, rounds), highlight=False, soft_wrap=True)
                self._write_round_files()
                self._save(round_index + 1)
        return RunResult(self.metrics, self.channel.ledger, self.stores)

    def _check_layout(self, path: Path, extra: dict) -> None:
        """Every client's state is in this one file: refuse a deployment rank's checkpoint."""
        refuse_deployment(path, extra)

    def _save(self, completed: int) -> None:
        """The checkpoint after ``completed`` rounds: everything, in one file."""
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                completed,
                self.exp.method.state_dict(),
                self.stores,
                self.optimizers,
                self.metrics,
                self.channel.ledger.to_json(),
            ),
        )

    def sampled(self, round_index: int) -> list[int]:
        """This round's clients: a pure function of the config, so every process agrees."""
        config = self.exp.config
        return sample_clients(
            len(self.exp.clients),
            config.federation.clients_per_round,
            config.federation.fraction,
            config.experiment.seed,
            round_index,
        )

    def client_work(
        self, client: int, message: TensorDict, round_index: int
    ) -> tuple[TensorDict, LocalResult]:
        """One client's half of a round, from the decoded message to the reply it sends back;
        wherever the client lives (this process, or a worker of the distributed engine)."""
        exp, method, config = self.exp, self.exp.method, self.exp.config
        start = method.client_start(client, message, self.stores[client])
        keep = self._keeps_optimizer()
        with exp.slots.scaled(method.client_scales(client)):
            result = exp.trainer.train(
                start,
                exp.clients[client],
                round_index,
                client,
                method.trainable,
                self.optimizers.get(client) if keep else None,
                regularizer=method.regularizer(client, message),
                max_steps=config.federation.deadline_steps,  # stragglers "cut": stop there
            )
        if keep:
            self.optimizers[client] = result.optimizer_state
        reply = method.client_reply(client, result.state, message, self.stores[client])
        seed = config.experiment.seed
        return tamper(reply, message, config.attack, client, seed, round_index), result

    def _train_clients(
        self, sampled: list[int], round_index: int
    ) -> Iterator[tuple[int, TensorDict | None, LocalResult | None]]:
        """(client, reply as the server accepted it, local result), client by client in order;
        None for a reply that never came or that the server refused (``absent`` says why)."""
        method = self.exp.method
        for client in sampled:
            name = client_name(client)
            sent = method.server_message(client, round_index)
            try:
                message = self._transfer(sent, SERVER, name, round_index, schema_of(sent))
            except MessageError as error:
                self.absent[client] = f"refused the download: {error}"
                yield client, None, None
                continue
            if reason := self.missing(client, round_index):
                self.absent[client] = reason
                yield client, None, None
                continue
            reply, result = self.client_work(client, message, round_index)
            yield client, self._accept(client, reply, sent, round_index), result

    def _accept(
        self, client: int, reply: TensorDict, sent: TensorDict, round_index: int
    ) -> TensorDict | None:
        """The reply as the server decoded it against the method's expected schema, or None
        if refused (the ledger holds the reason; the round goes on without it)."""
        expect = self.exp.method.expected_reply(client, sent)
        try:
            return self._transfer(reply, client_name(client), SERVER, round_index, expect)
        except MessageError as error:
            self.absent[client] = f"reply refused: {error}"
            return None

    def run_round(self, round_index: int, progress: Progress) -> dict:
        config = self.exp.config
        began = time.perf_counter()
        sampled = self.sampled(round_index)
        self.absent = {}
        task = progress.add_task(
            f"round {round_index + 1}/{config.experiment.rounds}", total=len(sampled), status=""
        )
        replies: dict[int, TensorDict] = {}
        losses, steps, examples = [], 0, 0
        for client, reply, result in self._train_clients(sampled, round_index):
            if reply is not None:
                replies[client] = reply
            if result is not None:
                losses.append(result.loss)
                steps += result.steps
                examples += result.examples
            status = f"loss {np.mean(losses):.4f}" if losses else "no reply"
            progress.update(task, advance=1, status=status)
        skipped = self._aggregate(round_index, replies)
        train_seconds = time.perf_counter() - began
        record = self._round_record(round_index, sampled, losses, steps, examples)
        record.update(self._reliability(round_index, sampled, replies, skipped))
        return self._close_record(record, round_index, progress, task, began, train_seconds)

    def weights(self, clients: list[int]) -> dict[int, float]:
        """Aggregation weights over the clients whose replies were accepted."""
        sizes = [len(self.exp.clients[c]) for c in clients]
        raw = sizes if self.exp.config.federation.weighting == "size" else [1] * len(clients)
        return dict(zip(clients, normalized(raw), strict=True))

    def _aggregate(self, round_index: int, replies: dict[int, TensorDict]) -> bool:
        """The method's server step over the accepted replies; with fewer than
        ``federation.min_replies`` the round is skipped (the global state stays). Returns
        whether it was skipped."""
        if len(replies) < self.exp.config.federation.min_replies:
            return True
        self.exp.method.aggregate(round_index, replies, self.weights(sorted(replies)))
        self._sync_base()
        return False

    def _reliability(
        self, round_index: int, sampled: list[int], replies: dict[int, TensorDict], skipped: bool
    ) -> dict:
        """What went missing this round (only when something did): clients without a reply
        and why, the refused messages (sender, reason), the clients aggregated, a skip."""
        if not self.absent and not skipped:
            return {}
        rejected = [
            {"sender": r.sender, "reason": r.rejected}
            for r in self.channel.ledger.rejections(round_index)
        ]
        absent = {str(c): why for c, why in sorted(self.absent.items())}  # JSON keys
        record: dict = {"aggregated": sorted(replies), "absent": absent}
        if rejected:
            record["rejected"] = rejected
        if skipped:
            record["skipped"] = True
        return record

    def _round_record(
        self, round_index: int, clients: list[int], losses: list[float], steps: int, examples: int
    ) -> dict:
        """What every server-based round reports: who trained, how much, and the bytes sent."""
        ledger = self.channel.ledger
        return {
            "round": round_index + 1,
            "clients": clients,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "steps": steps,
            "examples": examples,
            "bytes_up": ledger.total("up", round_index),
            "bytes_down": ledger.total("down", round_index),
            "cumulative_bytes": ledger.through_round(round_index),
        }

    def _close_record(
        self,
        record: dict,
        round_index: int,
        progress: Progress,
        task: TaskID,
        began: float,
        train_seconds: float,
    ) -> dict:
        """Evaluate if due, then stamp the round's times (evaluation counts in ``seconds``)."""
        self._evaluate_into(record, round_index, progress, task)
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - began
        return record

    def _evaluate_into(
        self, record: dict, round_index: int, progress: Progress, task: TaskID
    ) -> None:
        """Add test metrics to ``record`` on evaluation rounds (every ``eval.every``, the last)."""
        if self.evaluation_due(round_index):
            metrics = self.evaluate()
            # "loss" alone would be ambiguous next to train_loss.
            record.update(
                {("test_" + k if k.startswith("loss") else k): v for k, v in metrics.items()}
            )
            progress.update(
                task, status=", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "_" not in k)
            )

    def _write_round_files(self) -> None:
        (self.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(m) + "\n" for m in self.metrics)
        )
        self.channel.ledger.write_jsonl(self.run_dir / "ledger.jsonl")
