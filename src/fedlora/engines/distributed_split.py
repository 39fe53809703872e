"""DLoRA's cloud and edges in separate processes: ``--engine distributed --nproc N`` (N ≥ 2) for
split methods.

Rank 0 is the **cloud**: it holds the frozen base and runs its forward and backward for every
user. Ranks 1..N-1 are **edges** (devices): the users are dealt to them round-robin, and an edge
holds its users' private data and, for each, the LoRA factors, the head, the labels, the loss,
the optimizer and the Kill-and-Revive state. An edge trains its users one after another; the
edges run at once and share the one cloud, which serves their requests in the order they
arrive (``take_from``), one step at a time. So that the order of arrival changes no number, the
cloud keeps one dropout generator state per user (``Streams``): a user's block of steps draws
the base's dropout from the stream seeded for it, exactly as in one process.

The protocol is ``fedlora.dlora.split``'s own, cut at the process boundary. The cloud's hooks
and autograd Function are unchanged; its end of each user's link (``CloudEnd``) turns a module's
round trip (x down, u up; g_y down, g_x up) into messages to that user's edge. The edge runs
``edge_step``, which is ``split_step`` seen from the device: send the embeddings, answer the
cloud's module requests until the head input arrives, compute the loss, send its gradient,
answer the backward's requests. Every tensor is the channel's safetensors bytes
(``Channel.pack``), sent with ``send_bytes``; nothing is pickled. A message is one frame: a
small JSON header (kind, user, module; what any deployment's protocol needs to route it) and
the payload. Both ends count every payload as the one-process link does: the edge in the step
log (``steps.csv``, ``traffic.csv``), the cloud in the ledger, each from what it sent and
received itself; headers and the few control frames (which user's block begins, a kill or
revival, end of backward, end of round) are not counted: in one process they are shared state,
not messages.

After a round the modes differ (``fedlora.engines.distributed``):

- Deployment (default): the cloud receives nothing but the protocol's messages (embeddings,
  module outputs, gradients and, under Kill-and-Revive option (a), the killed modules' frozen
  factors) and one report per edge and round of scalars: the sum and count of its step losses,
  the round's summed traffic and FLOP counts, its users' test metrics. Each edge evaluates its
  users' adapters (on its own copy of the public base), writes their per-step files in
  ``<out>/rank<k>/``, checkpoints them there and exports their adapters. The cloud checkpoints
  what it holds of each user: the active set and the killed modules' factors it was sent.
- Observer (``--observer``): the edges send the cloud every user's store (adapter,
  Kill-and-Revive state, schedule, accounting rows), optimizer state, traffic rows and step
  losses; the cloud evaluates, writes the run directory and checkpoints as the in-process split
  engine does.

Observer results equal the in-process run's bit for bit (same ops, same order, one thread per
rank); deployment results too, except ``train_loss``, the mean of every step loss, which the
cloud forms from the edges' sums (a few ulps). With ``lora.dropout > 0`` the device draws its
own masks from its own generator, where one process interleaves them with the base's in one
stream, so such runs differ in their random draws.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import Progress, TaskID

from fedlora.channel import Channel, MessageError, Transfer
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import CheckpointError
from fedlora.config import Config, ConfigError
from fedlora.dlora.split import (
    CloudEdgeLink,
    CloudModel,
    EdgeAdapters,
    HeadOn,
    KilledForward,
    _Pending,
    head_kind,
)
from fedlora.engines.client import client_name
from fedlora.engines.distributed import (
    WRITER,
    RankParty,
    own_clients,
    recv_states,
    send_states,
)
from fedlora.engines.loop import RunLoop, summarize_clients
from fedlora.engines.split import SCHEDULE, LocalLinks, SplitRound, User
from fedlora.engines.transport import (
    ProtocolError,
    recv_any,
    recv_bytes,
    recv_json,
    send_bytes,
    send_json,
)
from fedlora.methods import method_options
from fedlora.methods.base import stored
from fedlora.methods.dlora import DLoRAOptions
from fedlora.tensors import TensorDict

CLOUD_RANK = WRITER  # the cloud, which also writes the run directory

Shape = tuple[int, ...] | None  # None: any shape


@dataclass(frozen=True)
class Message:
    """One frame between the cloud and the edge: its header fields and the channel payload."""

    kind: str
    user: str = ""
    module: str = ""
    payload: bytes = b""
    header: dict = field(default_factory=dict)  # anything else the header carried


class Endpoint:
    """This process's end of the cloud–edge connection: framed messages to and from the peer.

    A frame is 4 bytes of header length, the JSON header, then the payload, in one
    ``send_bytes``, so a message costs one exchange however small its header.
    """

    def __init__(self, peer: int) -> None:
        self.peer = peer

    def post(
        self, kind: str, user: str = "", module: str = "", payload: bytes = b"", **extra: object
    ) -> None:
        header = json.dumps({"kind": kind, "user": user, "module": module, **extra}).encode()
        send_bytes(len(header).to_bytes(4, "big") + header + payload, self.peer)

    def take(self) -> Message:
        return parse(recv_bytes(self.peer), self.peer)


def parse(frame: bytes, peer: int) -> Message:
    """A frame from ``peer`` as its header and payload, or a ``ProtocolError`` naming it."""
    size = int.from_bytes(frame[:4], "big")
    try:
        if len(frame) < 4 + size:
            raise ValueError(f"header of {size} bytes in a frame of {len(frame)}")
        header = json.loads(frame[4 : 4 + size])
        kind, user, module = header.pop("kind"), header.pop("user"), header.pop("module")
        if not all(isinstance(v, str) for v in (kind, user, module)):
            raise ValueError("kind, user and module must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ProtocolError(
            f"rank {dist.get_rank()}: malformed DLoRA frame from rank {peer}: {error!r}"
        ) from None
    return Message(kind, user, module, frame[4 + size :], header)


def take_from(edges: list[int]) -> tuple[int, Message]:
    """The next frame from whichever of ``edges`` sends first, and its rank (a named receive
    when there is one edge: nccl has no receive from any rank)."""
    peer, frame = (edges[0], recv_bytes(edges[0])) if len(edges) == 1 else recv_any()
    return peer, parse(frame, peer)


class _RemoteEnd(CloudEdgeLink):
    """What both ends of a user's link over the endpoint share: posting a tensor message and
    opening a received one (decoded and validated by the channel, then checked against the
    names and shapes the protocol expects)."""

    outgoing: ClassVar[Literal["down", "up"]]  # the direction this end sends in

    def __init__(
        self,
        user: str,
        edge: EdgeAdapters,
        channel: Channel,
        killed_forward: KilledForward,
        endpoint: Endpoint,
        cloud_device: torch.device,
    ) -> None:
        super().__init__(user, edge, channel, killed_forward, cloud_device)
        self.endpoint = endpoint

    def post(self, kind: str, module: str, tensors: TensorDict, **extra: object) -> bytes:
        sender, _ = self.parties(self.outgoing)
        payload = self.channel.pack(tensors, sender, self.round)
        self.endpoint.post(kind, self.user, module, payload, **extra)
        return payload

    def take(self, *kinds: str) -> Message:
        """The next message of this user (of one of ``kinds``, if given)."""
        message = self.endpoint.take()
        if message.user != self.user or (kinds and message.kind not in kinds):
            raise ProtocolError(
                f"rank {dist.get_rank()}: rank {self.endpoint.peer} sent {message.kind!r} of "
                f"{message.user or 'no user'} {message.module!r} where {self.user}'s "
                f"{' or '.join(kinds) or 'message'} was due"
            )
        return message

    def open(self, message: Message, shapes: dict[str, Shape]) -> TensorDict:
        try:
            tensors = self.channel.unpack(message.payload)
        except MessageError as error:
            raise ProtocolError(
                f"rank {dist.get_rank()}: {message.kind!r} of {message.module!r} from rank "
                f"{self.endpoint.peer}: {error}"
            ) from None
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got.keys() != shapes.keys() or any(
            shape is not None and got[name] != shape for name, shape in shapes.items()
        ):
            raise ProtocolError(
                f"rank {dist.get_rank()}: {self.user}'s {message.kind!r} of {message.module!r} "
                f"from rank {self.endpoint.peer} carries {got}, expected {shapes}"
            )
        return self.place(tensors, "up" if self.outgoing == "down" else "down")

    def take_reply(self, kind: str, module: str, shapes: dict[str, Shape]) -> TensorDict:
        """The reply the protocol expects next: ``kind`` of ``module``, these tensors."""
        message = self.take(kind)
        if message.module != module:
            raise ProtocolError(
                f"rank {dist.get_rank()}: rank {self.endpoint.peer} sent {self.user}'s {kind!r} "
                f"of {message.module!r}, not of {module!r}"
            )
        return self.open(message, shapes)

    def take_one(self, kind: str, module: str, shape: Shape) -> torch.Tensor:
        return self.take_reply(kind, module, {kind: shape})[kind]


class CloudEnd(_RemoteEnd):
    """The cloud's end of one user's link, the device being in an edge process.

    ``CloudModel``'s hooks call ``module_delta`` and ``module_grad`` as in one process; here
    they are request and reply over the endpoint. Kills and revivals arrive as messages. Its
    ``edge`` supplies the modules' public shapes (and, to an observer, a mirror of the device);
    the cloud never computes with it. Every payload it posts or opens is counted in the ledger.
    """

    outgoing = "down"

    def post(self, kind: str, module: str, tensors: TensorDict, **extra: object) -> bytes:
        payload = super().post(kind, module, tensors, **extra)
        self._count("down", payload, len(tensors))
        return payload

    def open(self, message: Message, shapes: dict[str, Shape]) -> TensorDict:
        tensors = super().open(message, shapes)
        self._count("up", message.payload, len(tensors))
        return tensors

    def _count(self, direction: Literal["down", "up"], payload: bytes, tensors: int) -> None:
        sender, receiver = self.parties(direction)
        self.channel.ledger.add(Transfer(self.round, sender, receiver, len(payload), tensors))

    def module_delta(
        self, key: str, x: torch.Tensor, train: bool = True
    ) -> tuple[torch.Tensor, _Pending | None]:
        self.post("x", key, {"x": x})
        shape = (*x.shape[:-1], self.edge.modules[key].d_out)
        return self.take_one("u", key, shape), None  # the device keeps the graph

    def module_grad(self, key: str, pending: _Pending | None, grad_y: torch.Tensor) -> torch.Tensor:
        self.post("grad_y", key, {"grad_y": grad_y})
        return self.take_one("grad_x", key, (*grad_y.shape[:-1], self.edge.modules[key].d_in))

    def kill(self, key: str) -> None:
        """The device killed ``key``; under option (a) its frozen factors follow."""
        self.active.discard(key)
        if self.killed_forward == "cloud":
            m = self.edge.modules[key]
            shapes: dict[str, Shape] = {"A": (m.rank, m.d_in), "B": (m.d_out, m.rank)}
            self.cloud_factors[key] = self.take_reply("factors", key, shapes)

    def serve_step(self, cloud: CloudModel, message: Message, head_on: HeadOn) -> None:
        """The cloud's half of ``split_step``, from the embeddings the device sent."""
        up = self.open(message, {"embeddings": None, "attention_mask": None})
        out = cloud.forward(self, up["embeddings"], up["attention_mask"].long(), head_on)
        kind = head_kind(head_on)
        self.post(kind, "", {kind: out.detach()}, backward=out.requires_grad)
        if out.requires_grad:  # some module is active: the cloud backpropagates to it
            out.backward(self.take_one("grad_" + kind, "", tuple(out.shape)))
            self.endpoint.post("done", self.user)


