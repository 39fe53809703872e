"""A server's round, written once for every placement (methods with ``engine = "simulation"``).

The server samples the round's clients (a pure function of the seed and round), packs every
download with the channel, hands them to its ``Hosts`` (the placement: this process, a pool of
worker processes, torch.distributed ranks, Flower SuperNodes), and takes each client's reply in
client order: every transfer is recorded in the ledger down then up, client by client, a
refused download or reply with the receiver's reason; each accepted reply is validated against
the method's schema and folded into the aggregate (a running mean when the method's step needs
only that, ``fedlora.streaming``). Then the method's server step, the round's record, and what
went missing and why. The method decides what moves and how it is combined; the round never
branches on which method it runs, only on the method's declared traits, and never on the
placement.

Under secure aggregation a reply stays with its client; only its masked form travels, through
the masking protocol among the clients that got the download (``fedlora.engines.masking``). Hosts
that keep their clients' replies (torch.distributed ranks) carry the protocol to them
(``Hosts.masking``); where the replies come back to this process (here, the worker pool: one
machine), the clients' parties run here, and the replies stay unread by the server (outside
the ledger).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.progress import Progress, TaskID

from fedlora.channel import Channel, MessageError, Schema, Transfer, decode
from fedlora.config import round_size
from fedlora.engines.client import SERVER, ClientRuntime, client_name, from_outcome, missing
from fedlora.engines.loop import summarize_clients, sync_base, work_record
from fedlora.engines.masking import (
    Carrier,
    ChannelExchange,
    LocalCarrier,
    MaskingClients,
    secure_aggregation,
)
from fedlora.experiment import Experiment
from fedlora.lora import normalized
from fedlora.privacy.secagg import SecureAggregationError
from fedlora.privacy.secure_round import SecureMean
from fedlora.streaming import RunningMean
from fedlora.tensors import TensorDict
from fedlora.training import LocalResult, deadline_steps, derived_seed


def sample_clients(
    num_clients: int, per_round: int | None, fraction: float | None, seed: int, round_index: int
) -> list[int]:
    """The clients of one round: all, a count, or a fraction, drawn without replacement."""
    if per_round is None and fraction is None:
        return list(range(num_clients))
    count = round_size(num_clients, per_round, fraction)
    rng = np.random.default_rng(derived_seed(seed, round_index, 0xC1))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def sampled_clients(exp: Experiment, round_index: int) -> list[int]:
    """A round's clients: a pure function of the config, so every process agrees."""
    config = exp.config
    return sample_clients(
        len(exp.clients),
        config.federation.clients_per_round,
        config.federation.fraction,
        config.experiment.seed,
        round_index,
    )


def round_weights(exp: Experiment, round_index: int) -> dict[int, float]:
    """The aggregation weights over all of a round's sampled clients: what secure
    aggregation's inputs carry, known to every party before the round."""
    return weights_of(exp, sampled_clients(exp, round_index))


def weights_of(exp: Experiment, clients: list[int]) -> dict[int, float]:
    """Aggregation weights over ``clients``: by data size or uniform, normalised."""
    by_size = exp.config.federation.weighting == "size"
    raw = [float(len(exp.clients[c]) if by_size else 1) for c in clients]
    return dict(zip(clients, normalized(raw), strict=True))


class Hosts(Protocol):
    """Where a server's clients run and how their bytes travel: the placement of a server
    round. A download is the channel's bytes; an answer is the client runtime's
    (``ClientRuntime.answer``: the reply's bytes and a report). A placement that subclasses it
    keeps the defaults of what it does not need (nothing to start, to collect, to report)."""

    def open(self, start_round: int) -> None:
        """Before the first round (start workers, tell hosts where the run starts)."""

    def close(self) -> list[str]:
        """After the last round or a failure; the summary's notes about the placement."""
        return []

    def dispatch(self, downloads: dict[int, bytes], offset: TensorDict, round_index: int) -> None:
        """Start every sampled client's download on its way, with the merged base offset every
        party trains on (FLoRA; empty otherwise)."""

    def answer(self, client: int, round_index: int) -> tuple[bytes, dict]:
        """Client ``client``'s answer, once it came (or why it did not)."""
        ...

    def close_round(self, sampled: list[int], round_index: int) -> None:
        """After the round's last answer (state that comes back, reports)."""

    def initial(self) -> None:
        """Before round 0's record."""

    def client_metrics(self) -> list[dict[str, float]] | None:
        """Every client's own-model metrics, in client order, where the hosts evaluate them
        (they hold the models); None where this process holds every client's state."""
        return None

    def masking(self) -> Carrier | None:
        """Secure aggregation: how the protocol reaches hosts that keep their clients' replies;
        None where the replies come back to this process (their parties run here)."""
        return None


