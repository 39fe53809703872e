"""Starting a run's ranks: ``fedlora run CONFIG --engine distributed --nproc N``.

It starts N ranks of the same command on this machine (a small torchrun: RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in each one's environment) and watches them; under an external
``torchrun`` each process finds those variables already set and joins directly. The launcher
forks its ranks after importing the stack, so on the CPU they start without importing it again
(on a GPU each forked rank execs a fresh interpreter: CUDA does not survive a fork). Every rank
builds the experiment, the round and the run loop (``rank_run``); rank 0 runs the loop, the
others serve their clients' half (``fedlora.engines.distributed``).

With one process the in-process placement runs in it. A rank that dies stops the run within a
bounded time: its peers' sends and receives fail at once on the closed connection (or after
``--timeout`` seconds for a hung peer), and the launcher stops the other ranks as soon as one
exits with an error, naming it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from fedlora import experiment as experiments
from fedlora import rundir
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import checkpoint_at, load_checkpoint
from fedlora.compute import configure_threads, rank_backend
from fedlora.config import Config, ConfigError, load_config
from fedlora.engines.capabilities import placement_refusal
from fedlora.engines.client import ClientRuntime
from fedlora.engines.distributed import (
    WRITER,
    RankHosts,
    RankKeeper,
    RankParty,
    RankPeers,
    own_clients,
    serve_clients,
    serve_peers,
)
from fedlora.engines.distributed_split import ROLES, RankLinks, split_users
from fedlora.engines.gossip import GossipRound
from fedlora.engines.layout import Placement, check_deployment, rank_dir, refuse_deployment
from fedlora.engines.loop import RunLoop
from fedlora.engines.server_round import ServerRound
from fedlora.engines.split import SplitRound
from fedlora.engines.transport import connect, launched, set_limit
from fedlora.methods import method_class
from fedlora.session import configure_runtime, run_experiment


class LaunchError(RuntimeError):
    """A rank of a launched run failed; the others were stopped."""


def placement_for(config: Config, world: int) -> Placement:
    """Which rank hosts which client, known from the config before building: users of the
    split on the edges (ranks 1..N-1), a server's clients on ranks 1..N-1, gossip nodes on
    all ranks."""
    cls = method_class(config.method.name)
    if cls.engine == "split":
        return Placement(split_users(config), world, rank0_hosts=False)
    clients = 1 if cls.pooled_data else config.partition.num_clients
    return Placement(clients, world, rank0_hosts=cls.engine == "gossip")


@dataclass
class RankRun:
    """This rank's part of a launched run: the loop (rank 0 runs it) and a worker's serve."""

    loop: RunLoop
    serve: Callable[[], None]


def rank_run(
    experiment: experiments.Experiment, run_dir: Path, console: Console, observer: bool
) -> RankRun:
    """The round and loop every rank builds, with the ranks as the placement."""
    placement = placement_for(experiment.config, dist.get_world_size())
    keep_going = experiment.config.federation.lost_ranks == "continue"
    party = RankParty(placement.clients, placement.rank0_hosts, observer, run_dir, keep_going)
    runtime = ClientRuntime(experiment)
    engine = experiment.method.engine
    if engine == "simulation":
        round_: ServerRound | GossipRound | SplitRound = ServerRound(
            experiment, runtime, RankHosts(party, runtime)
        )
        keeper = RankKeeper(party, own_clients(party, runtime))
        loop = RunLoop(round_, run_dir, console, keeper)
        return RankRun(loop, partial(serve_clients, loop, party))
    if engine == "gossip":
        peers = RankPeers(party, runtime)
        round_ = GossipRound(experiment, runtime, peers)
        keeper = RankKeeper(party, own_clients(party, runtime))
        loop = RunLoop(round_, run_dir, console, keeper)
        return RankRun(loop, partial(serve_peers, loop, party, peers))
    links = RankLinks(party, experiment.compute.device)
    split = SplitRound(experiment, runtime, party.directory(), links)
    loop = RunLoop(split, run_dir, console, RankKeeper(party, partial(links.own_state, split)))
    return RankRun(loop, partial(links.serve_edge, split, loop))


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
            build = None
            if world > 1:

                def build(exp: experiments.Experiment, run_dir: Path, shown: Console) -> RunLoop:
                    return rank_run(exp, run_dir, shown, observer).loop

            run_experiment(
                config_file,
                overrides,
                out,
                resume,
                console,
                show_progress,
                build,
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
        rank_run(experiment, rundir.out_dir(out, config), console, observer).serve()
    finally:
        dist.destroy_process_group()


def refuse(config: Config, nproc: int, observer: bool = False) -> None:
    """What cannot run, refused before any rank builds anything."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if method_class(config.method.name).engine == "split" and nproc < 2:
        raise ConfigError(
            f"method {config.method.name!r} runs on the 'split' engine, whose distributed "
            f"version needs at least --nproc 2 ({ROLES}), not {nproc}; for one process use "
            "--engine simulation"
        )
    refusal = placement_refusal(config, "distributed") if nproc > 1 else None
    if refusal is not None:
        raise ConfigError(refusal)
    method = method_class(config.method.name)
    if config.federation.lost_ranks == "continue" and (
        method.engine != "simulation" or method.per_client_eval or observer
    ):
        raise ConfigError(
            "federation.lost_ranks = 'continue' goes on without a lost rank's clients: it needs "
            "server rounds whose model lives on the server (not gossip, the split, methods that "
            "evaluate each client's own model) in deployment mode (not --observer)"
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
    engine = method_class(config.method.name).engine
    if nproc == 1:
        return [f"one process: the in-process {engine} engine runs in it"]
    placement = placement_for(config, nproc)
    notes = [ROLES] if engine == "split" else []
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


def watch(processes: list[BaseProcess], grace: float = 10.0, keep_going: bool = False) -> list[str]:
    """Wait for all ranks; as soon as one fails, stop the others and raise naming it. With
    ``keep_going`` (``federation.lost_ranks = "continue"``) a worker rank that fails is let go
    (rank 0 goes on without it); returns what happened to each such rank."""
    try:
        while True:
            codes = [p.exitcode for p in processes]
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if keep_going and codes[0] in (None, 0):
                if all(c is not None for c in codes):
                    return [describe(r, processes[r], c) for r, c in failed]
                time.sleep(0.2)
                continue
            if failed:
                failed.sort(key=lambda entry: (entry[1] >= 0, entry[0]))  # signals first
                raise LaunchError(
                    "; ".join(describe(r, processes[r], c) for r, c in failed)
                    + ". Stopped the other ranks; --resume continues from the last completed round."
                )
            if all(c == 0 for c in codes):
                return []
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
        refuse(load_config(config_file, overrides), world, observer)
        run_rank(config_file, overrides, out, resume, console, show_progress, timeout, observer)
        return
    if nproc is None:
        raise ConfigError(
            "--engine distributed needs --nproc N, or a launcher (torchrun) that sets RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    config = load_config(config_file, overrides)
    fresh = experiments.validate(config).device.type != "cpu"
    refuse(config, nproc, observer)
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
    lost = watch(processes, keep_going=config.federation.lost_ranks == "continue")
    for line in lost:
        console.print(f"lost: {line}; the run went on without it", highlight=False)