class EdgeEnd(_RemoteEnd):
    """The device's end of one user's link, the cloud being in another process. What it
    sends and receives is counted in the ledger and the step log as the one-process link
    counts it (the payload's bytes, the tensors' floats)."""

    outgoing = "up"

    def send(
        self, tensors: TensorDict, kind: str, module: str, direction: Literal["down", "up"]
    ) -> TensorDict:
        """Send up (the device only sends up); returns what was sent."""
        if direction != "up":
            raise ValueError(f"the edge receives {kind!r}, it does not send it")
        self.count(kind, module, direction, tensors, self.post(kind, module, tensors))
        return tensors

    def receive(self, message: Message, shapes: dict[str, Shape]) -> TensorDict:
        tensors = self.open(message, shapes)
        self.count(message.kind, message.module, "down", tensors, message.payload)
        return tensors

    def count(
        self,
        kind: str,
        module: str,
        direction: Literal["down", "up"],
        tensors: TensorDict,
        payload: bytes,
    ) -> None:
        sender, receiver = self.parties(direction)
        self.channel.ledger.add(Transfer(self.round, sender, receiver, len(payload), len(tensors)))
        self.note(kind, module, direction, tensors, len(payload))

    def kill(self, key: str) -> None:
        self.endpoint.post("kill", self.user, key)
        super().kill(key)  # under option (a) this sends the factors

    def revive(self, key: str) -> None:
        self.endpoint.post("revive", self.user, key)
        super().revive(key)


