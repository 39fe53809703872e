"""The same rounds across processes (and machines) with torch.distributed: ``--engine distributed``.

``fedlora run CONFIG --engine distributed --nproc N`` starts N ranks of the same command on this
machine (a small torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each one's
environment) and watches them; under an external ``torchrun`` each process finds those variables
already set and joins directly. Every rank builds the experiment, so each process holds one
frozen base model and hosts its share of the clients' stores and optimizer states.

Server methods (``engine = "simulation"``): rank 0 is the server and the clients are dealt
round-robin to ranks 1..N-1. Per round rank 0 sends each sampled client's message to the rank
hosting it and receives the reply, as the channel's safetensors bytes over point-to-point sends;
rank 0 keeps the ledger, recording each transfer in the in-process engine's order, so byte counts
and ledger files are the same. Sampling is a pure function of (seed, round), so workers need no
instructions beyond the messages themselves.

Peer methods (``engine = "gossip"``, Dec-LoRA): nodes are dealt round-robin to all ranks; a node's
message to a neighbour on another rank goes through the channel and over point-to-point, and
mixing is the in-process gossip engine's own code.

Split methods (``engine = "split"``, DLoRA) run on exactly two ranks, rank 0 the cloud and rank 1
the edge hosting every user; ``fedlora.engines.distributed_split`` says how.

Either way rank 0 is also the observer: after every round each worker sends it the hosted
clients' stores and optimizer states (and, for gossip, the trained messages for the consensus
metric). Rank 0 therefore evaluates, writes the run directory and checkpoints exactly like the
in-process engine, and ``--resume`` sends every worker its clients' state back. This mirror is
process-internal state, not traffic between parties, so it is not in the ledger. With one process
the in-process engine runs in it.

A rank that dies stops the run within a bounded time: its peers' sends and receives fail at once
on the closed connection (or after ``--timeout`` seconds for a hung peer), and the launcher stops
the other ranks as soon as one exits with an error, naming it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress

from fedlora import experiment as experiments
from fedlora import rundir
from fedlora.channel import MessageError, Transfer
from fedlora.compute import configure_threads, rank_backend
from fedlora.config import Config, ConfigError, load_config
from fedlora.engines.gossip import GossipEngine, node_name
from fedlora.engines.simulation import SERVER, RunResult, SimulationEngine, client_name
from fedlora.engines.transport import (
    Sends,
    connect,
    launched,
    recv_bytes,
    recv_json,
    recv_tensors,
    send_bytes,
    send_json,
    send_tensors,
    set_limit,
)
from fedlora.methods import method_class
from fedlora.session import ENGINES, configure_runtime, run_experiment
from fedlora.tensors import TensorDict
from fedlora.topology import RoundGraph
from fedlora.training import LocalResult

OBSERVER = 0  # the rank that evaluates, writes the run directory and checkpoints


class LaunchError(RuntimeError):
    """A rank of a launched run failed; the others were stopped."""


@dataclass(frozen=True)
class Placement:
    """Which rank hosts which client: round-robin over ranks 1..N-1 when rank 0 is the server,
    over all ranks when there is none (gossip)."""

    clients: int
    world: int
    rank0_hosts: bool

    def owner(self, client: int) -> int:
        if self.rank0_hosts:
            return client % self.world
        return 1 + client % (self.world - 1)

    def hosted(self, rank: int) -> list[int]:
        return [c for c in range(self.clients) if self.owner(c) == rank]

    def workers(self) -> list[int]:
        """The ranks other than 0 that host clients (the ones rank 0 talks to)."""
        return [r for r in range(1, self.world) if self.hosted(r)]

    def idle(self) -> list[int]:
        return [r for r in range(1, self.world) if not self.hosted(r)]


def send_states(
    peer: int, clients: list[int], stores: dict[int, TensorDict], optimizers: dict[int, TensorDict]
) -> None:
    for client in clients:
        send_tensors(stores[client], peer)
        send_tensors(optimizers.get(client, {}), peer)


def recv_states(
    peer: int, clients: list[int], stores: dict[int, TensorDict], optimizers: dict[int, TensorDict]
) -> None:
    for client in clients:
        stores[client] = recv_tensors(peer)
        optimizer = recv_tensors(peer)
        if optimizer:
            optimizers[client] = optimizer


def outcome(result: LocalResult) -> list[float]:
    """What rank 0 needs of a local result for the round's record (the state stays put)."""
    return [result.loss, result.steps, result.examples]


