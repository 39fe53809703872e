"""The same rounds across processes (and machines) with torch.distributed: ``--engine distributed``.

``fedlora run CONFIG --engine distributed --nproc N`` starts N ranks of the same command on this
machine (a small torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each one's
environment) and watches them; under an external ``torchrun`` each process finds those variables
already set and joins directly. The launcher forks its ranks after importing the stack, so on
the CPU they start without importing it again (on a GPU each forked rank execs a fresh
interpreter: CUDA does not survive a fork). Every rank builds the experiment, so each process
holds one frozen base model and hosts its share of the clients' stores and optimizer states.

Server methods (``engine = "simulation"``): rank 0 is the server and the clients are dealt
round-robin to ranks 1..N-1. Per round rank 0 sends each sampled client's message to the rank
hosting it and receives the reply, as the channel's safetensors bytes over point-to-point sends;
rank 0 keeps the ledger, recording each transfer in the in-process engine's order, so byte counts
and ledger files are the same. Sampling is a pure function of (seed, round), so workers need no
instructions beyond the messages themselves.

Peer methods (``engine = "gossip"``, Dec-LoRA): nodes are dealt round-robin to all ranks; a node's
message to a neighbour on another rank goes through the channel and over point-to-point, and
mixing is the in-process gossip engine's own code.

Split methods (``engine = "split"``, DLoRA) run rank 0 as the cloud and ranks 1..N-1 as edges
hosting the users dealt to them; ``fedlora.engines.distributed_split`` says how.

What crosses after a round is the mode's, the round itself is the same code in both:

- **Deployment** (the default): a process receives only what the protocol sends, plus one
  report per worker and round of scalars (local losses and step counts, its own models' test
  metrics, that it has checkpointed). Each rank evaluates the models it holds (per-client
  models on their client's rank, the global model on rank 0), checkpoints its own clients in its
  own directory (``fedlora.engines.layout``) and exports their adapters; ``--resume`` restores
  every rank from its own files and refuses another placement.
- **Observer** (``--observer``): rank 0 is also an observer outside the protocol. After every
  round each worker sends it the hosted clients' stores and optimizer states (and, for gossip,
  the trained messages for the consensus metric); rank 0 evaluates, writes the run directory and
  checkpoints exactly like the in-process engine (bit for bit), and ``--resume`` sends every
  worker its clients' state back, on any number of processes. This mirror is process-internal
  state, not traffic between parties, so it is not in the ledger.

With one process the in-process engine runs in it. A rank that dies stops the run within a
bounded time: its peers' sends and receives fail at once on the closed connection (or after
``--timeout`` seconds for a hung peer), and the launcher stops the other ranks as soon as one
exits with an error, naming it.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import ClassVar

import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress

from fedlora import experiment as experiments
from fedlora import rundir
from fedlora.channel import Ledger, MessageError, Transfer
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import (
    Checkpoint,
    checkpoint_at,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from fedlora.compute import configure_threads, rank_backend
from fedlora.config import Config, ConfigError, load_config
from fedlora.engines.gossip import GossipEngine, node_name, per_node
from fedlora.engines.layout import (
    LAYOUT,
    Placement,
    check_deployment,
    rank_dir,
    refuse_deployment,
)
from fedlora.engines.served import ServedEngine, from_outcome, outcome
from fedlora.engines.simulation import (
    RunResult,
    SimulationEngine,
    summarize_clients,
)
from fedlora.engines.transport import (
    ProtocolError,
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
from fedlora.session import ENGINES, EngineFactory, configure_runtime, run_experiment
from fedlora.tensors import TensorDict
from fedlora.topology import RoundGraph
from fedlora.training import LocalResult

WRITER = 0  # the rank that writes the run directory: the server, the cloud, gossip's node 0


class LaunchError(RuntimeError):
    """A rank of a launched run failed; the others were stopped."""


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


class RankEngine(SimulationEngine):
    """What every distributed engine shares: the placement, the start of a run, and the two
    modes' ends of a round.

    Observer (``--observer``): rank 0 sends each worker the round to start from and its clients'
    state; after every round the workers send it their clients' state back, and rank 0
    evaluates and checkpoints everything, as the in-process engine does. Deployment (default):
    only the start round crosses; each worker keeps its clients' state, evaluates their own
    models, checkpoints them in ``<out>/rank<k>/`` and then reports the round to rank 0
    (``_report``): scalars only. Rank 0 takes every worker's report at the point where the
    observer would take the states (``_collect``), so it checkpoints a round only after every
    worker has (each worker keeps its previous checkpoint as well, for the round rank 0 may
    lag behind).
    """

    rank0_hosts: ClassVar[bool]
    min_world: ClassVar[int] = 1  # the fewest ranks it runs on
    roles: ClassVar[str] = ""  # what each rank does, for the launcher's notes and errors

    def __init__(
        self,
        experiment: experiments.Experiment,
        run_dir: Path,
        console: Console | None,
        observer: bool = False,
    ):
        self.rank = dist.get_rank()
        self.observer = observer
        self.out = run_dir
        world = dist.get_world_size()
        self.placement = Placement(self.parties(experiment.config), world, self.rank0_hosts)
        own = run_dir if observer else rank_dir(run_dir, self.rank)
        super().__init__(experiment, own, console)
        self.reports: dict[int, dict] = {}  # this round's report of each worker (deployment)

    @classmethod
    def parties(cls, config: Config) -> int:
        """How many clients the placement deals (known from the config, before building)."""
        return 1 if method_class(config.method.name).pooled_data else config.partition.num_clients

    # -- the start ---------------------------------------------------------------------------
    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        for peer in self.placement.workers():
            send_json({"start": start_round}, peer)
            if self.observer:
                send_states(peer, self.placement.hosted(peer), self.stores, self.optimizers)
        result = super().run(start_round, show_progress)
        if not self.observer:
            result.notes.extend(self.deployment_lines())
        return result

    def _receive_start(self) -> int:
        """A worker's start: the round, and its clients' state (observer) or its own files;
        on a fresh deployment, its report of round 0 (``initial_record``)."""
        start = int(recv_json(WRITER)["start"])
        if self.observer:
            recv_states(WRITER, self.placement.hosted(self.rank), self.stores, self.optimizers)
        else:
            self._load_own(start)
            if start == 0:
                send_json(self._hosted_metrics(), WRITER)
        return start

    def initial_record(self) -> dict:
        """Round 0 as in one process; in a deployment the workers' own models are in their
        round-0 reports, sent when the run starts."""
        if not self.observer:
            self._collect()
        return super().initial_record()

    def serve(self) -> None:
        """A worker's whole run: its clients' part of every round."""
        raise NotImplementedError

    # -- deployment: each rank's own checkpoint ----------------------------------------------
    def _check_layout(self, path: Path, extra: dict) -> None:
        if self.observer:
            refuse_deployment(path, extra)
        else:
            check_deployment(path, extra, self.placement, self.rank)

    def _own_state(self) -> tuple[dict[int, TensorDict], dict[int, TensorDict]]:
        """The stores and optimizer states this rank holds (what its checkpoint keeps)."""
        mine = self.placement.hosted(self.rank)
        optimizers = {c: self.optimizers[c] for c in mine if c in self.optimizers}
        return {c: self.stores[c] for c in mine}, optimizers

    def _save(self, completed: int) -> None:
        if self.observer:
            super()._save(completed)
            return
        writer = self.rank == WRITER
        stores, optimizers = self._own_state()
        checkpoint = Checkpoint(
            completed,
            self.exp.method.state_dict() if writer else {},
            stores,
            optimizers,
            self.metrics,
            self.channel.ledger.to_json(),
            {
                LAYOUT: self.placement.layout(self.rank),
                **(self._checkpoint_extra() if writer else {}),
            },
        )
        save_checkpoint(self.run_dir, checkpoint, keep_previous=not writer)

    def _load_own(self, start: int) -> None:
        """A worker's state after ``start`` rounds, from its own directory."""
        if start == 0:  # rank 0 began a fresh run: anything here is from one it never saved
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            return
        remove_partial(self.run_dir)
        checkpoint = checkpoint_at(self.run_dir, start)
        check_deployment(self.run_dir, checkpoint.extra, self.placement, self.rank)
        self.stores.update(checkpoint.stores)
        self.optimizers = checkpoint.optimizers
        self.channel.ledger = Ledger.from_json(checkpoint.ledger)

    # -- deployment: scalars to rank 0 --------------------------------------------------------
    def _report(self, round_index: int, report: dict) -> None:
        """A worker's end of a deployment round: its own models' metrics when the round is
        evaluated, its checkpoint, then the report (so a report means "saved")."""
        if self.evaluation_due(round_index):
            report |= self._hosted_metrics()
        self._save(round_index + 1)
        send_json(report, WRITER)

    def _hosted_metrics(self) -> dict:
        """A report's own-model metrics of the clients this worker hosts (methods with
        ``per_client_eval``; nothing for the others, whose global model rank 0 evaluates)."""
        if not self.exp.method.per_client_eval:
            return {}
        hosted = self.placement.hosted(self.rank)
        return {"metrics": {str(c): self.client_metrics(c) for c in hosted}}

    def _collect(self) -> None:
        """Rank 0's end of a deployment round: every worker's report, in rank order."""
        self.reports = {peer: recv_json(peer) for peer in self.placement.workers()}

    def _per_client_metrics(self) -> list[dict[str, float]]:
        """Every client's own-model metrics in client order (what ``summarize_clients`` is
        given in one process): rank 0's hosted clients evaluated here, the others as their
        workers reported them this round."""
        metrics = {c: self.client_metrics(c) for c in self.placement.hosted(WRITER)}
        for peer, report in self.reports.items():
            got = report.get("metrics", {})
            if sorted(map(int, got)) != self.placement.hosted(peer):
                raise ProtocolError(
                    f"rank {self.rank}: rank {peer} reported metrics of clients "
                    f"{sorted(map(int, got))}, it hosts {self.placement.hosted(peer)}"
                )
            metrics.update({int(c): values for c, values in got.items()})
        return [metrics[c] for c in range(self.placement.clients)]

    def _export(self) -> None:
        """A worker's end of a deployment run: its clients' own adapters, in the run directory
        (``adapters/client_<i>``) as one process would write them."""
        if not self.observer:
            rundir.export_client_adapters(self.exp, self._own_state()[0], self.out)

    def deployment_lines(self) -> list[str]:
        """summary.md: who held what, and where each rank's files are."""
        return [
            "",
            "## Processes (deployment)",
            "",
            f"{self.placement.describe()}. Each rank kept its own clients' state and "
            "checkpoints (rank 0 here, rank k in `rank<k>/`), evaluated their own models and "
            "exported their adapters; only protocol messages and per-round scalars reached "
            "rank 0.",
        ]