def edge_step(
    link: EdgeEnd, batch: dict[str, torch.Tensor], head_on: HeadOn, loss_weight: float
) -> float:
    """``split_step`` from the device's side, the cloud being in another process: the same
    messages in the same order, the device's halves of the same computations. Returns the
    loss; the gradients are in the device's parameters."""
    link.send(link.edge_embed(batch), "embeddings", "", "up")
    rows = tuple(batch["input_ids"].shape)  # every x and g_y is (batch, length, features)
    modules = link.edge.modules
    head = head_kind(head_on)
    pending: dict[str, _Pending] = {}
    message = link.take("x", head)
    while message.kind == "x":  # the cloud's forward reaches a module it routes to us
        key = message.module
        x = link.receive(message, {"x": (*rows, modules[key].d_in)})["x"]
        u, graph = link.edge_forward(key, x, train=key in link.active)
        if graph is not None:
            pending[key] = graph
        link.send_one(u, "u", key, "up")
        message = link.take("x", head)
    received = link.receive(message, {head: None})[head]
    loss, grad = link.edge_loss(received, batch["labels"], head_on, loss_weight)
    if message.header["backward"]:
        link.send_one(grad, "grad_" + head, "", "up")
        while (message := link.take("grad_y", "done")).kind == "grad_y":
            key = message.module
            grad_y = link.receive(message, {"grad_y": (*rows, modules[key].d_out)})["grad_y"]
            link.send_one(link.edge_backward(key, pending.pop(key), grad_y), "grad_x", key, "up")
    return loss