def from_outcome(row: list[float]) -> LocalResult:
    loss, steps, examples = row
    return LocalResult({}, {}, int(steps), loss, int(examples))


class RankEngine(SimulationEngine):
    """What both distributed engines share: the placement, and the start of a run (rank 0 sends
    each worker the round to start from and its clients' state; the worker takes them)."""

    rank0_hosts: ClassVar[bool]
    world: ClassVar[int | None] = None  # the only number of ranks it runs on, if it has one
    roles: ClassVar[str] = ""  # what each rank does, for the launcher's notes and errors

    def __init__(self, experiment: experiments.Experiment, run_dir: Path, console: Console | None):
        super().__init__(experiment, run_dir, console)
        self.rank = dist.get_rank()
        self.placement = Placement(len(experiment.clients), dist.get_world_size(), self.rank0_hosts)

    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        for peer in self.placement.workers():
            send_json({"start": start_round}, peer)
            send_states(peer, self.placement.hosted(peer), self.stores, self.optimizers)
        return super().run(start_round, show_progress)

    def _receive_start(self) -> int:
        start = int(recv_json(OBSERVER)["start"])
        recv_states(OBSERVER, self.placement.hosted(self.rank), self.stores, self.optimizers)
        return start

    def serve(self) -> None:
        """A worker's whole run: its clients' part of every round."""
        raise NotImplementedError


class DistributedSimulationEngine(RankEngine):
    """Server methods: rank 0 runs ``run`` (the server, the observer), workers run ``serve``."""

    rank0_hosts = False

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

    def _train_clients(
        self, sampled: list[int], round_index: int
    ) -> Iterator[tuple[int, TensorDict | None, LocalResult | None]]:
        method, placement = self.exp.method, self.placement
        # The merged base (FLoRA) is shared by all parties in one process; here workers get it.
        offset = method.base_offset() or {}
        for peer in placement.workers():
            send_tensors(offset, peer)
        sends = Sends()
        down: dict[int, tuple[bytes, TensorDict]] = {}
        for client in sampled:
            message = method.server_message(client, round_index)
            down[client] = (self._pack(message, SERVER, round_index), message)
            sends.bytes(down[client][0], placement.owner(client))
        for client in sampled:
            owner, name = placement.owner(client), client_name(client)
            payload, sent = down[client]
            self._count(payload, len(sent), SERVER, name, round_index)
            if reason := self.missing(client, round_index):  # the worker knows it too
                self.absent[client] = reason
                yield client, None, None
                continue
            payload = recv_bytes(owner)
            report = recv_json(owner)
            if report["outcome"] is None:
                self.absent[client] = report["reason"]
                yield client, None, None
                continue
            yield (
                client,
                self._receive(client, payload, sent, round_index),
                from_outcome(report["outcome"]),
            )
        sends.wait()
        for peer in placement.workers():
            clients = [c for c in sampled if placement.owner(c) == peer]
            recv_states(peer, clients, self.stores, self.optimizers)

    def _receive(
        self, client: int, payload: bytes, sent: TensorDict, round_index: int
    ) -> TensorDict | None:
        """A worker's reply, checked and counted as the in-process engine's ``_accept`` does."""
        if not self.exp.method.communicates or not payload:
            return self._unpack(payload)
        expect = self.exp.method.expected_reply(client, sent)
        try:
            return self.channel.receive(payload, client_name(client), SERVER, round_index, expect)
        except MessageError as error:
            self.absent[client] = f"reply refused: {error}"
            return None

    def serve(self) -> None:
        start = self._receive_start()
        for round_index in range(start, self.exp.config.experiment.rounds):
            if self.budget_stop(round_index):  # rank 0 stops there too
                break
            offset = recv_tensors(OBSERVER)
            if offset:
                self.exp.slots.merge_into_base(offset)
            mine = [c for c in self.sampled(round_index) if self.placement.owner(c) == self.rank]
            for client in mine:
                payload = recv_bytes(OBSERVER)
                if self.missing(client, round_index):
                    continue
                try:
                    message = self._unpack(payload)
                except MessageError as error:
                    send_bytes(b"", OBSERVER)
                    send_json(
                        {"outcome": None, "reason": f"refused the download: {error}"}, OBSERVER
                    )
                    continue
                reply, result = self.client_work(client, message, round_index)
                send_bytes(self._pack(reply, client_name(client), round_index), OBSERVER)
                send_json({"outcome": outcome(result)}, OBSERVER)
            send_states(OBSERVER, mine, self.stores, self.optimizers)


