"""All clients in one process, sharing one frozen base model: the default engine.

The engine owns the round loop and the bookkeeping (sampling, weights, channel, evaluation,
metrics, checkpoints); the method decides what moves and how it is combined. The engine never
branches on which method it runs, only on the method's declared traits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
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
from fedlora.config import round_size
from fedlora.engines.layout import refuse_deployment
from fedlora.experiment import Experiment
from fedlora.lora import normalized
from fedlora.privacy.secagg import ChannelWire, SecureAggregationError
from fedlora.privacy.secure_round import SecureAggregation, SecureMean
from fedlora.report import TEST_KEYS
from fedlora.streaming import RunningMean
from fedlora.tensors import TensorDict
from fedlora.training import (
    WITHHELD,
    LocalResult,
    deadline_steps,
    derived_seed,
    steps_per_round,
    withheld,
)

SERVER = "server"


def client_name(client: int) -> str:
    return f"client{client}"


def sample_clients(
    num_clients: int, per_round: int | None, fraction: float | None, seed: int, round_index: int
) -> list[int]:
    """The clients of one round: all, a count, or a fraction, drawn without replacement."""
    if per_round is None and fraction is None:
        return list(range(num_clients))
    count = round_size(num_clients, per_round, fraction)
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
    shown = {k: v for k, v in record.items() if k == "train_loss" or k in TEST_KEYS}
    values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
    return f"round {record['round']}/{rounds}: {values}, {record['seconds']:.1f} s"


@dataclass
class RunResult:
    metrics: list[dict]
    ledger: Ledger
    stores: dict[int, TensorDict]
    notes: list[str] = field(default_factory=list)  # engine-specific Markdown for summary.md
    stopped: str | None = None  # why the run ended before its last round (privacy budget)


class SimulationEngine:
    def __init__(self, experiment: Experiment, run_dir: Path, console: Console | None = None):
        self.exp = experiment
        self.run_dir = run_dir
        self.console = console or Console()
        self.channel = Channel(limit=experiment.config.federation.max_message_bytes)
        self.stores: dict[int, TensorDict] = {c: {} for c in range(len(experiment.clients))}
        self.absent: dict[int, str] = {}  # this round's clients that sent no reply, and why
        self.reached: list[int] = []  # this round's clients that accepted the download
        self.expected: dict[int, Schema] = {}  # what the server expects of each one's reply
        self.skip_reason = ""  # why this round was skipped, if it was
        federation, privacy = experiment.config.federation, experiment.config.privacy
        clients = len(experiment.clients)
        size = round_size(clients, federation.clients_per_round, federation.fraction)
        self.privacy = experiment.privacy
        central = self.privacy.central if self.privacy else None
        self.secure = (
            SecureAggregation(privacy, size, central) if privacy.secure_aggregation else None
        )
        self.sent: dict[int, TensorDict] = {}  # under secure aggregation: each one's download
        self.optimizers: dict[int, TensorDict] = {}
        self.metrics: list[dict] = []
        # called with each round's record as it is kept (experiment trackers, fedlora.trackers)
        self.round_listeners: list[Callable[[dict], None]] = []
        self._charges: dict[int, dict[int, int]] = {}  # per round: privacy steps charged
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
        """Whether the round ends with an evaluation (every ``eval.every`` rounds, the last,
        and the last the privacy budget allows)."""
        config = self.exp.config
        last = round_index + 1 == config.experiment.rounds
        last = last or self.budget_stop(round_index + 1) is not None
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
        central = self.privacy.central if self.privacy else None
        if central is not None:
            if "privacy" not in checkpoint.extra:
                raise CheckpointError(
                    f"checkpoint {path} holds no central DP state (the clip norm); it was not "
                    "written by a run with privacy.mechanism 'central'"
                )
            central.load_state(checkpoint.extra["privacy"])
        return checkpoint.completed_rounds

    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        rounds = self.exp.config.experiment.rounds
        self._sync_base()  # a method may start from a moved base (FRLoRA: W0 − s·B0·A0)
        if start_round == 0:
            self._keep(self.initial_record(), show_progress)
            self._write_metrics()  # a run stopped before its first round still has it
        stopped = None
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
                self._save(round_index + 1)
        notes = [self.secure.describe()] if self.secure is not None else []
        return RunResult(self.metrics, self.channel.ledger, self.stores, notes, stopped=stopped)

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

    # -- the privacy budget ----------------------------------------------------------------
    def scheduled(self, round_index: int) -> dict[int, int]:
        """The clients that will run local steps in the round, and how many: a pure function
        of the config (sampled, not dropped out, cut at the deadline)."""
        config = self.exp.config
        return {
            c: deadline_steps(
                config.train, len(self.exp.clients[c]), config.federation.deadline_steps
            )
            for c in self.sampled(round_index)
            if self.missing(c, round_index) is None
        }

    def _spent(self, through_round: int) -> dict[int, int]:
        """The privacy steps charged in rounds 0..through_round (``fedlora.privacy.budget``)."""
        assert self.privacy is not None
        for r in range(through_round + 1):
            if r not in self._charges:
                self._charges[r] = self.privacy.charge(self.scheduled(r))
        return self.privacy.total(self._charges[r] for r in range(through_round + 1))

    def budget_stop(self, round_index: int) -> str | None:
        """Why the round may not run (it would exceed ``privacy.max_epsilon``), or None.
        Every process of a distributed run asks and gets the same answer."""
        if self.privacy is None:
            return None
        return self.privacy.refusal(round_index, self._spent(round_index))

    def _checkpoint_extra(self) -> dict:
        central = self.privacy.central if self.privacy else None
        return {"privacy": central.state()} if central is not None else {}

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
                self._checkpoint_extra(),
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
        reported = withheld(result) if exp.withholds_client_stats else result
        return tamper(reply, message, config.attack, client, seed, round_index), reported

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
            self.reached.append(client)
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
        if refused (the ledger holds the reason; the round goes on without it). Under secure
        aggregation the reply stays with its client, prepared for masking: only its masked form
        travels, in ``_aggregate``."""
        expect = self.exp.method.expected_reply(client, sent)
        if self.secure is not None:
            self.expected[client], self.sent[client] = expect, sent
            return self.secure.prepare(client, reply, sent)
        try:
            return self._transfer(reply, client_name(client), SERVER, round_index, expect)
        except MessageError as error:
            self.absent[client] = f"reply refused: {error}"
            return None

    def run_round(self, round_index: int, progress: Progress) -> dict:
        config = self.exp.config
        began = time.perf_counter()
        sampled = self.sampled(round_index)
        self.absent, self.reached, self.expected, self.skip_reason = {}, [], {}, ""
        self.sent = {}
        task = progress.add_task(
            f"round {round_index + 1}/{config.experiment.rounds}", total=len(sampled), status=""
        )
        replies: dict[int, TensorDict] = {}  # each accepted reply, or {} once folded
        running = RunningMean() if self.streams() else None
        losses, steps, examples = [], 0, 0
        for client, reply, result in self._train_clients(sampled, round_index):
            if reply is not None and running is not None:
                running.add(reply, self.raw_weight(client))
                replies[client] = {}
            elif reply is not None:
                replies[client] = reply
            if result is not None:
                losses.append(result.loss)
                steps += result.steps
                examples += result.examples
            status = f"loss {np.mean(losses):.4f}" if losses else "no reply"
            progress.update(task, advance=1, status=status)
        aggregated = self._aggregate(round_index, replies, running)
        train_seconds = time.perf_counter() - began
        record = self._round_record(round_index, sampled, losses, steps, examples)
        record.update(self._reliability(round_index, replies, aggregated))
        return self._close_record(record, round_index, progress, task, began, train_seconds)

    def raw_weight(self, client: int) -> float:
        """A client's aggregation weight before normalisation: its data size, or 1."""
        return float(
            len(self.exp.clients[client]) if self.exp.config.federation.weighting == "size" else 1
        )

    def weights(self, clients: list[int]) -> dict[int, float]:
        """Aggregation weights over the clients whose replies were accepted."""
        return dict(zip(clients, normalized([self.raw_weight(c) for c in clients]), strict=True))

    def streams(self) -> bool:
        """Whether the server folds each reply into a running sum (``fedlora.streaming``): the
        method's step needs only their weighted mean, under the plain mean aggregator, without
        central DP (which clips each update) or secure aggregation (no reply reaches it)."""
        method = self.exp.method
        return (
            not method.needs_each_reply
            and method.communicates
            and method.context.central is None
            and self.secure is None
            and self.exp.config.federation.aggregator == "mean"
        )

    def _aggregate(
        self, round_index: int, replies: dict[int, TensorDict], running: RunningMean | None
    ) -> list[int] | None:
        """The method's server step over the accepted replies (their running mean when
        streamed; under secure aggregation, their securely summed mean); with fewer than
        ``federation.min_replies``, or a secure sum that fails, the round is skipped (the global
        state stays). Returns the clients in the aggregate, None if skipped."""
        if self._too_few(len(replies)):
            return None
        if running is not None:
            self.exp.method.aggregate_mean(round_index, running.mean())
            aggregated = sorted(replies)
        elif self.secure is None:
            self.exp.method.aggregate(round_index, replies, self.weights(sorted(replies)))
            aggregated = sorted(replies)
        else:
            secure = self._secure_mean(round_index, replies)
            if secure is None:
                return None
            self.exp.method.aggregate_mean(round_index, secure.mean)
            aggregated = secure.summed
        self._sync_base()
        return aggregated

    def _secure_mean(self, round_index: int, held: dict[int, TensorDict]) -> SecureMean | None:
        """The weighted mean of the replies the clients hold, through the masking protocol
        among the clients that got the download (dropouts and stragglers leave it after
        ShareKeys); None, with the reason, if it fails or sums too few replies."""
        assert self.secure is not None
        wire = ChannelWire(self.channel, round_index, client_name, SERVER)
        weights = self.weights(self.sampled(round_index))  # known to all before the round
        try:
            secure = self.secure.mean(
                round_index, wire, held, self.expected, self.reached, weights, self.reference(held)
            )
        except SecureAggregationError as error:
            self.skip_reason = str(error)
            return None
        self.absent.update(secure.absent)
        return None if self._too_few(len(secure.summed)) else secure

    def reference(self, held: dict[int, TensorDict]) -> TensorDict:
        """The state the clients of ``held`` started from: a method whose server step is the
        mean of the replies sends every client the same download."""
        downloads = [self.sent[c] for c in held]
        first = downloads[0] if downloads else {}
        for other in downloads[1:]:
            if other is not first and any(not torch.equal(first[k], other[k]) for k in first):
                raise RuntimeError("secure aggregation needs every client to get the same download")
        return first

    def _too_few(self, replies: int) -> bool:
        """Whether ``replies`` are below ``federation.min_replies`` (the reason is kept)."""
        minimum = self.exp.config.federation.min_replies
        if replies < minimum:
            self.skip_reason = f"{replies} replies, fewer than federation.min_replies = {minimum}"
        return replies < minimum

    def _reliability(
        self, round_index: int, replies: dict[int, TensorDict], aggregated: list[int] | None
    ) -> dict:
        """What went missing this round (only when something did): clients without a reply
        and why, the refused messages (sender, reason), the clients aggregated, a skip and
        why."""
        skipped = aggregated is None
        if not self.absent and not skipped:
            return {}
        rejected = [
            {"sender": r.sender, "reason": r.rejected}
            for r in self.channel.ledger.rejections(round_index)
        ]
        absent = {str(c): why for c, why in sorted(self.absent.items())}  # JSON keys
        included = sorted(replies) if aggregated is None else aggregated
        record: dict = {"aggregated": included, "absent": absent}
        if rejected:
            record["rejected"] = rejected
        if skipped:
            record["skipped"] = True
            record["skip_reason"] = self.skip_reason
        return record

    def _round_record(
        self, round_index: int, clients: list[int], losses: list[float], steps: int, examples: int
    ) -> dict:
        """What every server-based round reports: who trained, how much, and the bytes sent
        (without the clients' loss and example counts where they withhold them)."""
        ledger = self.channel.ledger
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
        return self.without_withheld(record)

    def without_withheld(self, record: dict) -> dict:
        if self.exp.withholds_client_stats:
            for key in WITHHELD:
                record.pop(key, None)
        return record

    def _close_record(
        self,
        record: dict,
        round_index: int,
        progress: Progress,
        task: TaskID,
        began: float,
        train_seconds: float,
    ) -> dict:
        """The privacy spent so far, the evaluation if due, then the round's times (evaluation
        counts in ``seconds``)."""
        if self.privacy is not None:
            record.update(self.privacy.record(round_index, self._spent(round_index)))
        self._evaluate_into(record, round_index, progress, task)
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - began
        return record

    def _evaluate_into(
        self, record: dict, round_index: int, progress: Progress, task: TaskID
    ) -> None:
        """Add test metrics to ``record`` on evaluation rounds (every ``eval.every``, the last,
        and the last the privacy budget allows)."""
        if self.evaluation_due(round_index):
            metrics = self.test_metrics()
            record.update(metrics)
            progress.update(
                task,
                status=", ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if "_" not in k.removeprefix("test_")
                ),
            )

    def test_metrics(self) -> dict[str, float]:
        """``evaluate`` as a record holds it: "loss" alone would be ambiguous next to
        train_loss, so it is ``test_loss`` (and ``test_loss_std`` ...)."""
        metrics = self.evaluate()
        return {("test_" + k if k.startswith("loss") else k): v for k, v in metrics.items()}

    def _write_metrics(self) -> None:
        (self.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(m) + "\n" for m in self.metrics)
        )

    def _write_round_files(self) -> None:
        self._write_metrics()
        self.channel.ledger.write_jsonl(self.run_dir / "ledger.jsonl")
