"""A server round whose clients live in other processes, written once for every placement.

The in-process engine (``SimulationEngine``) runs each sampled client where the server runs.
A placement that hosts clients elsewhere (worker processes of this machine, torch.distributed
ranks, Flower SuperNodes) differs from it, and from each other, only in how a download reaches
the process hosting its client and how the reply comes back. Everything else about the
server's half of the round is here, once: every download is packed by the channel before any
travels, each transfer is recorded in the ledger in the in-process engine's order (down then
up, client by client), a seeded dropout or a straggler is known without asking, and a reply is
validated against the method's schema as the in-process ``_accept`` does. The client's half is
here too (``answer``): the bytes that arrived become the reply's bytes and a report of
scalars, wherever the client runs.

A placement subclasses ``ServedEngine`` and supplies ``_dispatch`` (send the round's downloads),
``_reply`` (one client's reply bytes and report) and, if it needs one, ``_close_round``.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedlora.channel import MessageError, Transfer
from fedlora.engines.simulation import SERVER, SimulationEngine, client_name
from fedlora.tensors import TensorDict
from fedlora.training import LocalResult


def outcome(result: LocalResult) -> list[float]:
    """What the server needs of a local result for the round's record (the state stays put)."""
    return [result.loss, result.steps, result.examples]


def from_outcome(row: list[float]) -> LocalResult:
    loss, steps, examples = row
    return LocalResult({}, {}, int(steps), loss, int(examples))


class ServedEngine(SimulationEngine):
    """Server methods with their clients hosted elsewhere; subclasses carry the bytes."""

    # -- the transport a placement supplies ---------------------------------------------------
    def _dispatch(self, downloads: dict[int, bytes], round_index: int) -> None:
        """Start every sampled client's download on its way (packed, not yet counted)."""
        raise NotImplementedError

    def _reply(self, client: int, round_index: int) -> tuple[bytes, dict]:
        """Client ``client``'s reply bytes and report, once it answered: ``{"outcome":
        outcome(result)}`` if it trained, ``{"outcome": None, "reason": why}`` if not."""
        raise NotImplementedError

    def _close_round(self, sampled: list[int], round_index: int) -> None:
        """Whatever the placement does after the last reply of a round (nothing by default)."""

    # -- bytes and the ledger -----------------------------------------------------------------
    def _pack(self, tensors: TensorDict, sender: str, round_index: int) -> bytes:
        return self.channel.pack(tensors, sender, round_index) if tensors else b""

    def _unpack(self, payload: bytes) -> TensorDict:
        return self.channel.unpack(payload) if payload else {}

    def _count(
        self, payload: bytes, tensors: int, sender: str, receiver: str, round_index: int
    ) -> None:
        """Record a transfer as the in-process engine's ``_transfer`` does (not for empty
        messages nor for methods that do not communicate)."""
        if payload and self.exp.method.communicates:
            self.channel.ledger.add(Transfer(round_index, sender, receiver, len(payload), tensors))

    def _receive(
        self, client: int, payload: bytes, sent: TensorDict, round_index: int
    ) -> TensorDict | None:
        """A client's reply, checked and counted as the in-process engine's ``_accept`` does."""
        if not self.exp.method.communicates or not payload:
            return self._unpack(payload)
        expect = self.exp.method.expected_reply(client, sent)
        try:
            return self.channel.receive(payload, client_name(client), SERVER, round_index, expect)
        except MessageError as error:
            self.absent[client] = f"reply refused: {error}"
            return None

    # -- the server's half of a round ---------------------------------------------------------
    def _train_clients(
        self, sampled: list[int], round_index: int
    ) -> Iterator[tuple[int, TensorDict | None, LocalResult | None]]:
        method = self.exp.method
        down: dict[int, tuple[bytes, TensorDict]] = {}
        for client in sampled:
            message = method.server_message(client, round_index)
            down[client] = (self._pack(message, SERVER, round_index), message)
        self._dispatch({client: payload for client, (payload, _) in down.items()}, round_index)
        for client in sampled:
            payload, sent = down[client]
            self._count(payload, len(sent), SERVER, client_name(client), round_index)
            if reason := self.missing(client, round_index):  # the client knows it too
                self.absent[client] = reason
                yield client, None, None
                continue
            payload, report = self._reply(client, round_index)
            if report["outcome"] is None:
                self.absent[client] = report["reason"]
                yield client, None, None
                continue
            reply = self._receive(client, payload, sent, round_index)
            yield client, reply, from_outcome(report["outcome"])
        self._close_round(sampled, round_index)

    # -- the client's half --------------------------------------------------------------------
    def answer(self, client: int, payload: bytes, round_index: int) -> tuple[bytes, dict]:
        """A hosted client's work on the download's bytes: the reply's bytes and the report."""
        try:
            message = self._unpack(payload)
        except MessageError as error:
            return b"", {"outcome": None, "reason": f"refused the download: {error}"}
        reply, result = self.client_work(client, message, round_index)
        return self._pack(reply, client_name(client), round_index), {"outcome": outcome(result)}
