"""torch.distributed ranks as a placement: ``--engine distributed`` (the launcher is
``fedlora.engines.launch``).

Every rank builds the experiment, so each process holds one frozen base model and hosts its
share of the clients (``fedlora.engines.layout``: round-robin over ranks 1..N-1 when rank 0 is
the server or the cloud, over all ranks for gossip). Every rank builds the same round and run
loop; rank 0 runs the loop (it writes the run directory), the others serve their clients' half
of each round (``serve``), with the same client runtime, the same budget stop and the same
evaluation cadence. Sampling and dropouts are pure functions of (seed, round), so workers need
no instructions beyond the messages themselves. Bytes cross as point-to-point frames
(``fedlora.engines.transport``); nothing is pickled.

- Server rounds (``RankHosts``): rank 0 sends each sampled client's download to the rank hosting
  it, with the merged base offset (FLoRA), and receives the answer; it keeps the ledger in the
  in-process order, so byte counts and ledger files are the same. Under secure aggregation a
  rank keeps its clients' replies and answers only the masking protocol's messages, which rank
  0 sends it step by step (``fedlora.engines.masking``), after the round's report.
- Gossip (``RankPeers``): a node's message to a neighbour on another rank goes through the
  channel and over point-to-point; mixing is the round's own code. Rank 0 records every rank's
  transfers in edge order.
- The cloud-edge split: ``fedlora.engines.distributed_split``.

What crosses after a round is the mode's (``RankParty``), the round itself is the same:

- **Deployment** (the default): a process receives only what the protocol sends, plus one
  report per worker and round of scalars (local losses and step counts, its own models' test
  metrics, that it has checkpointed). Each rank evaluates the models it holds (per-client
  models on their client's rank, the global model on rank 0), checkpoints its own clients in its
  own directory (``RankKeeper``) and exports their adapters; ``--resume`` restores every rank
  from its own files and refuses another placement.
- **Observer** (``--observer``): rank 0 is also an observer outside the protocol. After every
  round each worker sends it the hosted clients' stores and optimizer states (and, for gossip,
  the trained messages for the consensus metric); rank 0 evaluates, writes the run directory and
  checkpoints exactly like one process (bit for bit), and ``--resume`` sends every worker its
  clients' state back, on any number of processes. This mirror is process-internal state, not
  traffic between parties, so it is not in the ledger.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist
from rich.progress import Progress

from fedlora.channel import Ledger, MessageError, Transfer, decode
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import (
    Checkpoint,
    checkpoint_at,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from fedlora.compat import mismatch, stamp
from fedlora.drill import ANSWERING, Drills
from fedlora.engines.client import ClientRuntime, from_outcome, outcome
from fedlora.engines.gossip import GossipRound, node_name
from fedlora.engines.layout import (
    LAYOUT,
    Placement,
    check_deployment,
    rank_dir,
)
from fedlora.engines.loop import CentralKeeper, RunLoop
from fedlora.engines.masking import END, KINDS, Answers, MaskingClients, host_report
from fedlora.engines.server_round import ServerRound
from fedlora.engines.transport import (
    PeerError,
    ProtocolError,
    Sends,
    recv_bytes,
    recv_json,
    recv_tensors,
    send_bytes,
    send_json,
    send_tensors,
)
from fedlora.tensors import TensorDict
from fedlora.topology import RoundGraph
from fedlora.training import LocalResult

WRITER = 0  # the rank that writes the run directory: the server, the cloud, gossip's node 0


def send_states(peer: int, clients: list[int], runtime: ClientRuntime) -> None:
    for client in clients:
        send_tensors(runtime.stores[client], peer)
        send_tensors(runtime.optimizers.get(client, {}), peer)


def recv_states(peer: int, clients: list[int], runtime: ClientRuntime) -> None:
    for client in clients:
        runtime.stores[client] = recv_tensors(peer)
        optimizer = recv_tensors(peer)
        if optimizer:
            runtime.optimizers[client] = optimizer


T = TypeVar("T")
OwnState = Callable[[], tuple[dict[int, TensorDict], dict[int, TensorDict]]]


def start_round(message: dict, rank: int) -> int:
    """The round rank 0's opening message says to start from; a ``ProtocolError`` if rank 0
    runs another fedlora protocol or the message is not an opening one."""
    why = mismatch("rank 0", message)
    if why is not None:
        raise ProtocolError(f"rank {rank}: {why}")
    start = message.get("start")
    if not isinstance(start, int) or start < 0:
        raise ProtocolError(f"rank {rank}: rank 0's opening message has no start round: {message}")
    return start


class RankParty:
    """This rank's place in a launched run and the two modes' ends of a round.

    Observer: rank 0 sends each worker the round to start from and its clients' state; after
    every round the workers send it their clients' state back. Deployment: only the start round
    crosses; each worker keeps its clients' state, evaluates their own models, checkpoints
    them in ``<out>/rank<k>/`` and then reports the round to rank 0 (``report``): scalars
    only. Rank 0 takes every worker's report where the observer would take the states
    (``collect``), so it checkpoints a round only after every worker has (each worker keeps its
    previous checkpoint as well, for the round rank 0 may lag behind).
    """

    def __init__(
        self, clients: int, rank0_hosts: bool, observer: bool, out: Path, keep_going: bool = False
    ) -> None:
        self.rank = dist.get_rank()
        self.observer = observer
        self.out = out
        self.placement = Placement(clients, dist.get_world_size(), rank0_hosts)
        self.reports: dict[int, dict] = {}  # this round's report of each worker (deployment)
        self.keep_going = keep_going  # federation.lost_ranks = "continue"
        self.lost: dict[int, str] = {}  # workers that died, and how (with keep_going)

    def reach(self, peer: int, exchange: Callable[[], T]) -> T | None:
        """``exchange()`` with worker ``peer``; None if ``peer`` is lost. A peer whose
        connection fails is lost from then on where the run keeps going without it; else the
        failure stops the run (as a peer that breaks the protocol always does)."""
        if peer in self.lost:
            return None
        try:
            return exchange()
        except ProtocolError:
            raise
        except PeerError as error:
            if not self.keep_going:
                raise
            cause = str(error).split(". ")[0].rsplit(": ", 1)[-1].rstrip(")")  # gloo's is long
            self.lost[peer] = f"rank {peer} was lost ({cause})"
            return None

    def alive(self) -> list[int]:
        return [peer for peer in self.placement.workers() if peer not in self.lost]

    @property
    def hosted(self) -> list[int]:
        return self.placement.hosted(self.rank)

    def directory(self) -> Path:
        """Where this rank writes: the run directory (rank 0, an observer's workers write
        nothing), ``<out>/rank<k>`` for a deployment's worker."""
        return self.out if self.observer else rank_dir(self.out, self.rank)

    # -- rank 0 ------------------------------------------------------------------------------
    def start(self, start_round: int, runtime: ClientRuntime) -> None:
        for peer in self.placement.workers():
            send_json({"start": start_round, **stamp()}, peer)
            if self.observer:
                send_states(peer, self.placement.hosted(peer), runtime)

    def collect(self) -> None:
        """Rank 0's end of a deployment round: every worker's report, in rank order."""
        reports = {peer: self.reach(peer, partial(recv_json, peer)) for peer in self.alive()}
        self.reports = {peer: report for peer, report in reports.items() if report is not None}

    def per_client_metrics(self, runtime: ClientRuntime) -> list[dict[str, float]]:
        """Every client's own-model metrics in client order: rank 0's hosted clients evaluated
        here, the others as their workers reported them this round."""
        metrics = {c: runtime.metrics(c) for c in self.placement.hosted(WRITER)}
        for peer, report in self.reports.items():
            got = report.get("metrics", {})
            if sorted(map(int, got)) != self.placement.hosted(peer):
                raise ProtocolError(
                    f"rank {self.rank}: rank {peer} reported metrics of clients "
                    f"{sorted(map(int, got))}, it hosts {self.placement.hosted(peer)}"
                )
            metrics.update({int(c): values for c, values in got.items()})
        return [metrics[c] for c in range(self.placement.clients)]

    def deployment_lines(self) -> list[str]:
        """summary.md: who held what, and where each rank's files are."""
        if self.observer:
            return []
        return [
            "",
            "## Processes (deployment)",
            "",
            f"{self.placement.describe()}. Each rank kept its own clients' state and "
            "checkpoints (rank 0 here, rank k in `rank<k>/`), evaluated their own models and "
            "exported their adapters; only protocol messages and per-round scalars reached "
            "rank 0.",
            *(
                f"\nLost during the run (federation.lost_ranks = 'continue'): {why}; its files "
                "stop at the last round it completed."
                for why in self.lost.values()
            ),
        ]

    # -- a worker ----------------------------------------------------------------------------
    def receive_start(self, loop: RunLoop) -> int:
        """A worker's start: the round, and its clients' state (observer) or its own files;
        on a fresh deployment, its report of round 0."""
        runtime = loop.round.runtime
        start = start_round(recv_json(WRITER), self.rank)
        if self.observer:
            recv_states(WRITER, self.hosted, runtime)
        else:
            self._load_own(loop, start)
            if start == 0:
                send_json(self.hosted_metrics(runtime), WRITER)
        return start

    def _load_own(self, loop: RunLoop, start: int) -> None:
        """A worker's state after ``start`` rounds, from its own directory."""
        directory = self.directory()
        if start == 0:  # rank 0 began a fresh run: anything here is from one it never saved
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        if start == 0:
            return
        remove_partial(directory)
        checkpoint = checkpoint_at(directory, start)
        check_deployment(directory, checkpoint.extra, self.placement, self.rank)
        runtime = loop.round.runtime
        runtime.stores.update(checkpoint.stores)
        runtime.optimizers = checkpoint.optimizers
        loop.round.channel.ledger = Ledger.from_json(checkpoint.ledger)

    def hosted_metrics(self, runtime: ClientRuntime) -> dict:
        """A report's own-model metrics of the clients this worker hosts (methods with
        ``per_client_eval``; nothing for the others, whose global model rank 0 evaluates)."""
        if not runtime.exp.method.per_client_eval:
            return {}
        return {"metrics": {str(c): runtime.metrics(c) for c in self.hosted}}

    def report(self, loop: RunLoop, round_index: int, report: dict) -> None:
        """A worker's end of a deployment round: its own models' metrics when the round is
        evaluated, its checkpoint, then the report (so a report means "saved")."""
        if loop.evaluation_due(round_index):
            report |= self.hosted_metrics(loop.round.runtime)
        loop.keeper.save(loop, round_index + 1)
        send_json(report, WRITER)

    def export(self, runtime: ClientRuntime) -> None:
        """A worker's end of a deployment run: its clients' own adapters, in the run directory
        (``adapters/client_<i>``) as one process would write them."""
        if not self.observer:
            runtime.export(self.hosted, self.out)