class DistributedSimulationEngine(ServedEngine, RankEngine):
    """Server methods: rank 0 runs ``run`` (the server), workers run ``serve``. The round is
    ``ServedEngine``'s; this class carries its bytes over point-to-point sends."""

    rank0_hosts = False

    def _dispatch(self, downloads: dict[int, bytes], round_index: int) -> None:
        # The merged base (FLoRA) is shared by all parties in one process; here workers get it.
        offset = self.exp.method.base_offset() or {}
        for peer in self.placement.workers():
            send_tensors(offset, peer)
        self.sends = Sends()
        for client, payload in downloads.items():
            self.sends.bytes(payload, self.placement.owner(client))

    def _reply(self, client: int, round_index: int) -> tuple[bytes, dict]:
        owner = self.placement.owner(client)
        return recv_bytes(owner), recv_json(owner)

    def _close_round(self, sampled: list[int], round_index: int) -> None:
        self.sends.wait()
        if not self.observer:
            self._collect()
            return
        for peer in self.placement.workers():
            clients = [c for c in sampled if self.placement.owner(c) == peer]
            recv_states(peer, clients, self.stores, self.optimizers)

    def evaluate(self) -> dict[str, float]:
        """The global model here; in a deployment, each client's own model on its worker."""
        if self.observer or not self.exp.method.per_client_eval:
            return super().evaluate()
        return summarize_clients(self._per_client_metrics())

    def serve(self) -> None:
        start = self._receive_start()
        for round_index in range(start, self.exp.config.experiment.rounds):
            if self.budget_stop(round_index):  # rank 0 stops there too
                break
            offset = recv_tensors(WRITER)
            if offset:
                self.exp.slots.merge_into_base(offset)
            mine = [c for c in self.sampled(round_index) if self.placement.owner(c) == self.rank]
            for client in mine:
                payload = recv_bytes(WRITER)
                if self.missing(client, round_index):
                    continue
                reply, report = self.answer(client, payload, round_index)
                send_bytes(reply, WRITER)
                send_json(report, WRITER)
            if self.observer:
                send_states(WRITER, mine, self.stores, self.optimizers)
            else:
                self._report(round_index, {})
        self._export()