class ServerRound:
    def __init__(self, experiment: Experiment, runtime: ClientRuntime, hosts: Hosts) -> None:
        self.exp = experiment
        self.runtime = runtime
        self.hosts = hosts
        self.channel = Channel(limit=experiment.config.federation.max_message_bytes)
        self.absent: dict[int, str] = {}  # this round's clients that sent no reply, and why
        self.gone: list[int] = []  # secure aggregation: summed, then vanished before unmasking
        self.reached: list[int] = []  # this round's clients that accepted the download
        self.expected: dict[int, Schema] = {}  # what the server expects of each one's reply
        self.sent: dict[int, TensorDict] = {}  # under secure aggregation: each one's download
        self.skip_reason = ""  # why this round was skipped, if it was
        self.secure = secure_aggregation(experiment)
        # under secure aggregation, the replies that come back to this process, and their parties
        self.held_here = (
            MaskingClients(experiment, self.secure, self.round_weights) if self.secure else None
        )
        if experiment.method.needs_base_weights:
            weights = experiment.slots.model.state_dict()
            experiment.method.attach_base(
                {
                    m.key: weights[f"{m.key}.base_layer.weight"].to("cpu", torch.float32, copy=True)
                    for m in experiment.slots.modules
                }
            )

    # -- the run around the rounds ------------------------------------------------------------
    def open(self, start_round: int, run_dir: Path) -> None:
        self.hosts.open(start_round)

    def close(self) -> list[str]:
        notes = [self.secure.describe()] if self.secure is not None else []
        return notes + self.hosts.close()

    def initial(self) -> None:
        self.hosts.initial()

    def restored(self, start_round: int) -> None:
        """Nothing beyond the checkpoint."""

    def write_round_files(self, run_dir: Path) -> None:
        """None beyond the loop's."""

    def finish(self, run_dir: Path, metrics: list[dict]) -> list[str]:
        return []

    def sampled(self, round_index: int) -> list[int]:
        return sampled_clients(self.exp, round_index)

    def scheduled(self, round_index: int) -> dict[int, int]:
        """The clients that will run local steps in the round, and how many: a pure function
        of the config (sampled, not dropped out, cut at the deadline)."""
        config = self.exp.config
        return {
            c: deadline_steps(
                config.train, len(self.exp.clients[c]), config.federation.deadline_steps
            )
            for c in self.sampled(round_index)
            if missing(self.exp, c, round_index) is None
        }

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The global model here; for methods that evaluate each client's own model, every
        client's, wherever it lives (here, or on its host), averaged."""
        method = self.exp.method
        if method.per_client_eval:
            hosted = self.hosts.client_metrics()
            if hosted is None:
                hosted = [self.runtime.metrics(c) for c in range(len(self.exp.clients))]
            return summarize_clients(hosted)
        state = method.global_state()
        return self.exp.evaluator.evaluate(state) if state is not None else {}

    # -- one round ----------------------------------------------------------------------------
    def run(self, round_index: int, progress: Progress, task: TaskID) -> dict:
        sampled = self.sampled(round_index)
        self.absent, self.reached, self.expected, self.skip_reason = {}, [], {}, ""
        self.gone = []
        self.sent = {}
        progress.update(task, total=len(sampled))
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
        ledger = self.channel.ledger
        record = work_record(self.exp, ledger, round_index, sampled, losses, steps, examples)
        record.update(self._reliability(round_index, replies, aggregated))
        return record

    def _train_clients(
        self, sampled: list[int], round_index: int
    ) -> Iterator[tuple[int, TensorDict | None, LocalResult | None]]:
        """(client, reply as the server accepted it, local result), client by client in order;
        None for a reply that never came or that the server refused (``absent`` says why)."""
        method = self.exp.method
        down: dict[int, tuple[bytes, TensorDict]] = {}
        for client in sampled:
            message = method.server_message(client, round_index)
            down[client] = (self._pack(message, SERVER, round_index), message)
        offset = method.base_offset() or {}
        self.hosts.dispatch({c: payload for c, (payload, _) in down.items()}, offset, round_index)
        for client in sampled:
            payload, sent = down[client]
            answer, report = self.hosts.answer(client, round_index)
            refused = report.get("refused")
            self._count(payload, len(sent), SERVER, client_name(client), round_index, refused)
            if report["outcome"] is None:
                self.absent[client] = report["reason"]
                if refused is None:
                    self.reached.append(client)
                yield client, None, None
                continue
            self.reached.append(client)
            reply = self._receive(client, answer, sent, round_index)
            yield client, reply, from_outcome(report["outcome"])
        self.hosts.close_round(sampled, round_index)

    # -- bytes and the ledger -----------------------------------------------------------------
    def _pack(self, tensors: TensorDict, sender: str, round_index: int) -> bytes:
        return self.channel.pack(tensors, sender, round_index) if tensors else b""

    def _count(
        self,
        payload: bytes,
        tensors: int,
        sender: str,
        receiver: str,
        round_index: int,
        refused: str | None = None,
    ) -> None:
        """Record a transfer (not an empty message, nor one of a method that does not
        communicate), with the receiver's reason if it refused it."""
        if payload and self.exp.method.communicates:
            if refused is not None:
                transfer = Transfer(round_index, sender, receiver, len(payload), 0, refused)
            else:
                transfer = Transfer(round_index, sender, receiver, len(payload), tensors)
            self.channel.ledger.add(transfer)

    def _receive(
        self, client: int, payload: bytes, sent: TensorDict, round_index: int
    ) -> TensorDict | None:
        """A client's reply as the server decoded it against the method's expected schema, or
        None if refused (the ledger holds the reason; the round goes on without it). Under
        secure aggregation the reply stays with its client, for the masking: on hosts that keep
        it (no bytes came), or here, where the hosts hand it back (one process, the pool)."""
        method = self.exp.method
        if self.held_here is not None:
            self.expected[client], self.sent[client] = method.expected_reply(client, sent), sent
            if payload:
                self.held_here.hold(client, decode(payload), sent, round_index)
            return {}
        if not method.communicates or not payload:
            return decode(payload) if payload else {}
        expect = method.expected_reply(client, sent)
        try:
            return self.channel.receive(payload, client_name(client), SERVER, round_index, expect)
        except MessageError as error:
            self.absent[client] = f"reply refused: {error}"
            return None

    # -- aggregation --------------------------------------------------------------------------
    def raw_weight(self, client: int) -> float:
        """A client's aggregation weight before normalisation: its data size, or 1."""
        return float(
            len(self.exp.clients[client]) if self.exp.config.federation.weighting == "size" else 1
        )

    def weights(self, clients: list[int]) -> dict[int, float]:
        """Aggregation weights over the clients whose replies were accepted."""
        return weights_of(self.exp, clients)

    def round_weights(self, round_index: int) -> dict[int, float]:
        return round_weights(self.exp, round_index)

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
        if self.secure is not None:
            return self._secure_aggregate(round_index, replies)
        if self._too_few(len(replies)):
            return None
        if running is not None:
            self.exp.method.aggregate_mean(round_index, running.mean())
            aggregated = sorted(replies)
        else:
            self.exp.method.aggregate(round_index, replies, self.weights(sorted(replies)))
            aggregated = sorted(replies)
        sync_base(self.exp)
        return aggregated

    def _secure_aggregate(self, round_index: int, held: dict[int, TensorDict]) -> list[int] | None:
        """The method's step on the weighted mean of the replies the clients hold (``held``:
        who holds one), through the masking protocol among the clients that got the download
        (dropouts and stragglers leave it after ShareKeys); the clients summed, or None, with
        the reason, if it fails or sums too few replies. The hosts always hear that the
        round's run is over, also when it never began."""
        assert self.secure is not None and self.held_here is not None
        carrier = self.hosts.masking() or LocalCarrier(self.held_here)
        try:
            if self._too_few(len(held)):
                return None
            secure = self._secure_mean(round_index, held, carrier)
        finally:
            carrier.end(round_index)
        if secure is None:
            return None
        self.exp.method.aggregate_mean(round_index, secure.mean)
        sync_base(self.exp)
        return secure.summed

    def _secure_mean(
        self, round_index: int, held: dict[int, TensorDict], carrier: Carrier
    ) -> SecureMean | None:
        assert self.secure is not None
        exchange = ChannelExchange(self.channel, carrier, round_index)
        senders = {c: self.expected[c] for c in held}
        try:
            secure = self.secure.mean(
                round_index,
                exchange,
                senders,
                self.reached,
                self.round_weights(round_index),
                self.reference(held),
            )
        except SecureAggregationError as error:
            self.skip_reason = str(error)
            return None
        self.absent.update(secure.absent)
        self.gone = secure.gone
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
        why; under secure aggregation, the summed clients that vanished before the unmasking
        (``left_after_masking``, recovered from the others' shares)."""
        skipped = aggregated is None
        rejected = [
            {"sender": r.sender, "reason": r.rejected}
            for r in self.channel.ledger.rejections(round_index)
        ]
        record: dict = {}
        if self.absent or skipped:
            included = sorted(replies) if aggregated is None else aggregated
            absent = {str(c): why for c, why in sorted(self.absent.items())}  # JSON keys
            record = {"aggregated": included, "absent": absent}
        if rejected:
            record["rejected"] = rejected
        if self.gone:
            record["left_after_masking"] = self.gone
        if skipped:
            record["skipped"] = True
            record["skip_reason"] = self.skip_reason
        return record


class LocalHosts(Hosts):
    """Every client in the server's process, in turn: the default placement."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self.downloads: dict[int, bytes] = {}

    def dispatch(self, downloads: dict[int, bytes], offset: TensorDict, round_index: int) -> None:
        self.downloads = downloads  # the base offset is already this process's base

    def answer(self, client: int, round_index: int) -> tuple[bytes, dict]:
        return self.runtime.answer(client, self.downloads.pop(client), round_index)
