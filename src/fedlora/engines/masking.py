"""Secure aggregation between a server round and the places its clients live.

Under ``privacy.secure_aggregation`` a client's reply never travels: it stays where the client
ran (``MaskingClients.hold``), and only the masking protocol's messages cross
(``fedlora.privacy.secagg``). The server's end is ``ChannelExchange``: it packs each of the
protocol's messages through the round's channel, has a ``Carrier`` take the bytes to the
clients' hosts and their answers back, and records every transfer in the ledger, down then up,
client by client, as one process would. The hosts' end is ``MaskingClients.respond``: it
validates the server's message, lets the client's party answer it, and packs the answer.

Where a placement's hosts hand the reply back to the server's process (this process, the worker
pool: a simulation on one machine) the clients' parties run in that process (``LocalCarrier``);
torch.distributed ranks carry the protocol to the rank that trained the client, which keeps the
reply (``fedlora.engines.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fedlora.channel import Channel, MessageError, Schema, Transfer
from fedlora.config import round_size
from fedlora.engines.client import SERVER, client_name
from fedlora.experiment import Experiment
from fedlora.privacy.secagg import Answer, ClientParty
from fedlora.privacy.secure_round import SecureAggregation
from fedlora.tensors import TensorDict
from fedlora.training import derived_seed

KINDS = ("begin", "roster", "shares", "survivors")  # the server's messages, in order
END = "end"  # a carrier's word to hosts that the round's protocol run is over
HostAnswer = tuple[bytes, dict]  # a client's answer's bytes, and its host's report
Answers = dict[int, HostAnswer]


def secure_aggregation(exp: Experiment) -> SecureAggregation | None:
    """The run's secure aggregation (``privacy.secure_aggregation``), None without it; with
    central DP, its mechanism, whose clipping moves to the clients."""
    privacy, federation = exp.config.privacy, exp.config.federation
    if not privacy.secure_aggregation:
        return None
    size = round_size(len(exp.clients), federation.clients_per_round, federation.fraction)
    return SecureAggregation(privacy, size, exp.privacy.central if exp.privacy else None)


def leaves_after_masking(exp: Experiment, client: int, round_index: int) -> bool:
    """Whether a client vanishes once its masked input is sent (``federation.dropout_after_
    masking``, seeded by (seed, round, client)): a pure function, so every process agrees."""
    probability = exp.config.federation.dropout_after_masking
    if probability == 0:
        return False
    seed = derived_seed(exp.config.experiment.seed, round_index, client, 0xD1)
    return bool(np.random.default_rng(seed).random() < probability)


class MaskingClients:
    """The clients' side where they keep their replies: each reply held for masking, and each
    client's party in the round's protocol run. ``weights``: the round's aggregation weights
    (a pure function of the config and the round, so a host computes them itself)."""

    def __init__(
        self,
        experiment: Experiment,
        secure: SecureAggregation,
        weights: Callable[[int], dict[int, float]],
    ) -> None:
        self.exp = experiment
        self.secure = secure
        self.weights = weights
        self.channel = Channel(limit=experiment.config.federation.max_message_bytes)
        self.held: dict[int, tuple[TensorDict, TensorDict]] = {}  # client -> (reply, download)
        self.parties: dict[int, ClientParty] = {}
        self.round = -1  # the round whose replies are held

    def hold(self, client: int, reply: TensorDict, sent: TensorDict, round_index: int) -> None:
        """Keep ``client``'s reply to ``sent`` for round ``round_index``'s masking (what an
        earlier round left, where no word said its run was over, is dropped)."""
        self._at(round_index)
        self.held[client] = reply, sent

    def _at(self, round_index: int) -> None:
        if round_index != self.round:
            self.end()
            self.round = round_index

    def _party(self, client: int, round_index: int) -> ClientParty:
        weights = self.weights(round_index)

        def input_of(begin: TensorDict) -> np.ndarray:
            if client not in self.held:
                raise MessageError("it holds no reply to mask")
            reply, sent = self.held[client]
            return self.secure.client_input(reply, sent, weights[client], len(weights), begin)

        return ClientParty(
            client,
            self.secure.threshold,
            input_of,
            self.secure.begin_schema(),
            leaves_after_masking(self.exp, client, round_index),
        )

    def respond(self, client: int, round_index: int, kind: str, payload: bytes) -> HostAnswer:
        """``client``'s answer to the server's message of ``kind`` (its bytes), and a report:
        ``refused`` (the message did not fit), ``failed`` (its content broke the protocol),
        ``gone`` (the client vanished), or nothing."""
        if kind == "begin":
            self._at(round_index)
            self.parties[client] = self._party(client, round_index)
        party = self.parties.get(client) if round_index == self.round else None
        if party is None:
            return b"", {"failed": f"no protocol run of round {round_index} holds this client"}
        expect = party.expect(kind)
        if not payload and expect:
            return b"", {"refused": f"an empty {kind!r} message; expected {sorted(expect)}"}
        try:
            message = self.channel.unpack(payload, expect, torch.uint8) if payload else {}
        except MessageError as error:
            return b"", {"refused": str(error)}
        try:
            answer = party.respond(kind, message)
        except MessageError as error:
            return b"", {"failed": str(error)}
        if answer is None:
            return b"", {"gone": True}
        return self.channel.pack(answer, client_name(client), round_index), {}

    def end(self) -> None:
        """The round's protocol run is over: its replies and keys are dropped."""
        self.held, self.parties = {}, {}