class DistributedGossipEngine(RankEngine, GossipEngine):
    """Peer methods: every rank hosts nodes; rank 0 also writes the run directory (``run``),
    the others ``serve``. In a deployment no rank holds every node's state, so the network-
    averaged model and the consensus distances (functions of all nodes' factors, not of
    scalars each rank could share) are not computed; each node's own model is evaluated on
    its rank."""

    rank0_hosts = True

    def __init__(
        self,
        experiment: experiments.Experiment,
        run_dir: Path,
        console: Console | None,
        observer: bool = False,
    ):
        super().__init__(experiment, run_dir, console, observer)
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
        """Every node's local result and packed transfers for the round's record; the observer
        also takes every node's trained message and state."""
        messages, results, sent = dict(messages), dict(results), self.sent
        if not self.observer:
            self._collect()
        for peer in self.placement.workers():
            report = self.reports[peer] if not self.observer else recv_json(peer)
            results.update({int(n): from_outcome(row) for n, row in report["outcomes"].items()})
            sent += [(position, Transfer(**row)) for position, row in report["sent"]]
            if self.observer:
                nodes = self.placement.hosted(peer)
                messages.update({node: recv_tensors(peer) for node in nodes})
                recv_states(peer, nodes, self.stores, self.optimizers)
        for _, transfer in sorted(sent, key=lambda entry: entry[0]):
            self.channel.ledger.add(transfer)
        self.sent = []
        return messages, results

    def consensus(self, messages: dict[int, TensorDict]) -> dict[str, float]:
        return super().consensus(messages) if self.observer else {}

    def evaluate(self) -> dict[str, float]:
        if self.observer:
            return super().evaluate()
        return per_node(summarize_clients(self._per_client_metrics()))

    def evaluated_model(self) -> str:
        if self.observer:
            return super().evaluated_model()
        return "each node's own model, on its rank (no process holds every node to average)"

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
                self.sent = []
                if not self.observer:
                    self._report(round_index, report)
                    continue
                send_json(report, WRITER)
                for node in nodes:
                    send_tensors(messages[node], WRITER)
                send_states(WRITER, nodes, self.stores, self.optimizers)
        self._export()


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