class RankKeeper:
    """A deployment rank's checkpoint: its own clients (``own``; default the stores and
    optimizer states of the clients it hosts) in its own directory, with the placement that
    wrote it; rank 0's also the method's state. An observer keeps everything centrally."""

    def __init__(self, party: RankParty, own: OwnState) -> None:
        self.party = party
        self.own = own
        self.central = CentralKeeper()

    def save(self, loop: RunLoop, completed: int) -> None:
        party = self.party
        if party.observer:
            self.central.save(loop, completed)
            return
        writer = party.rank == WRITER
        stores, optimizers = self.own()
        checkpoint = Checkpoint(
            completed,
            loop.exp.method.state_dict() if writer else {},
            stores,
            optimizers,
            loop.metrics,
            loop.round.channel.ledger.to_json(),
            {
                LAYOUT: party.placement.layout(party.rank),
                **(loop.privacy_state() if writer else {}),
            },
        )
        save_checkpoint(party.directory(), checkpoint, keep_previous=not writer)

    def resume(self, loop: RunLoop) -> int:
        """Rank 0's resume (the workers' come with ``RankParty.receive_start``)."""
        party = self.party
        if party.observer:
            return self.central.resume(loop)
        checkpoint = load_checkpoint(loop.run_dir)
        if checkpoint is None:
            return 0
        path = loop.run_dir / CHECKPOINT
        check_deployment(path, checkpoint.extra, party.placement, party.rank)
        loop.load_server_state(path, checkpoint)
        runtime = loop.round.runtime
        runtime.stores.update(checkpoint.stores)
        runtime.optimizers = checkpoint.optimizers
        return checkpoint.completed_rounds