class DistributedGossipEngine(RankEngine, GossipEngine):
    """Peer methods: every rank hosts nodes; rank 0 also observes (``run``), the others
    ``serve``."""

    rank0_hosts = True

    def __init__(self, experiment: experiments.Experiment, run_dir: Path, console: Console | None):
        super().__init__(experiment, run_dir, console)
        # (position in the round's edge list, transfer) for the messages this rank packed; rank
        # 0 records everyone's in edge order, the in-process engine's ledger order.
        self.sent: list[tuple[int, Transfer]] = []

    def local_nodes(self) -> list[int]:
        return self.placement.hosted(self.rank)

    def _exchange(
        self, messages: dict[int, TensorDict], graph: RoundGraph, round_index: int
    ) -> dict[int, dict[int, TensorDict]]:
        """received[i][j] for the hosted nodes i, as in one process; an edge between ranks is
        one point-to-point transfer of the bytes the channel packed."""
        owner, me = self.placement.owner, self.rank
        edges = [(i, j) for i in range(len(self.exp.clients)) for j in graph.neighbours(i)]
        sends, here = Sends(), {}
        for position, (i, j) in enumerate(edges):
            if owner(j) != me:
                continue
            payload = self.channel.pack(messages[j], node_name(j), round_index)
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
                    received[i][j] = self.channel.unpack(payload, self.shapes)
                except MessageError:  # refused: node i mixes its other neighbours
                    continue
        sends.wait()
        return received

    def _gather(
        self,
        messages: dict[int, TensorDict],
        results: dict[int, LocalResult],
        round_index: int,
    ) -> tuple[dict[int, TensorDict], dict[int, LocalResult]]:
        messages, results, sent = dict(messages), dict(results), self.sent
        for peer in self.placement.workers():
            nodes = self.placement.hosted(peer)
            report = recv_json(peer)
            results.update({int(n): from_outcome(row) for n, row in report["outcomes"].items()})
            sent += [(position, Transfer(**row)) for position, row in report["sent"]]
            messages.update({node: recv_tensors(peer) for node in nodes})
            recv_states(peer, nodes, self.stores, self.optimizers)
        for _, transfer in sorted(sent, key=lambda entry: entry[0]):
            self.channel.ledger.add(transfer)
        self.sent = []
        return messages, results

    def serve(self) -> None:
        start = self._receive_start()
        nodes = self.local_nodes()
        with Progress(disable=True) as progress:
            for round_index in range(start, self.exp.config.experiment.rounds):
                if self.budget_stop(round_index):  # rank 0 stops there too
                    break
                task = progress.add_task("", total=len(nodes))
                graph = self.topology.at(round_index)
                messages, results = self._train_and_mix(graph, round_index, progress, task)
                report = {
                    "outcomes": {node: outcome(results[node]) for node in nodes},
                    "sent": [(position, vars(t)) for position, t in self.sent],
                }
                send_json(report, OBSERVER)
                for node in nodes:
                    send_tensors(messages[node], OBSERVER)
                send_states(OBSERVER, nodes, self.stores, self.optimizers)
                self.sent = []


# by ``Method.engine``; the split engine's is added by ``distributed_engines``
DISTRIBUTED: dict[str, type[RankEngine]] = {
    "simulation": DistributedSimulationEngine,
    "gossip": DistributedGossipEngine,
}


def distributed_engines() -> dict[str, type[RankEngine]]:
    """Every distributed engine by ``Method.engine``. The split one (DLoRA) is imported here,
    not at the top: its module subclasses ``RankEngine`` from this one."""
    from fedlora.engines.distributed_split import DistributedSplitEngine

    return DISTRIBUTED | {"split": DistributedSplitEngine}


def placement_for(config: Config, world: int) -> Placement:
    """The placement a run of ``config`` on ``world`` ranks will use, known before building."""
    cls = method_class(config.method.name)
    clients = 1 if cls.pooled_data else config.partition.num_clients
    return Placement(clients, world, distributed_engines()[cls.engine].rank0_hosts)


RANK_THREADS = 1  # N ranks share the cores; more threads each only oversubscribe