def engine_class(config: Config) -> type[RankEngine]:
    return distributed_engines()[method_class(config.method.name).engine]


def placement_for(config: Config, world: int) -> Placement:
    """The placement a run of ``config`` on ``world`` ranks will use, known before building."""
    cls = engine_class(config)
    return Placement(cls.parties(config), world, cls.rank0_hosts)


RANK_THREADS = 1  # N ranks share the cores; more threads each only oversubscribe


def run_rank(
    config_file: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    console: Console,
    show_progress: bool,
    timeout: float,
    observer: bool = False,
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
        if rank == WRITER:
            engines: Mapping[str, EngineFactory] = ENGINES
            if world > 1:
                engines = {
                    name: partial(cls, observer=observer)
                    for name, cls in distributed_engines().items()
                }
            run_experiment(
                config_file,
                overrides,
                out,
                resume,
                console,
                show_progress,
                engines,
                RANK_THREADS,
                deployed=world > 1,
            )
            return
        if rank in placement_for(config, world).idle():
            console.print(f"rank {rank}: hosts no client, idle", highlight=False)
            return
        configure_threads(config.compute, RANK_THREADS)
        configure_runtime(compute)
        experiment = experiments.build(config, deployed=True)
        engine = distributed_engines()[experiment.method.engine](
            experiment, rundir.out_dir(out, config), console, observer
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
    if nproc < cls.min_world:
        raise ConfigError(
            f"method {config.method.name!r} runs on the {engine!r} engine, whose distributed "
            f"version needs at least --nproc {cls.min_world} ({cls.roles}), not {nproc}; for "
            "one process use --engine simulation"
        )


def check_resume(out: Path, config: Config, nproc: int, observer: bool) -> None:
    """A ``--resume`` whose processes do not match the checkpoints, refused before any rank
    starts (each rank checks its own files again when it resumes, as under torchrun)."""
    checkpoint = load_checkpoint(out)
    if checkpoint is None:
        return  # ``rundir.prepare`` has refused a resume without one
    path = out / CHECKPOINT
    if nproc == 1 or observer:
        refuse_deployment(path, checkpoint.extra)
        return
    placement = placement_for(config, nproc)
    check_deployment(path, checkpoint.extra, placement, WRITER)
    for rank in placement.workers():
        directory = rank_dir(out, rank)
        mine = checkpoint_at(directory, checkpoint.completed_rounds)
        check_deployment(directory, mine.extra, placement, rank)


def layout_notes(config: Config, nproc: int, observer: bool = False) -> list[str]:
    """What the launcher tells the user about the layout: one process, idle ranks, the mode."""
    if nproc == 1:
        engine = method_class(config.method.name).engine
        return [f"one process: the in-process {engine} engine runs in it"]
    placement = placement_for(config, nproc)
    notes = [engine_class(config).roles] if engine_class(config).roles else []
    if placement.idle():
        ranks = ", ".join(map(str, placement.idle()))
        notes = [
            f"{placement.clients} clients on {nproc} ranks: ranks {ranks} host no client and "
            "stay idle"
        ]
    if observer:
        notes.append(
            "--observer: after every round the workers send rank 0 their clients' state; rank "
            "0 evaluates, exports and checkpoints everything (a simulation, not a deployment)"
        )
    return notes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def describe(rank: int, process: BaseProcess, code: int) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"rank {rank} (pid {process.pid}) {how}"


def watch(processes: list[BaseProcess], grace: float = 10.0) -> None:
    """Wait for all ranks; as soon as one fails, stop the others and raise naming it."""
    try:
        while True:
            codes = [p.exitcode for p in processes]
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
        running = [p for p in processes if p.is_alive()]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def run_forked_rank(arguments: list[str], environment: dict[str, str], fresh: bool) -> None:
    """A rank the launcher forked: with its rank's variables in the environment it runs the same
    ``fedlora`` command (``launched()`` then joins the group); its exit code is the command's.
    On the CPU it runs in the forked process, whose imports are the launcher's, so it starts at
    once. ``fresh`` (a GPU): it becomes a new interpreter instead, because the launcher's device
    checks have initialised CUDA, which a forked child cannot use."""
    os.environ.update(environment)
    if fresh:
        os.execv(sys.executable, [sys.executable, "-m", "fedlora", *arguments])
    from fedlora.cli import app

    app(arguments, prog_name="fedlora")


def launch(
    config_file: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    nproc: int | None,
    timeout: float,
    console: Console,
    show_progress: bool = True,
    observer: bool = False,
) -> None:
    """``fedlora run --engine distributed``: join the launched group the environment describes
    (torchrun), or start ``nproc`` ranks of this same command on localhost and watch them."""
    if launched():
        world = int(os.environ["WORLD_SIZE"])
        if nproc is not None and nproc != world:
            raise ConfigError(f"--nproc {nproc}, but the launcher started WORLD_SIZE={world}")
        refuse(load_config(config_file, overrides), world)
        run_rank(config_file, overrides, out, resume, console, show_progress, timeout, observer)
        return
    if nproc is None:
        raise ConfigError(
            "--engine distributed needs --nproc N, or a launcher (torchrun) that sets RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    config = load_config(config_file, overrides)
    fresh = experiments.validate(config).device.type != "cpu"
    refuse(config, nproc)
    for note in layout_notes(config, nproc, observer):
        console.print(note, highlight=False)
    out = rundir.out_dir(out, config)
    rundir.prepare(out, config, resume)  # its errors now, not from rank 0 after the others start
    if resume:
        check_resume(out, config, nproc, observer)
    arguments = ["run", str(config_file), "--out", str(out)]
    arguments += [arg for override in overrides for arg in ("--set", override)]
    arguments += ["--engine", "distributed", "--timeout", str(timeout)]
    arguments += ["--resume"] if resume else []
    arguments += ["--observer"] if observer else []
    arguments += [] if show_progress else ["--quiet"]
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    shared |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1"}
    # Forked: on the CPU the ranks inherit this process's imports (5-6 s of the stack each on a
    # 2-core CPU, docs/benchmarks.md) and build their experiments themselves.
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(
            target=run_forked_rank,
            args=(arguments, {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}, fresh),
        )
        for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    console.print(
        "ranks: " + ", ".join(f"{rank} pid {p.pid}" for rank, p in enumerate(processes)),
        highlight=False,
    )
    watch(processes)