def own_clients(party: RankParty, runtime: ClientRuntime) -> OwnState:
    def own() -> tuple[dict[int, TensorDict], dict[int, TensorDict]]:
        mine = party.hosted
        optimizers = {c: runtime.optimizers[c] for c in mine if c in runtime.optimizers}
        return {c: runtime.stores[c] for c in mine}, optimizers

    return own


class RankPlacement:
    """What rank 0's end of every rank placement does around the rounds: tell the workers
    where the run starts (and an observer's workers their clients' state), take a
    deployment's round-0 reports, and say who held what."""

    def __init__(self, party: RankParty, runtime: ClientRuntime) -> None:
        self.party = party
        self.runtime = runtime

    def open(self, start_round: int) -> None:
        self.party.start(start_round, self.runtime)

    def close(self) -> list[str]:
        return self.party.deployment_lines()

    def initial(self) -> None:
        """A deployment's workers report their own models of round 0 when it starts."""
        if not self.party.observer:
            self.party.collect()


# -- server rounds ------------------------------------------------------------------------------
class RankHosts(RankPlacement):
    """A server's clients on ranks 1..N-1 (``fedlora.engines.server_round.Hosts``)."""

    def __init__(self, party: RankParty, runtime: ClientRuntime) -> None:
        super().__init__(party, runtime)
        self.sends = Sends()

    def dispatch(self, downloads: dict[int, bytes], offset: TensorDict, round_index: int) -> None:
        # The merged base (FLoRA) is shared by all parties in one process; here workers get it.
        party, owner = self.party, self.party.placement.owner
        for peer in party.alive():
            party.reach(peer, partial(send_tensors, offset, peer))
        self.sends = Sends()
        for client, payload in downloads.items():
            party.reach(owner(client), partial(self.sends.bytes, payload, owner(client)))

    def answer(self, client: int, round_index: int) -> tuple[bytes, dict]:
        owner = self.party.placement.owner(client)
        got = self.party.reach(owner, lambda: (recv_bytes(owner), recv_json(owner)))
        if got is None:  # the owner's process was lost: no reply, and why
            return b"", {"outcome": None, "reason": self.party.lost[owner]}
        return got

    def close_round(self, sampled: list[int], round_index: int) -> None:
        self.sends.wait(self.party.reach)
        party = self.party
        if not party.observer:
            party.collect()
            return
        for peer in party.placement.workers():
            clients = [c for c in sampled if party.placement.owner(c) == peer]
            recv_states(peer, clients, self.runtime)

    def client_metrics(self) -> list[dict[str, float]] | None:
        if self.party.observer:
            return None
        return self.party.per_client_metrics(self.runtime)

    def masking(self) -> RankHosts:
        """The workers keep their clients' replies: the protocol goes to them."""
        return self

    # -- secure aggregation's carrier (``fedlora.engines.masking.Carrier``) --------------------
    def step(self, kind: str, payloads: dict[int, bytes], round_index: int) -> Answers:
        """Every worker gets the step's header (its clients in it, maybe none) and their
        messages at once; then each worker's answers, in client order."""
        party, owner, sends = self.party, self.party.placement.owner, Sends()
        for peer in party.alive():
            clients = [c for c in payloads if owner(c) == peer]
            header = json.dumps({"kind": kind, "clients": clients}).encode()
            messages = [header, *(payloads[client] for client in clients)]
            party.reach(peer, lambda peer=peer, messages=messages: [
                sends.bytes(message, peer) for message in messages
            ])  # fmt: skip
        answers = {}
        for client in payloads:
            peer = owner(client)
            got = party.reach(peer, lambda peer=peer: (recv_bytes(peer), recv_json(peer)))
            if got is None:  # its rank is lost: the client drops at this step
                answers[client] = b"", {"failed": self.party.lost[peer]}
                continue
            try:
                answers[client] = got[0], host_report(got[1])
            except ValueError as error:
                raise ProtocolError(f"rank {peer}, client {client}: {error}") from None
        sends.wait(party.reach)
        return answers

    def end(self, round_index: int) -> None:
        for peer in self.party.alive():
            self.party.reach(peer, partial(send_json, {"kind": END}, peer))


