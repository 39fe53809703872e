"""Clients in parallel over the cores of one machine: ``ServedEngine``'s round, with forked
worker processes as the placement (``[compute] workers``).

The in-process engine trains a round's clients one after another; on a CPU with a few cores a
small model's step (batch 8-16, a few dozen tokens) does not keep them all busy. Here the
server forks ``workers`` processes once, after the experiment is built, so they share the frozen
base (and the tokenized data) copy-on-write; each trains whole clients with ``threads``
intra-op threads. The round is the served round, written once (``fedlora.engines.served``): the
server packs every download with the channel, a worker unpacks it, runs the client's half
(``ServedEngine.answer``) and returns the reply's bytes, which the server validates and counts
in the ledger in client order, as in one process. What a client keeps between rounds (its
store, its optimizer state) lives with the server, as in the in-process engine: it travels with
the task and comes back with the reply, as safetensors bytes (process-internal state, never in
the ledger). Nothing is pickled: the pipes carry bytes only.

Results are bit-identical to the in-process engine run with ``compute.threads`` equal to the
workers' thread count (the same steps from the same seeded generators, the same bytes, the same
order of aggregation); with another thread count the last bits of a float sum may differ, as
between any two thread counts. Evaluation stays in the server process, on all its threads.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load as load_bytes

from fedlora.channel import encode
from fedlora.compute import pool_size
from fedlora.engines.served import ServedEngine
from fedlora.engines.simulation import RunResult, SimulationEngine
from fedlora.experiment import Experiment
from fedlora.tensors import TensorDict


class PoolError(RuntimeError):
    """A worker process failed or died while training a client (a bug, not a client's fault)."""


# -- the worker's side -------------------------------------------------------------------------
def _tensors(payload: bytes) -> TensorDict:
    return load_bytes(payload) if payload else {}


def _bytes(tensors: TensorDict) -> bytes:
    return encode(tensors) if tensors else b""


def serve(engine: ServedEngine, connection: Connection, threads: int) -> None:
    """A worker's loop: a task is a header (client, round), the download's bytes, the client's
    store and optimizer state, and the merged base offset (FLoRA); the answer is the report,
    the reply's bytes, and the store and optimizer state after training. An empty header ends
    it."""
    torch.set_num_threads(threads)
    while header := connection.recv_bytes():
        task = json.loads(header)
        client, round_index = task["client"], task["round"]
        payload, store, optimizer, offset = (connection.recv_bytes() for _ in range(4))
        try:
            if offset:
                engine.exp.slots.merge_into_base(_tensors(offset))
            engine.stores[client] = _tensors(store)
            if optimizer:  # none before its first round, as in one process
                engine.optimizers[client] = _tensors(optimizer)
            reply, report = engine.answer(client, payload, round_index)
            kept = engine.stores.pop(client), engine.optimizers.pop(client, {})
        except Exception:
            connection.send_bytes(json.dumps({"error": traceback.format_exc()}).encode())
            continue
        connection.send_bytes(json.dumps(report).encode())
        for part in (reply, _bytes(kept[0]), _bytes(kept[1])):
            connection.send_bytes(part)


# -- the server's side -------------------------------------------------------------------------
@dataclass
class Worker:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    client: int | None = None  # the client it is training, if any


@dataclass
class RoundQueue:
    """This round's clients still to train, in order, and the answers not yet consumed."""

    pending: list[tuple[int, bytes]] = field(default_factory=list)
    done: dict[int, tuple[bytes, dict]] = field(default_factory=dict)


class PooledEngine(ServedEngine):
    """Server methods with each round's clients trained by forked worker processes."""

    def __init__(
        self,
        experiment: Experiment,
        run_dir: Path,
        console: Console | None = None,
        workers: int = 2,
        threads: int = 1,
    ):
        super().__init__(experiment, run_dir, console)
        self.size, self.threads = workers, threads
        self.pool: list[Worker] = []
        self.queue = RoundQueue()
        self.offset = b""  # this round's merged base offset (FLoRA), as the workers get it
        self.round = 0

    # -- the pool ------------------------------------------------------------------------------
    def _start(self) -> None:
        context = multiprocessing.get_context("fork")  # the base model shared copy-on-write
        for _ in range(self.size):
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(self, theirs, self.threads))
            process.daemon = True
            process.start()
            theirs.close()
            self.pool.append(Worker(process, ours))

    def _stop(self) -> None:
        for worker in self.pool:
            with contextlib.suppress(OSError):  # it died already
                worker.connection.send_bytes(b"")
        for worker in self.pool:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self.pool = []

    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        self._start()
        try:
            result = super().run(start_round, show_progress)
        finally:
            self._stop()
        result.notes += [
            "",
            "## Worker processes",
            "",
            f"Clients trained by {self.size} forked worker processes, {self.threads} torch "
            "thread(s) each (`compute.workers`); downloads and replies crossed as the channel's "
            "bytes, counted in the ledger as in one process.",
        ]
        return result

    # -- the transport ---------------------------------------------------------------------------
    def _dispatch(self, downloads: dict[int, bytes], round_index: int) -> None:
        self.queue = RoundQueue(
            [(c, p) for c, p in downloads.items() if self.missing(c, round_index) is None]
        )
        self.offset = _bytes(self.exp.method.base_offset() or {})
        self.round = round_index
        for worker in self.pool:
            self._submit(worker)

    def _submit(self, worker: Worker) -> None:
        """Give ``worker`` the next client, unless none is left or enough answers wait."""
        if not self.queue.pending or len(self.queue.done) >= 2 * self.size:
            return
        client, payload = self.queue.pending.pop(0)
        header = json.dumps({"client": client, "round": self.round}).encode()
        store, optimizer = self.stores[client], self.optimizers.get(client, {})
        try:
            for part in (header, payload, _bytes(store), _bytes(optimizer), self.offset):
                worker.connection.send_bytes(part)
        except OSError:
            raise PoolError(self._died(worker, f"before it got client {client}")) from None
        worker.client = client

    @staticmethod
    def _died(worker: Worker, when: str) -> str:
        worker.process.join(1)
        return (
            f"worker process {worker.process.pid} exited {when} (exit code "
            f"{worker.process.exitcode}); the checkpoint of the last completed round is kept: "
            "rerun with --resume"
        )

    def _collect(self, worker: Worker) -> None:
        """``worker``'s answer into the round's answers, its client's state back here."""
        client = worker.client
        assert client is not None
        try:
            report = json.loads(worker.connection.recv_bytes())
            if "error" in report:
                raise PoolError(f"a worker failed on client {client}:\n{report['error']}")
            reply, store, optimizer = (worker.connection.recv_bytes() for _ in range(3))
        except (EOFError, OSError):
            raise PoolError(self._died(worker, f"while training client {client}")) from None
        self.stores[client] = _tensors(store)
        if optimizer:
            self.optimizers[client] = _tensors(optimizer)
        self.queue.done[client] = reply, report
        worker.client = None

    def _reply(self, client: int, round_index: int) -> tuple[bytes, dict]:
        while client not in self.queue.done:
            busy = {w.connection: w for w in self.pool if w.client is not None}
            if not busy:
                raise PoolError(f"client {client} was never given to a worker")
            for ready in wait(list(busy)):
                worker = busy[ready]  # type: ignore[index]
                self._collect(worker)
            for worker in self.pool:
                if worker.client is None:
                    self._submit(worker)
        answer = self.queue.done.pop(client)
        for worker in self.pool:
            if worker.client is None:
                self._submit(worker)
        return answer


def in_process(
    experiment: Experiment, run_dir: Path, console: Console | None = None
) -> SimulationEngine:
    """The engine of server methods in one process: the in-process engine, or the pooled one
    when ``compute.workers`` asks for more than one worker."""
    workers, threads = pool_size(experiment.config, experiment.compute.device)
    if workers == 1:
        return SimulationEngine(experiment, run_dir, console)
    return PooledEngine(experiment, run_dir, console, workers, threads)
