"""DLoRA's cloud and edge in two processes: ``--engine distributed --nproc 2`` for split methods.

Rank 0 is the **cloud**: it holds the frozen base and runs its forward and backward. Rank 1 is
the **edge**: it holds the private data and, for every user, the LoRA factors, the head, the
labels, the loss, the optimizer and the Kill-and-Revive state. One edge process hosts all the
users (each its own ``EdgeAdapters`` and link), one after another as in one process, and they
share the one cloud. More ranks would need more edge devices to spread users over; the engine
runs on exactly two.

The protocol is ``fedlora.dlora.split``'s own, cut at the process boundary. The cloud's hooks
and autograd Function are unchanged; its end of each user's link (``CloudEnd``) turns a module's
round trip (x down, u up; g_y down, g_x up) into messages to the edge. The edge runs
``edge_step``, which is ``split_step`` seen from the device: send the embeddings, answer the
cloud's module requests until the head input arrives, compute the loss, send its gradient,
answer the backward's requests. Every tensor is the channel's safetensors bytes
(``Channel.pack``), sent with ``send_bytes``; nothing is pickled. A message is one frame: a
small JSON header (kind, user, module; what any deployment's protocol needs to route it) and
the payload. The edge's end (``EdgeEnd``) records every payload in the per-message ledger and
the step log exactly as the one-process link does, so ``steps.csv``, ``traffic.csv``, the
ledger and ``accounting.json`` count the same bytes; headers and the few control frames
(which user's block begins, a kill or revival, end of backward, end of round) are not counted:
in one process they are shared state, not messages.

Rank 0 is also the observer, as in the other distributed engines: after each round the edge
sends it every user's store (adapter, Kill-and-Revive state, schedule, accounting rows) and
optimizer state, the round's per-module traffic rows and ledger rows, and the losses. Rank 0
then evaluates each user's adapter on its base, writes the run directory and checkpoints, just
as the in-process split engine does. This mirror is process-internal (it is not traffic between
the parties and is not in the ledger); in a deployment the device would evaluate its own
adapter. ``--resume`` sends the edge its users' state back.

Results equal the in-process run's bit for bit (same ops, same order, one thread per rank): the
cloud seeds the base's dropout for each user's block exactly as the one process does. With
``lora.dropout > 0`` the device draws its own masks from its own generator, where one process
interleaves them with the base's in one stream, so such runs differ in their random draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress, TaskID

from fedlora import experiment as experiments
from fedlora.channel import Channel, MessageError, Transfer
from fedlora.dlora.split import (
    CloudEdgeLink,
    CloudModel,
    EdgeAdapters,
    HeadOn,
    KilledForward,
    _Pending,
    head_kind,
)
from fedlora.engines.distributed import OBSERVER, RankEngine, recv_states, send_states
from fedlora.engines.split import SCHEDULE, SplitEngine, _User
from fedlora.engines.transport import (
    ProtocolError,
    recv_bytes,
    recv_json,
    send_bytes,
    send_json,
)
from fedlora.tensors import TensorDict

CLOUD_RANK = OBSERVER  # the cloud, which also evaluates and writes the run directory
EDGE_RANK = 1  # the device of every user

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
        frame = recv_bytes(self.peer)
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
                f"rank {dist.get_rank()}: malformed DLoRA frame from rank {self.peer}: {error!r}"
            ) from None
        return Message(kind, user, module, frame[4 + size :], header)


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
    """The cloud's end of one user's link, the device being in the edge process.

    ``CloudModel``'s hooks call ``module_delta`` and ``module_grad`` as in one process; here
    they are request and reply over the endpoint. Kills and revivals arrive as messages. Its
    ``edge`` is the observer's mirror of the device: it supplies the modules' public shapes
    and, on resume, the killed factors the cloud had saved; the cloud never computes with it.
    """

    outgoing = "down"

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


class DistributedSplitEngine(RankEngine, SplitEngine):
    """Split methods on two ranks: rank 0 the cloud and observer (``run``), rank 1 the edge
    hosting every user (``serve``). Both build the same ``SplitEngine``; each rank's links are
    its own end (``_link``), and the edge steps with ``edge_step`` (``_step``)."""

    rank0_hosts = False  # Placement: every client on rank 1
    world: ClassVar[int | None] = 2
    roles: ClassVar[str] = (
        "rank 0 is the cloud (frozen base model, writes the run directory); rank 1 is the edge "
        "(data, adapters, head, loss and optimizer of every user)"
    )

    def __init__(self, experiment: experiments.Experiment, run_dir: Path, console: Console | None):
        # Before the base classes build the users: ``_link`` needs them.
        self.on_cloud = dist.get_rank() == CLOUD_RANK
        self.endpoint = Endpoint(EDGE_RANK if self.on_cloud else CLOUD_RANK)
        super().__init__(experiment, run_dir, console)

    def _link(self, user: str, edge: EdgeAdapters) -> CloudEdgeLink:
        end = CloudEnd if self.on_cloud else EdgeEnd
        return end(
            user,
            edge,
            self.wire,
            self.method.opts.killed_forward,
            self.endpoint,
            self.exp.compute.device,
        )

    # -- the edge (rank 1) -----------------------------------------------------------------
    def _train_block(self, user: _User, round_index: int) -> tuple[list[float], int, int]:
        self.endpoint.post("begin", user.link.user)  # the cloud seeds the block's dropout
        return super()._train_block(user, round_index)

    def _step(self, link: CloudEdgeLink, batch: dict[str, torch.Tensor], weight: float) -> float:
        assert isinstance(link, EdgeEnd)
        return edge_step(link, batch, self.method.opts.head_on, weight)

    def serve(self) -> None:
        """The edge's whole run: every user's steps each round, then the round's report and
        the users' state to the observer."""
        start = self._receive_start()
        for user in self.users if start else []:
            self._restore_user(user)
        with Progress(disable=True) as progress:
            for round_index in range(start, self.exp.config.experiment.rounds):
                task = progress.add_task("", total=len(self.users), status="")
                losses, steps, examples = self._train_users(round_index, progress, task)
                self.endpoint.post("end")
                report = {
                    "losses": losses,
                    "steps": steps,
                    "examples": examples,
                    # exact values (ints stay ints), so rank 0 writes the same steps.csv
                    "account": [[r for r in u.account if r[1] == round_index] for u in self.users],
                    "traffic": self.traffic_rows,
                    "ledger": [
                        vars(t) for t in self.channel.ledger.records if t.round == round_index
                    ],
                }
                send_json(report, CLOUD_RANK)
                send_states(CLOUD_RANK, [u.index for u in self.users], self.stores, self.optimizers)
                self.traffic_rows = []

    # -- the cloud (rank 0) ----------------------------------------------------------------
    def _train_users(
        self, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[list[float], int, int]:
        if not self.on_cloud:
            return super()._train_users(round_index, progress, task)
        users = {u.link.user: (position, u) for position, u in enumerate(self.users)}
        head_on = self.method.opts.head_on
        while (message := self.endpoint.take()).kind != "end":
            if message.user not in users:
                raise ProtocolError(
                    f"rank {CLOUD_RANK}: rank {EDGE_RANK} sent {message.kind!r} for unknown user "
                    f"{message.user!r}"
                )
            position, user = users[message.user]
            link = user.link
            assert isinstance(link, CloudEnd)
            if message.kind == "begin":
                progress.update(task, completed=position)
                self._seed_dropout(user.index, round_index)
                self.cloud.model.train()
            elif message.kind == "embeddings":
                link.serve_step(self.cloud, message, head_on)
            elif message.kind == "kill":
                link.kill(message.module)
            elif message.kind == "revive":
                link.revive(message.module)
            else:
                raise ProtocolError(
                    f"rank {CLOUD_RANK}: rank {EDGE_RANK} sent {message.kind!r}, which is not "
                    "part of the protocol between steps"
                )
        self.cloud.model.eval()
        return self._receive_report(round_index, progress, task)

    def _receive_report(
        self, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[list[float], int, int]:
        """The edge's round, mirrored: what the in-process engine would hold after it."""
        report = recv_json(EDGE_RANK)
        recv_states(EDGE_RANK, [u.index for u in self.users], self.stores, self.optimizers)
        for user, rows in zip(self.users, report["account"], strict=True):
            user.account.extend(rows)
            user.schedule = list(self.stores[user.index][SCHEDULE].to(torch.bool))
        self.traffic_rows.extend(report["traffic"])
        for row in report["ledger"]:
            self.channel.ledger.add(Transfer(**row))
        losses = report["losses"]
        status = f"loss {np.mean(losses):.4f}"
        progress.update(task, completed=len(self.users), status=status)
        return losses, int(report["steps"]), int(report["examples"])