def serve_masking(
    masking: MaskingClients, party: RankParty, round_index: int, drills: Drills
) -> None:
    """A worker's end of a round's secure aggregation: each step's messages for its clients,
    answered, until rank 0 says the run is over; then its replies are dropped."""
    while (kind := (header := recv_json(WRITER)).get("kind")) != END:
        clients = header.get("clients")
        mine = isinstance(clients, list) and all(c in party.hosted for c in clients)
        if kind not in KINDS or not mine:
            raise ProtocolError(
                f"rank {party.rank}: rank 0 sent a masking step {header} outside the protocol "
                f"(steps {KINDS}, this rank's clients {party.hosted})"
            )
        payloads = [recv_bytes(WRITER) for _ in clients]
        for client, payload in zip(clients, payloads, strict=True):
            answer, report = masking.respond(client, round_index, kind, payload)
            send_bytes(answer, WRITER)
            send_json(report, WRITER)
        drills.after(ANSWERING[kind], round_index)
    masking.end()


def serve_clients(loop: RunLoop, party: RankParty) -> None:
    """A worker's whole run of server rounds: its clients' answers to every round (under
    secure aggregation, their replies kept here and only the masking protocol answered)."""
    round_ = loop.round
    assert isinstance(round_, ServerRound)
    runtime, secure = round_.runtime, round_.secure
    masking = MaskingClients(loop.exp, secure, round_.round_weights) if secure else None
    start, drills = party.receive_start(loop), Drills(party.rank)
    for round_index in range(start, loop.exp.config.experiment.rounds):
        if loop.budget_stop(round_index):  # rank 0 stops there too
            break
        runtime.apply_offset(recv_tensors(WRITER))
        mine = [c for c in round_.sampled(round_index) if party.placement.owner(c) == party.rank]
        for client in mine:
            download = recv_bytes(WRITER)
            reply, report = runtime.answer(client, download, round_index)
            if masking is not None and reply:  # it stays here, for the masking
                masking.hold(client, decode(reply), decode(download), round_index)
                reply = b""
            send_bytes(reply, WRITER)
            send_json(report, WRITER)
            drills.after("train", round_index)
        if party.observer:
            send_states(WRITER, mine, runtime)
        else:
            party.report(loop, round_index, {})
        if masking is not None:
            serve_masking(masking, party, round_index, drills)
    party.export(runtime)