def run_rank(
    config_file: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    console: Console,
    show_progress: bool,
    timeout: float,
) -> None:
    """This process's part of a launched run (by ``launch`` or by torchrun). A rank computes
    on its own GPU (``LOCAL_RANK``) when the config's device is CUDA, and the ranks then talk
    over nccl (``rank_backend``); on the CPU over gloo, one thread each unless
    ``compute.threads`` says."""
    config = load_config(config_file, overrides)
    compute = experiments.validate(config)
    connect(timedelta(seconds=timeout), rank_backend(compute))
    set_limit(config.federation.max_message_bytes)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == OBSERVER:
            engines = ENGINES if world == 1 else distributed_engines()
            run_experiment(
                config_file, overrides, out, resume, console, show_progress, engines, RANK_THREADS
            )
            return
        if rank in placement_for(config, world).idle():
            console.print(f"rank {rank}: hosts no client, idle", highlight=False)
            return
        configure_threads(config.compute, RANK_THREADS)
        configure_runtime(compute)
        experiment = experiments.build(config)
        engine = distributed_engines()[experiment.method.engine](
            experiment, out or Path("."), console
        )
        engine.serve()
    finally:
        dist.destroy_process_group()


def refuse(config: Config, nproc: int) -> None:
    """What cannot run, refused before any rank builds anything."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    engine = method_class(config.method.name).engine
    engines = distributed_engines()
    if engine not in engines:
        raise ConfigError(
            f"method {config.method.name!r} runs on the {engine!r} engine, which has no "
            "distributed version; use --engine simulation"
        )
    if config.privacy.secure_aggregation and nproc > 1:
        raise ConfigError(
            "privacy.secure_aggregation runs on the in-process engine only (the distributed "
            "engine does not carry the masking protocol between processes); use --engine "
            "simulation"
        )
    cls = engines[engine]
    if cls.world is not None and nproc != cls.world:
        raise ConfigError(
            f"method {config.method.name!r} runs on the {engine!r} engine, whose distributed "
            f"version needs exactly --nproc {cls.world} ({cls.roles}), not {nproc}; for one "
            "process use --engine simulation"
        )


def layout_notes(config: Config, nproc: int) -> list[str]:
    """What the launcher tells the user about the layout: one process, or idle ranks."""
    if nproc == 1:
        engine = method_class(config.method.name).engine
        return [f"one process: the in-process {engine} engine runs in it"]
    roles = distributed_engines()[method_class(config.method.name).engine].roles
    placement = placement_for(config, nproc)
    if not placement.idle():
        return [roles] if roles else []
    ranks = ", ".join(map(str, placement.idle()))
    return [
        f"{placement.clients} clients on {nproc} ranks: ranks {ranks} host no client and stay idle"
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def describe(rank: int, process: subprocess.Popen, code: int) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"rank {rank} (pid {process.pid}) {how}"


def watch(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Wait for all ranks; as soon as one fails, stop the others and raise naming it."""
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if failed:
                failed.sort(key=lambda entry: (entry[1] >= 0, entry[0]))  # signals first
                raise LaunchError(
                    "; ".join(describe(r, processes[r], c) for r, c in failed)
                    + ". Stopped the other ranks; --resume continues from the last completed round."
                )
            if all(c == 0 for c in codes):
                return
            time.sleep(0.2)
    finally:
        running = [p for p in processes if p.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def launch(
    config_file: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    nproc: int | None,
    timeout: float,
    console: Console,
    show_progress: bool = True,
) -> None:
    """``fedlora run --engine distributed``: join the launched group the environment describes
    (torchrun), or start ``nproc`` ranks of this same command on localhost and watch them."""
    if launched():
        world = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != world:
            raise ConfigError(f"--nproc {nproc}, but the launcher started WORLD_SIZE={world}")
        refuse(load_config(config_file, overrides), world)
        run_rank(config_file, overrides, out, resume, console, show_progress, timeout)
        return
    if nproc is None:
        raise ConfigError(
            "--engine distributed needs --nproc N, or a launcher (torchrun) that sets RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    config = load_config(config_file, overrides)
    experiments.validate(config)
    refuse(config, nproc)
    for note in layout_notes(config, nproc):
        console.print(note, highlight=False)
    out = out or Path("runs") / config.experiment.name
    rundir.prepare(out, config, resume)  # its errors now, not from rank 0 after the others start
    command = [sys.executable, "-m", "fedlora", "run", str(config_file), "--out", str(out)]
    command += [arg for override in overrides for arg in ("--set", override)]
    command += ["--engine", "distributed", "--timeout", str(timeout)]
    command += ["--resume"] if resume else []
    command += [] if show_progress else ["--quiet"]
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    shared |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            command, env={**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        )
        for rank in range(nproc)
    ]
    console.print(
        "ranks: " + ", ".join(f"{rank} pid {p.pid}" for rank, p in enumerate(processes)),
        highlight=False,
    )
    watch(processes)