class Streams:
    """The cloud's dropout generator, one stream per user: the base's dropout draws from the
    global generator, and steps of different users interleave on the cloud in the order their
    edges ask, so each user's generator state is swapped in for its steps and out after them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: dict[int, list[torch.Tensor]] = {}

    def _get(self) -> list[torch.Tensor]:
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        elif self.device.type == "mps":
            states.append(torch.mps.get_rng_state())
        return states

    def _set(self, states: list[torch.Tensor]) -> None:
        torch.set_rng_state(states[0])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(states[1], self.device)
        elif self.device.type == "mps":
            torch.mps.set_rng_state(states[1])

    def begin(self, user: int) -> None:
        """The generator has just been seeded for ``user``'s block: that is its stream."""
        self.states[user] = self._get()

    @contextmanager
    def of(self, user: int) -> Iterator[None]:
        self._set(self.states[user])
        try:
            yield
        finally:
            self.states[user] = self._get()


CLOUD_ACTIVE = "cloud.active"  # store key, on the cloud: the user's active-module mask
CLOUD_FACTORS = "cloud.factors."  # store prefix, on the cloud: killed modules' frozen factors


def split_users(config: Config) -> int:
    """How many users the placement deals (known from the config, before building)."""
    options = method_options(config.method)
    assert isinstance(options, DLoRAOptions)
    return options.users or config.partition.num_clients