def host_report(value: object) -> dict:
    """A host's report on one client's answer, as the server accepts it from another process:
    a JSON object with at most ``refused``/``failed`` (text) or ``gone`` (true); else
    ``ValueError`` with the reason."""
    if not isinstance(value, dict) or not set(value) <= {"refused", "failed", "gone"}:
        raise ValueError(f"a masking report must be refused, failed or gone, got {value!r:.80}")
    if not all(isinstance(value.get(k, ""), str) for k in ("refused", "failed")):
        raise ValueError("a masking report's reasons must be text")
    if value.get("gone", True) is not True:
        raise ValueError("a masking report's gone must be true")
    return value


class Carrier(Protocol):
    """How the protocol's messages reach the hosts that keep the clients' replies."""

    def step(self, kind: str, payloads: dict[int, bytes], round_index: int) -> Answers:
        """Each client's message of ``kind`` to its host; each one's answer (bytes, report)."""
        ...

    def end(self, round_index: int) -> None:
        """The round's run is over (also when it never began, or failed)."""


@dataclass
class LocalCarrier:
    """The clients' parties in the server's process."""

    clients: MaskingClients

    def step(self, kind: str, payloads: dict[int, bytes], round_index: int) -> Answers:
        return {c: self.clients.respond(c, round_index, kind, p) for c, p in payloads.items()}

    def end(self, round_index: int) -> None:
        self.clients.end()


@dataclass
class ChannelExchange:
    """The server's end of the protocol's steps (``fedlora.privacy.secagg.Exchange``): the
    round's channel packs and validates, ``carrier`` carries, the ledger records."""

    channel: Channel
    carrier: Carrier
    round_index: int

    def __call__(
        self, down: str, up: str, messages: dict[int, TensorDict], expect: Schema
    ) -> dict[int, Answer]:
        r = self.round_index
        payloads = {c: self.channel.pack(m, SERVER, r) if m else b"" for c, m in messages.items()}
        answers = self.carrier.step(down, payloads, r)
        result: dict[int, Answer] = {}
        for client, payload in payloads.items():
            answer, report = answers[client]
            refused = report.get("refused")
            if payload:
                tensors = 0 if refused else len(messages[client])
                self.channel.ledger.add(
                    Transfer(
                        r, SERVER, client_name(client), len(payload), tensors, refused or "",
                        f"secagg.{down}",
                    )
                )  # fmt: skip
            if refused or report.get("failed"):
                result[client] = refused or report["failed"]
            elif report.get("gone"):
                result[client] = None
            else:
                try:
                    result[client] = self.channel.receive(
                        answer, client_name(client), SERVER, r, expect, torch.uint8, f"secagg.{up}"
                    )
                except MessageError as error:
                    result[client] = str(error)
        return result
