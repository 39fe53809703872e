"""Flower SuperNodes as a placement: the server round (``fedlora.engines.server_round``) with
Flower's Grid carrying its bytes.

Runs inside the ServerApp. Before the first round it asks every connected SuperNode which
partition it hosts (a ``query`` message; each answers from its node config) and waits until
every partition of ``num-partitions`` has a node. Each round it sends one ``train`` message per
sampled client to the node hosting it and waits at most ``fedlora-reply-timeout`` seconds for
the replies (``Grid.send_and_receive``); a client whose node answered with an error, or not in
time, is absent from the round with that reason, as a dropped client is in one process. It
counts the bytes Flower moves per message type (``wire``), to compare with the ledger. The
clients' state stays on the nodes, so the server's checkpoint holds the server's state only.
Under secure aggregation the replies stay on the nodes too: each step of the masking protocol is
one ``query.secagg`` message per node with clients in it (``fedlora.engines.masking``).
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from rich.console import Console

from fedlora.channel import encode, human_bytes
from fedlora.compat import mismatch
from fedlora.engines.masking import Answers, host_report
from fedlora.engines.server_round import Hosts
from fedlora.experiment import Experiment
from fedlora.flower.protocol import RECORD, SECAGG, Hosting, join_frames, split_frames
from fedlora.tensors import TensorDict


def message_bytes(message: Message) -> int:
    """The bytes Flower moves for ``message``: the serialized content of each object it is
    sent as (the message with its metadata, its record dict, each record), as its Grid pushes
    them to the SuperLink and the SuperNode pulls them (transport framing not included)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(message).values())


def node_answers(node: int, clients: list[int], reply: Message | None, timeout: float) -> Answers:
    """``node``'s answers to one step of secure aggregation for ``clients``; ``ValueError``
    with the reason if there are none (no reply within ``timeout`` s, an error, or a reply
    outside the protocol: its clients then drop at this step)."""
    if reply is None:
        raise ValueError(f"no answer from SuperNode {node} within {timeout:g} s")
    if reply.has_error():
        raise ValueError(f"SuperNode {node} failed: {reply.error.reason}")
    try:
        record = reply.content[RECORD]
        reports = json.loads(str(record["reports"]))
        frames = split_frames(bytes(record["answers"]), len(clients))
        if not isinstance(reports, list) or len(reports) != len(clients):
            raise ValueError(f"{len(clients)} reports expected")
        return {
            c: (frame, host_report(report))
            for c, frame, report in zip(clients, frames, reports, strict=True)
        }
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"SuperNode {node} sent a malformed answer: {error}") from None


def node_hosting(node: int, record: dict) -> Hosting:
    """The partition a node's ``query`` reply names; ``FlowerError`` if the node runs another
    fedlora protocol (a node of a fedlora before protocol versions states none) or the reply
    is malformed."""
    try:
        stated = json.loads(str(record.get("fedlora", "{}")))
        why = mismatch(f"SuperNode {node}", stated if isinstance(stated, dict) else {})
        if why is not None:
            raise FlowerError(why)
        got = json.loads(str(record["hosting"]))
        return Hosting(int(got["partition"]), int(got["partitions"]))
    except (KeyError, TypeError, ValueError) as error:
        raise FlowerError(f"SuperNode {node} sent a malformed query reply: {error!r}") from None


PULL_INTERVAL = 0.1  # seconds between the ServerApp's pulls for replies


class FlowerError(RuntimeError):
    """The deployment cannot run: a partition never connected, or nodes disagree about it."""


