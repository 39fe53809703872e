"""Clients in parallel over the cores of one machine: forked worker processes as a placement
(``[compute] workers``).

The in-process placement trains a round's clients one after another; on a CPU with a few cores
a small model's step (batch 8-16, a few dozen tokens) does not keep them all busy. Here the
server forks ``workers`` processes once, after the experiment is built, so they share the frozen
base (and the tokenized data) copy-on-write; each trains whole clients with ``threads``
intra-op threads through its copy of the client runtime (``fedlora.engines.client``).

A task is a client and a round, what the client starts from (a server's download as the
channel's bytes, or nothing for a gossip node, which starts from its own model), its store and
optimizer state, and the merged base offset (FLoRA). The answer is the runtime's (the reply's
bytes and a report; a node's trained message) and the state after training. A client's state
lives with the server, as in one process: it travels with the task and comes back with the
answer, as safetensors bytes (process-internal state, never in the ledger). Nothing is
pickled: the pipes carry bytes only.

Results are bit-identical to the in-process placement run with ``compute.threads`` equal to the
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

import torch

from fedlora.engines.client import (
    ClientRuntime,
    outcome,
    state_bytes,
    state_from_bytes,
)
from fedlora.engines.server_round import Hosts
from fedlora.tensors import TensorDict

ANSWER, PEER = "answer", "peer"  # a server's client answering a download; a gossip node


class PoolError(RuntimeError):
    """A worker process failed or died while training a client (a bug, not a client's fault)."""


# -- the worker's side -------------------------------------------------------------------------
def serve(runtime: ClientRuntime, connection: Connection, threads: int) -> None:
    """A worker's loop: a task is a header (kind, client, round), the download's bytes, the
    client's store and optimizer state, and the base offset; the answer is the report, the
    reply's bytes, and the store and optimizer state after training. An empty header ends it."""
    torch.set_num_threads(threads)
    while header := connection.recv_bytes():
        task = json.loads(header)
        client, round_index = task["client"], task["round"]
        payload, store, optimizer, offset = (connection.recv_bytes() for _ in range(4))
        try:
            runtime.apply_offset(state_from_bytes(offset))
            runtime.load_state_bytes(client, store, optimizer)
            if task["kind"] == ANSWER:
                reply, report = runtime.answer(client, payload, round_index)
            else:  # a gossip node's local steps from its own model; its message comes back
                message, result = runtime.train(client, {}, round_index)
                # its key order too: a quantizing codec draws for the tensors in that order
                report = {"outcome": outcome(result), "keys": list(message)}
                reply = state_bytes(message)
            kept = runtime.state_bytes(client)
            runtime.stores.pop(client)
            runtime.optimizers.pop(client, None)
        except Exception:
            connection.send_bytes(json.dumps({"error": traceback.format_exc()}).encode())
            continue
        connection.send_bytes(json.dumps(report).encode())
        for part in (reply, *kept):
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


class Pool:
    """Forked workers that run clients of this process's runtime; answers in any order."""

    def __init__(self, runtime: ClientRuntime, workers: int, threads: int) -> None:
        self.runtime = runtime
        self.size, self.threads = workers, threads
        self.workers: list[Worker] = []
        self.queue = RoundQueue()
        self.kind, self.round, self.offset = ANSWER, 0, b""

    # -- start and stop --------------------------------------------------------------------
    def open(self, start_round: int) -> None:
        context = multiprocessing.get_context("fork")  # the base model shared copy-on-write
        for _ in range(self.size):
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(self.runtime, theirs, self.threads))
            process.daemon = True
            process.start()
            theirs.close()
            self.workers.append(Worker(process, ours))

    def close(self) -> list[str]:
        for worker in self.workers:
            with contextlib.suppress(OSError):  # it died already
                worker.connection.send_bytes(b"")
        for worker in self.workers:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self.workers = []
        return [
            "",
            "## Worker processes",
            "",
            f"Clients trained by {self.size} forked worker processes, {self.threads} torch "
            "thread(s) each (`compute.workers`); downloads and replies crossed as the channel's "
            "bytes, counted in the ledger as in one process.",
        ]

    # -- a round's tasks -------------------------------------------------------------------
    def submit(self, tasks: dict[int, bytes], offset: TensorDict, round_index: int, kind: str):
        """Start this round's ``tasks`` (client -> what it starts from) on the workers."""
        self.queue = RoundQueue(list(tasks.items()))
        self.kind, self.round, self.offset = kind, round_index, state_bytes(offset)
        for worker in self.workers:
            self._submit(worker)

    def _submit(self, worker: Worker) -> None:
        """Give ``worker`` the next client, unless none is left or enough answers wait."""
        if not self.queue.pending or len(self.queue.done) >= 2 * self.size:
            return
        client, payload = self.queue.pending.pop(0)
        header = json.dumps({"kind": self.kind, "client": client, "round": self.round}).encode()
        try:
            for part in (header, payload, *self.runtime.state_bytes(client), self.offset):
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
        self.runtime.load_state_bytes(client, store, optimizer)
        self.queue.done[client] = reply, report
        worker.client = None

    def result(self, client: int) -> tuple[bytes, dict]:
        """Client ``client``'s answer, waiting for it (and keeping the workers busy)."""
        while client not in self.queue.done:
            busy = {w.connection: w for w in self.workers if w.client is not None}
            if not busy:
                raise PoolError(f"client {client} was never given to a worker")
            for ready in wait(list(busy)):
                worker = busy[ready]  # type: ignore[index]
                self._collect(worker)
            for worker in self.workers:
                if worker.client is None:
                    self._submit(worker)
        answer = self.queue.done.pop(client)
        for worker in self.workers:
            if worker.client is None:
                self._submit(worker)
        return answer


class PoolHosts(Hosts):
    """A server's clients on the pool; every answer brings its client's state back here."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def open(self, start_round: int) -> None:
        self.pool.open(start_round)

    def close(self) -> list[str]:
        return self.pool.close()

    def dispatch(self, downloads: dict[int, bytes], offset: TensorDict, round_index: int) -> None:
        self.pool.submit(downloads, offset, round_index, ANSWER)

    def answer(self, client: int, round_index: int) -> tuple[bytes, dict]:
        return self.pool.result(client)