# -- gossip ------------------------------------------------------------------------------------
class RankPeers(RankPlacement):
    """Gossip nodes dealt to all ranks (``fedlora.engines.gossip.Peers``). In a deployment no
    rank holds every node's state, so the network-averaged model and the consensus distances
    (functions of all nodes' factors, not of scalars each rank could share) are not computed;
    each node's own model is evaluated on its rank."""

    def __init__(self, party: RankParty, runtime: ClientRuntime) -> None:
        super().__init__(party, runtime)
        self.holds_every_node = party.observer
        # (position in the round's edge list, transfer) for the messages this rank packed; rank
        # 0 records everyone's in edge order, the in-process order of the ledger.
        self.sent: list[tuple[int, Transfer]] = []

    def local_nodes(self) -> list[int]:
        return self.party.hosted

    def train(
        self, round_: GossipRound, round_index: int
    ) -> Iterator[tuple[int, TensorDict, LocalResult]]:
        for node in self.local_nodes():
            yield node, *self.runtime.train(node, {}, round_index)

    def exchange(
        self,
        round_: GossipRound,
        messages: dict[int, TensorDict],
        graph: RoundGraph,
        round_index: int,
    ) -> dict[int, dict[int, TensorDict]]:
        """received[i][j] for the hosted nodes i, as in one process; an edge between ranks is
        one point-to-point transfer of the bytes the channel packed."""
        owner, me = self.party.placement.owner, self.party.rank
        nodes = range(len(round_.exp.clients))
        edges = [(i, j) for i in nodes for j in graph.neighbours(i)]
        sends, here = Sends(), {}
        for position, (i, j) in enumerate(edges):
            if owner(j) != me:
                continue
            payload = round_.channel.pack(messages[j], node_name(j), round_index)
            transfer = Transfer(
                round_index, node_name(j), node_name(i), len(payload), len(messages[j])
            )
            self.sent.append((position, transfer))
            if owner(i) == me:
                here[(i, j)] = payload
            else:
                sends.bytes(payload, owner(i))
        received: dict[int, dict[int, TensorDict]] = {i: {} for i in messages}
        for i, j in edges:
            if owner(i) == me:
                payload = here.pop((i, j)) if owner(j) == me else recv_bytes(owner(j))
                try:
                    received[i][j] = round_.channel.unpack(payload, round_.shapes)
                except MessageError:  # refused: node i mixes its other neighbours
                    continue
        sends.wait()
        return received

    def gather(
        self,
        round_: GossipRound,
        messages: dict[int, TensorDict],
        results: dict[int, LocalResult],
        round_index: int,
    ) -> tuple[dict[int, TensorDict], dict[int, LocalResult]]:
        """Every node's local result and packed transfers for the round's record; the observer
        also takes every node's trained message and state."""
        party = self.party
        messages, results, sent = dict(messages), dict(results), self.sent
        if not party.observer:
            party.collect()
        for peer in party.placement.workers():
            report = party.reports[peer] if not party.observer else recv_json(peer)
            results.update({int(n): from_outcome(row) for n, row in report["outcomes"].items()})
            sent += [(position, Transfer(**row)) for position, row in report["sent"]]
            if party.observer:
                nodes = party.placement.hosted(peer)
                messages.update({node: recv_tensors(peer) for node in nodes})
                recv_states(peer, nodes, self.runtime)
        for _, transfer in sorted(sent, key=lambda entry: entry[0]):
            round_.channel.ledger.add(transfer)
        self.sent = []
        return messages, results

    def node_metrics(self) -> list[dict[str, float]] | None:
        if self.party.observer:
            return None
        return self.party.per_client_metrics(self.runtime)


def serve_peers(loop: RunLoop, party: RankParty, peers: RankPeers) -> None:
    """A worker's whole gossip run: its nodes' steps, exchange and mixing every round, then
    the round's report (and, to an observer, the nodes' messages and state)."""
    round_ = loop.round
    assert isinstance(round_, GossipRound)
    runtime = round_.runtime
    start = party.receive_start(loop)
    nodes = party.hosted
    with Progress(disable=True) as progress:
        for round_index in range(start, loop.exp.config.experiment.rounds):
            if loop.budget_stop(round_index):  # rank 0 stops there too
                break
            task = progress.add_task("", total=len(nodes))
            messages, results = round_.step(round_index, progress, task)
            report = {
                "outcomes": {node: outcome(results[node]) for node in nodes},
                "sent": [(position, vars(t)) for position, t in peers.sent],
            }
            peers.sent = []
            if not party.observer:
                party.report(loop, round_index, report)
                continue
            send_json(report, WRITER)
            for node in nodes:
                send_tensors(messages[node], WRITER)
            send_states(WRITER, nodes, runtime)
    party.export(runtime)