ROLES = (
    "rank 0 is the cloud (frozen base model, writes the run directory); ranks 1..N-1 are "
    "edges (data, adapters, head, loss and optimizer of the users dealt to them)"
)


class RankLinks(LocalLinks):
    """Where a split round's users live across ranks: rank 0 the cloud (it runs the loop),
    ranks 1..N-1 the edges (``serve_edge``). Every rank builds the same ``SplitRound`` with these
    links, an edge with only its users; each rank's links are its own end (``link``), and an
    edge steps with ``edge_step`` (``step``)."""

    def __init__(self, party: RankParty, device: torch.device) -> None:
        self.party = party
        self.on_cloud = party.rank == CLOUD_RANK
        self.endpoint = Endpoint(CLOUD_RANK)  # an edge's; the cloud has one per user's link
        # The users' per-step files are written by the observer, or in a deployment by the edges.
        self.user_files = party.observer if self.on_cloud else not party.observer
        workers = party.placement.workers()
        if dist.get_backend() == "nccl" and len(workers) > 1:
            raise ConfigError(
                f"dlora on {len(workers)} edge processes: the cloud serves "
                "whichever edge asks first, which torch.distributed's nccl backend cannot do "
                "(it receives from one named rank); run the ranks on gloo (compute.device = "
                "'cpu', or more ranks than GPUs) or with one edge (--nproc 2)"
            )
        self.streams = Streams(device)  # the cloud's: one dropout stream per user
        self.edge_losses: list[float] = []  # the round's [sum, count] of the edges' step losses

    def user_indices(self, split: SplitRound) -> list[int]:
        return super().user_indices(split) if self.on_cloud else self.party.hosted

    def link(self, split: SplitRound, index: int, edge: EdgeAdapters) -> CloudEdgeLink:
        placement = self.party.placement
        end, peer = (CloudEnd, placement.owner(index)) if self.on_cloud else (EdgeEnd, WRITER)
        return end(
            client_name(index),
            edge,
            split.wire,
            split.method.opts.killed_forward,
            Endpoint(peer),
            split.exp.compute.device,
        )

    # -- the run around the rounds, on the cloud ----------------------------------------------
    def open(self, split: SplitRound, start_round: int, run_dir: Path) -> None:
        self.party.start(start_round, split.runtime)

    def close(self, split: SplitRound) -> list[str]:
        if self.party.observer:
            return []
        return [
            *self.party.deployment_lines(),
            "",
            "Each edge wrote its users' `steps.csv`, `traffic.csv`, `schedule.json`, "
            "`schedule_client<i>.png` and `accounting.json` in `rank<k>/`; the cloud kept each "
            "user's active set and the killed modules' factors it was sent.",
        ]

    def initial(self, split: SplitRound) -> None:
        if not self.party.observer:
            self.party.collect()

    # -- an edge (ranks 1..N-1) ------------------------------------------------------------
    def begin_block(self, split: SplitRound, user: User) -> None:
        if not self.on_cloud:
            self.endpoint.post("begin", user.link.user)  # the cloud seeds the block's dropout

    def step(
        self, split: SplitRound, link: CloudEdgeLink, batch: dict[str, torch.Tensor], weight: float
    ) -> float:
        assert isinstance(link, EdgeEnd)
        return edge_step(link, batch, split.method.opts.head_on, weight)

    def serve_edge(self, split: SplitRound, loop: RunLoop) -> None:
        """An edge's whole run: its users' steps each round, then the round's report (and,
        to an observer, the users' state)."""
        party = self.party
        start = party.receive_start(loop)
        split.restored(start)
        with Progress(disable=True) as progress:
            for round_index in range(start, split.exp.config.experiment.rounds):
                task = progress.add_task("", total=len(split.users), status="")
                losses, steps, examples = split.train_here(round_index, progress, task)
                self.endpoint.post("end")
                self._await_round_end(round_index)
                counts = {"steps": steps, "examples": examples}
                if party.observer:
                    self._send_users(split, round_index, losses, counts)
                    continue
                split.write_user_files()
                every = [value for user in losses.values() for value in user]
                report = {"loss": [math.fsum(every), len(every)], **counts}
                party.report(loop, round_index, report | {"sums": split.sums_here(round_index)})
        if not party.observer:
            split.write_run_files()
        party.export(split.runtime)

    def _await_round_end(self, round_index: int) -> None:
        """Wait until the cloud has served every edge this round: until then it takes frames
        from whichever edge sends, and must not be handed this edge's report instead."""
        if recv_json(CLOUD_RANK).get("served") != round_index:
            raise ProtocolError(
                f"rank {self.party.rank}: rank {CLOUD_RANK} did not close round {round_index + 1}"
            )

    def _send_users(
        self,
        split: SplitRound,
        round_index: int,
        losses: dict[int, list[float]],
        counts: dict[str, int],
    ) -> None:
        """To the observer: everything the in-process engine holds after the round."""
        report = {
            "losses": {str(user): values for user, values in losses.items()},
            # exact values (ints stay ints), so rank 0 writes the same steps.csv
            "account": [[r for r in u.account if r[1] == round_index] for u in split.users],
            "traffic": split.traffic_rows,
            **counts,
        }
        send_json(report, CLOUD_RANK)
        send_states(CLOUD_RANK, [u.index for u in split.users], split.runtime)
        split.traffic_rows = []

    # -- the cloud (rank 0) ----------------------------------------------------------------
    def train_users(
        self, split: SplitRound, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[dict[int, list[float]], int, int]:
        if not self.on_cloud:
            return split.train_here(round_index, progress, task)
        self._serve_edges(split, round_index, progress, task)
        split.fold_ledger(round_index)
        if self.party.observer:
            return self._receive_users(split, progress, task)
        self.party.collect()
        reports = self.party.reports.values()
        self.edge_losses = [
            math.fsum(r["loss"][0] for r in reports),
            sum(r["loss"][1] for r in reports),
        ]
        status = f"loss {self.edge_losses[0] / self.edge_losses[1]:.4f}"
        progress.update(task, completed=len(split.users), status=status)
        return {}, sum(r["steps"] for r in reports), sum(r["examples"] for r in reports)

    def _serve_edges(
        self, split: SplitRound, round_index: int, progress: Progress, task: TaskID
    ) -> None:
        """The cloud's part of a round: every edge's requests in the order they arrive, one
        step at a time, until each edge has ended its round."""
        users = {u.link.user: u for u in split.users}
        placement = self.party.placement
        edges = placement.workers()
        waiting, begun = set(edges), 0
        streams = self.streams
        streams.states.clear()
        head_on = split.method.opts.head_on
        split.cloud.model.train()
        while waiting:
            peer, message = take_from(edges)
            if message.kind == "end" and peer in waiting:
                waiting.discard(peer)
                continue
            user = users.get(message.user)
            if user is None or placement.owner(user.index) != peer:
                raise ProtocolError(
                    f"rank {CLOUD_RANK}: rank {peer} sent {message.kind!r} of "
                    f"{message.user or 'no user'!r}, which is not a user it hosts"
                )
            link = user.link
            assert isinstance(link, CloudEnd)
            if message.kind == "begin":
                begun += 1
                progress.update(task, completed=begun - 1)
                link.round = round_index
                split.seed_dropout(user.index, round_index)
                streams.begin(user.index)
            elif message.kind == "embeddings" and user.index in streams.states:
                with streams.of(user.index):
                    link.serve_step(split.cloud, message, head_on)
            elif message.kind == "kill":
                link.kill(message.module)
            elif message.kind == "revive":
                link.revive(message.module)
            else:
                raise ProtocolError(
                    f"rank {CLOUD_RANK}: rank {peer} sent {message.kind!r} of {message.user}, "
                    "which is not part of the protocol here"
                )
        split.cloud.model.eval()
        for edge in edges:
            send_json({"served": round_index}, edge)

    def _receive_users(
        self, split: SplitRound, progress: Progress, task: TaskID
    ) -> tuple[dict[int, list[float]], int, int]:
        """The observer's end of the round: each edge's users as the in-process engine would
        hold them after it."""
        losses: dict[int, list[float]] = {}
        steps, examples, traffic = 0, 0, []
        for edge in self.party.placement.workers():
            report = recv_json(edge)
            hosted = self.party.placement.hosted(edge)
            recv_states(edge, hosted, split.runtime)
            for index, rows in zip(hosted, report["account"], strict=True):
                user = split.users[index]
                user.account.extend(rows)
                user.schedule = list(split.stores[index][SCHEDULE].to(torch.bool))
            losses.update({int(user): values for user, values in report["losses"].items()})
            traffic += report["traffic"]
            steps, examples = steps + int(report["steps"]), examples + int(report["examples"])
        split.traffic_rows.extend(sorted(traffic, key=lambda row: row[0]))  # in user order
        status = f"loss {np.mean([v for u in losses.values() for v in u]):.4f}"
        progress.update(task, completed=len(split.users), status=status)
        return losses, steps, examples

    def round_sums(self, split: SplitRound, round_index: int) -> dict[str, float]:
        if self.party.observer or not self.on_cloud:
            return split.sums_here(round_index)
        sums = [report["sums"] for report in self.party.reports.values()]
        return {name: sum(s[name] for s in sums) for name in sums[0]}

    def train_loss(self) -> float | None:
        if self.on_cloud and not self.party.observer:  # the edges' sums, not the steps' losses
            return self.edge_losses[0] / self.edge_losses[1]
        return None

    def evaluate(self, split: SplitRound) -> dict[str, float]:
        if self.party.observer:
            return split.evaluate_here()
        return summarize_clients(self.party.per_client_metrics(split.runtime))

    # -- what the cloud keeps of each user in a deployment -----------------------------------
    def own_state(self, split: SplitRound) -> tuple[dict[int, TensorDict], dict[int, TensorDict]]:
        """What this rank's deployment checkpoint keeps: an edge its users' state, the cloud
        what it was told of each user."""
        if not self.on_cloud:
            return own_clients(self.party, split.runtime)()
        return {u.index: self._cloud_state(split, u.link) for u in split.users}, {}

    def _cloud_state(self, split: SplitRound, link: CloudEdgeLink) -> TensorDict:
        """The user's active set and its killed modules' factors, as the cloud was told."""
        active = torch.tensor([key in link.active for key in split.keys], dtype=torch.uint8)
        state = {CLOUD_ACTIVE: active}
        for key, factors in link.cloud_factors.items():
            state |= {f"{CLOUD_FACTORS}{key}.{name}": t.to("cpu") for name, t in factors.items()}
        return state

    def restore_user(self, split: SplitRound, user: User) -> None:
        if not self.on_cloud or self.party.observer:
            split.restore_here(user)
            return
        store, link = split.stores[user.index], user.link
        if CLOUD_ACTIVE not in store:
            raise CheckpointError(
                f"checkpoint {split.run_dir / CHECKPOINT}: no cloud state of {link.user}"
            )
        mask = store[CLOUD_ACTIVE].tolist()
        link.active = {key for key, on in zip(split.keys, mask, strict=True) if on}
        link.cloud_factors = {}
        for name, tensor in stored(store, CLOUD_FACTORS).items():
            key, part = name.rsplit(".", 1)
            link.cloud_factors.setdefault(key, {})[part] = tensor
        link.cloud_factors = {
            key: link.place(factors, "up") for key, factors in link.cloud_factors.items()
        }