class FlowerHosts(Hosts):
    """A server's clients on the SuperNodes; they keep their clients' state."""

    def __init__(
        self,
        experiment: Experiment,
        console: Console,
        grid: Grid,
        reply_timeout: float,
        node_wait: float,
    ):
        self.exp = experiment
        self.console = console
        self.grid = grid
        self.reply_timeout = reply_timeout
        self.node_wait = node_wait
        self.nodes: dict[int, int] = {}  # partition -> node id
        self.partitions = 0
        self.replies: dict[int, tuple[bytes, dict]] = {}  # this round's, by client
        self.wire: dict[str, dict[str, int]] = {}  # Flower's bytes, by message type
        self.completed = 0  # rounds whose training the nodes have done (what evaluate reads)

    # -- which node hosts which client --------------------------------------------------------
    def owner(self, client: int) -> int:
        return self.nodes[client % self.partitions]

    def discover(self) -> None:
        """Map every partition to its node, asking new nodes until all are there."""
        deadline, asked = time.monotonic() + self.node_wait, set()
        hosting: dict[int, Hosting] = {}
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            asked.update(new)
            query = {n: self._message(n, "query", {}) for n in new}
            for node, reply in self._exchange(query, self.node_wait).items():
                if reply.has_error():
                    raise FlowerError(f"SuperNode {node} refused: {reply.error.reason}")
                hosting[node] = node_hosting(node, dict(reply.content[RECORD]))
            counts = {h.partitions for h in hosting.values()}
            if len(counts) > 1:
                raise FlowerError(f"SuperNodes disagree on num-partitions: {sorted(counts)}")
            taken: dict[int, int] = {}
            for node, h in sorted(hosting.items()):
                if h.partition in taken:
                    raise FlowerError(
                        f"SuperNodes {taken[h.partition]} and {node} both host partition "
                        f"{h.partition}"
                    )
                taken[h.partition] = node
            if counts and len(taken) == next(iter(counts)):
                self.nodes, self.partitions = taken, next(iter(counts))
                return
            if time.monotonic() > deadline:
                wanted = next(iter(counts)) if counts else "?"
                raise FlowerError(
                    f"after {self.node_wait:g} s, SuperNodes host partitions "
                    f"{sorted(taken)} of {wanted}; start the missing ones (--node-config "
                    '"partition-id=P num-partitions=N")'
                )
            time.sleep(1.0)

    def describe_nodes(self) -> str:
        clients = len(self.exp.clients)
        return "; ".join(
            f"SuperNode {node}: partition {p}, clients "
            + ", ".join(map(str, Hosting(p, self.partitions).clients(clients)))
            for p, node in sorted(self.nodes.items())
        )

    # -- the transport --------------------------------------------------------------------------
    def _message(self, node: int, kind: str, fields: dict, round_index: int = -1) -> Message:
        content = RecordDict({RECORD: ConfigRecord(fields)})
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(round_index))

    def _exchange(self, messages: dict[int, Message], timeout: float) -> dict[int, Message]:
        """Send ``messages`` (by key) and return the replies that came in time, by key (an
        error reply may come from the SuperLink, not the node: its source says nothing)."""
        if not messages:
            return {}
        sent = list(messages.values())
        replies = self._send_and_receive(sent, timeout)
        kind = sent[0].metadata.message_type
        counts = self.wire.setdefault(kind, {"messages": 0, "down": 0, "up": 0})
        counts["messages"] += len(sent)
        counts["down"] += sum(map(message_bytes, sent))
        counts["up"] += sum(map(message_bytes, replies))
        by_id = {m.metadata.message_id: key for key, m in messages.items()}
        return {by_id[r.metadata.reply_to_message_id]: r for r in replies}

    def _send_and_receive(self, sent: list[Message], timeout: float) -> list[Message]:
        """``Grid.send_and_receive`` with a short pull interval: flwr's sleeps 3 s between
        pulls, which every message exchange of a round pays (secure aggregation's protocol
        has four after the training)."""
        waiting = set(self.grid.push_messages(sent))
        replies: list[Message] = []
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(PULL_INTERVAL)
        return replies

    def _base(self) -> bytes:
        """The merged base offset every party trains and evaluates on (FLoRA), or nothing."""
        offset = self.exp.method.base_offset()
        return encode(offset) if offset else b""

    def dispatch(self, downloads: dict[int, bytes], offset: TensorDict, round_index: int) -> None:
        base = encode(offset) if offset else b""
        self.completed = round_index + 1
        messages = {
            client: self._message(
                self.owner(client),
                "train",
                {"client": client, "round": round_index, "payload": payload, "offset": base},
                round_index,
            )
            for client, payload in downloads.items()
        }
        self.replies = {}
        for client, reply in self._exchange(messages, self.reply_timeout).items():
            if reply.has_error():
                why = f"SuperNode {self.owner(client)} failed: {reply.error.reason}"
                self.replies[client] = b"", {"outcome": None, "reason": why}
                continue
            record = reply.content[RECORD]
            self.replies[client] = record["payload"], json.loads(record["report"])

    def answer(self, client: int, round_index: int) -> tuple[bytes, dict]:
        if client in self.replies:
            return self.replies[client]
        why = f"no reply from SuperNode {self.owner(client)} within {self.reply_timeout:g} s"
        return b"", {"outcome": None, "reason": why}

    # -- secure aggregation: the protocol goes to the nodes, which keep the replies ------------
    def masking(self) -> FlowerHosts:
        return self

    def step(self, kind: str, payloads: dict[int, bytes], round_index: int) -> Answers:
        """One message per node with the step's messages for its clients; a node that fails
        or does not answer in time drops its clients at this step, with the reason."""
        by_node: dict[int, list[int]] = {}
        for client in payloads:
            by_node.setdefault(self.owner(client), []).append(client)
        messages = {}
        for node, clients in by_node.items():
            fields = {
                "kind": kind,
                "round": round_index,
                "clients": json.dumps(clients),
                "payloads": join_frames([payloads[c] for c in clients]),
            }
            messages[node] = self._message(node, SECAGG, fields, round_index)
        replies = self._exchange(messages, self.reply_timeout)
        answers: Answers = {}
        for node, clients in by_node.items():
            try:
                answers |= node_answers(node, clients, replies.get(node), self.reply_timeout)
            except ValueError as error:
                answers |= {c: (b"", {"failed": str(error)}) for c in clients}
        return answers

    def end(self, round_index: int) -> None:
        """Nothing to say: a node drops a round's replies and keys when the next begins."""

    # -- evaluation of the clients' own models, on their nodes ---------------------------------
    def client_metrics(self) -> list[dict[str, float]] | None:
        """Every client's own model, evaluated on the node that holds it (methods that
        evaluate each client's own model)."""
        clients, base = len(self.exp.clients), self._base()
        nodes = self.nodes.items()
        hosted = {node: Hosting(p, self.partitions).clients(clients) for p, node in nodes}
        messages = {
            node: self._message(
                node,
                "evaluate",
                {"clients": json.dumps(mine), "round": self.completed, "offset": base},
            )
            for node, mine in hosted.items()
        }
        metrics: dict[int, dict[str, float]] = {}
        for node, reply in self._exchange(messages, self.reply_timeout).items():
            if reply.has_error():
                raise FlowerError(f"SuperNode {node} failed to evaluate: {reply.error.reason}")
            metrics |= {int(c): m for c, m in json.loads(reply.content[RECORD]["metrics"]).items()}
        if len(metrics) < clients:
            silent = sorted(set(messages) - {self.owner(c) for c in metrics})
            raise FlowerError(
                f"SuperNodes {silent} sent no evaluation within {self.reply_timeout:g} s; the "
                "clients' own models live on them, so the round cannot be evaluated"
            )
        return [metrics[c] for c in range(clients)]

    def open(self, start_round: int) -> None:
        self.completed = start_round
        self.discover()
        self.console.print(self.describe_nodes(), highlight=False, soft_wrap=True)

    def close(self) -> list[str]:
        if not self.nodes:  # it stopped before every partition connected
            return []
        return [
            "",
            "## SuperNodes (Flower deployment)",
            "",
            f"{self.describe_nodes()}. Each node kept its clients' state; only protocol "
            "messages and per-round scalars reached the server."
            + (
                " Each node exported its clients' own adapters under its state directory "
                "(`run-<run id>/adapters/client_<i>`)."
                if self.exp.method.per_client_eval
                else ""
            ),
            "",
            "Bytes Flower moved (its message objects; the ledger counts the tensors' bytes "
            "inside them): "
            + "; ".join(
                f"{kind}: {c['messages']} messages, down {human_bytes(c['down'])}, up "
                f"{human_bytes(c['up'])}"
                for kind, c in self.wire.items()
            )
            + ".",
        ]
