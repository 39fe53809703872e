"""A decentralized round, written once for every placement: every node trains, sends to its
graph neighbours through the channel, and mixes (methods with ``engine = "gossip"``, e.g.
Dec-LoRA).

A round is exchange, weighted sum, record:

1. each node runs its local steps from its own model (``PeerMethod.client_start``, through the
   client runtime, wherever the node's steps run);
2. each node's message goes through the channel once per neighbour (real bytes in the ledger,
   quantized by the ``topology.quantize_bits`` codec if set); a node's own term stays exact;
3. each node mixes with that round's mixing row ``w_i·``;
4. the observer evaluates the network-averaged model and records the consensus distance.

With ``topology.error_feedback`` the exchange is CHOCO-gossip (Koloskova et al. 2019; ours here):
each node keeps public estimates x̂_j of itself and its neighbours, sends only the quantized
difference q_j = Q(x_j − x̂_j), everyone holding x̂_j adds q_j, and a node moves by
x_i ← x_i + γ (Σ_j w_ij x̂_j − x̂_i). Quantization error is then not lost but carried over.

The placement (``Peers``) says which nodes this process drives, where their local steps run
(here, or on a pool of worker processes: the same numbers) and how a message crosses an edge
(the channel here, point-to-point between torch.distributed ranks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.progress import Progress, TaskID

from fedlora.channel import Channel, MessageError
from fedlora.codecs import make_codec
from fedlora.engines.client import ClientRuntime, from_outcome, state_from_bytes
from fedlora.engines.loop import summarize_clients, without_withheld
from fedlora.engines.pool import PEER, Pool
from fedlora.experiment import Experiment
from fedlora.methods.base import store_under, stored
from fedlora.methods.peer import PeerMethod
from fedlora.tensors import TensorDict
from fedlora.topology import RoundGraph, Topology, draw
from fedlora.training import LocalResult, derived_seed, steps_per_round

GRAPH_FILE = "graph.png"


def node_name(node: int) -> str:
    return f"node{node}"


def hat_prefix(node: int) -> str:
    """Store prefix of a node's copy of node ``node``'s public CHOCO estimate."""
    return f"hat.{node}."


def per_node(summary: dict[str, float]) -> dict[str, float]:
    """The nodes' own-model metrics, named apart from the network model's."""
    return {f"node_{k}": v for k, v in summary.items()}


def consensus_distance(states: list[TensorDict], names: list[str]) -> float:
    """(1/N) Σ_i Σ_names ||X_i − X̄||²  (names: the LoRA factors A and B, §1.5)."""
    total = 0.0
    for name in names:
        stack = torch.stack([s[name].to(torch.float64) for s in states])
        total += float(((stack - stack.mean(dim=0)) ** 2).sum())
    return total / len(states)


class Peers(Protocol):
    """Where gossip nodes run and how their messages cross the graph's edges. A placement
    that subclasses it keeps the defaults of what it does not need (every node here: nothing
    to start, gather or report)."""

    holds_every_node: bool  # this process holds every node's state (network model, consensus)

    def open(self, start_round: int) -> None:
        """Before the first round."""

    def close(self) -> list[str]:
        """After the last round or a failure; the summary's notes about the placement."""
        return []

    def initial(self) -> None:
        """Before round 0's record."""

    def local_nodes(self) -> list[int]:
        """The nodes this process drives."""
        ...

    def train(
        self, round_: GossipRound, round_index: int
    ) -> Iterator[tuple[int, TensorDict, LocalResult]]:
        """Each local node's trained message and local result, in node order."""
        ...

    def exchange(
        self,
        round_: GossipRound,
        messages: dict[int, TensorDict],
        graph: RoundGraph,
        round_index: int,
    ) -> dict[int, dict[int, TensorDict]]:
        """received[i][j]: node j's message as local node i decoded it, for each edge (j → i);
        a message node i refuses is left out (the ledger records why) and i mixes the rest."""
        ...

    def gather(
        self,
        round_: GossipRound,
        messages: dict[int, TensorDict],
        results: dict[int, LocalResult],
        round_index: int,
    ) -> tuple[dict[int, TensorDict], dict[int, LocalResult]]:
        """Every node's trained message (where it can be had) and local result, for the record."""
        return messages, results

    def node_metrics(self) -> list[dict[str, float]] | None:
        """Every node's own-model metrics where other processes evaluate them, else None."""
        return None


class GossipRound:
    def __init__(self, experiment: Experiment, runtime: ClientRuntime, peers: Peers) -> None:
        if not isinstance(experiment.method, PeerMethod):
            raise TypeError(
                f"gossip rounds run peer methods, not {type(experiment.method).__name__}"
            )
        self.exp = experiment
        self.runtime = runtime
        self.peers = peers
        self.method: PeerMethod = experiment.method
        config = experiment.config
        self.topology = Topology(config.topology, len(experiment.clients), config.experiment.seed)
        self.codec = make_codec(
            config.topology.quantize_bits,
            derived_seed(config.experiment.seed, 0xC0DE),
            contractive=config.topology.error_feedback,
        )
        self.channel = Channel(codec=self.codec)
        self.shapes = self.method.message_schema(experiment.slots.shapes())
        # The factors the nodes exchange (a frozen factor is the same on every node: no spread).
        modules = experiment.slots.modules
        self.factors = [name for m in modules for name in (m.a, m.b) if name in self.shapes]
        self.timing: dict[str, float] = {}  # this round's local-training and gossip seconds

    @property
    def stores(self) -> dict[int, TensorDict]:
        return self.runtime.stores

    def states(self) -> list[TensorDict]:
        return [
            self.method.client_start(node, {}, self.stores[node])
            for node in range(len(self.exp.clients))
        ]

    # -- the run around the rounds ------------------------------------------------------------
    def open(self, start_round: int, run_dir: Path) -> None:
        config = self.exp.config
        self.peers.open(start_round)
        draw(
            self.topology.at(0),
            run_dir / GRAPH_FILE,
            f"{config.topology.kind}, {len(self.exp.clients)} nodes",
        )

    def close(self) -> list[str]:
        return self.peers.close()

    def initial(self) -> None:
        self.peers.initial()

    def restored(self, start_round: int) -> None:
        """Nothing beyond the checkpoint."""

    def write_round_files(self, run_dir: Path) -> None:
        """None beyond the loop's."""

    def finish(self, run_dir: Path, metrics: list[dict]) -> list[str]:
        return self.summary_lines(metrics)

    def scheduled(self, round_index: int) -> dict[int, int]:
        """Every node trains every round, its round's steps."""
        train = self.exp.config.train
        return {
            node: steps_per_round(train, len(rows)) for node, rows in enumerate(self.exp.clients)
        }

    # -- evaluation: the network-averaged model, and optionally each node's own ---------------
    def evaluate(self) -> dict[str, float]:
        reported = self.peers.node_metrics()
        if reported is not None:
            return per_node(summarize_clients(reported))
        metrics = self.exp.evaluator.evaluate(self.method.network_model(self.states()))
        if self.exp.config.topology.per_node_eval:
            nodes = range(len(self.exp.clients))
            metrics.update(per_node(summarize_clients([self.runtime.metrics(n) for n in nodes])))
        return metrics

    def evaluated_model(self) -> str:
        if not self.peers.holds_every_node:
            return "each node's own model, on its rank (no process holds every node to average)"
        return f"network average of {self.exp.config.topology.average_model}"

    def consensus(self, messages: dict[int, TensorDict]) -> dict[str, float]:
        """How far the nodes are apart before and after mixing (every node's factors)."""
        if not self.peers.holds_every_node:
            return {}
        nodes = range(len(self.exp.clients))
        return {
            "consensus_before_mix": consensus_distance([messages[n] for n in nodes], self.factors),
            "consensus_distance": consensus_distance(self.states(), self.factors),
        }

    # -- exchange -----------------------------------------------------------------------------
    def _exchange(
        self, messages: dict[int, TensorDict], graph: RoundGraph, round_index: int
    ) -> dict[int, dict[int, TensorDict]]:
        return self.peers.exchange(self, messages, graph, round_index)

    def _gossip(
        self, messages: dict[int, TensorDict], graph: RoundGraph, round_index: int
    ) -> dict[int, TensorDict]:
        """Plain gossip: x_i ← w_ii x_i + Σ_j w_ij x̃_j, x̃_j as received (quantized or exact)."""
        received = self._exchange(messages, graph, round_index)
        return {
            i: self.method.mix(i, {i: messages[i], **received[i]}, self._row(graph, i))
            for i in messages
        }

    def _choco(
        self, messages: dict[int, TensorDict], graph: RoundGraph, round_index: int
    ) -> dict[int, TensorDict]:
        """CHOCO-gossip (see the module docstring); estimates live in each node's store."""
        gamma = self.exp.config.topology.consensus_step
        initial = self.method.context.initial
        hats = {i: stored(self.stores[i], hat_prefix(i)) or dict(initial) for i in messages}
        deltas = {i: {k: messages[i][k] - hats[i][k] for k in messages[i]} for i in messages}
        received = self._exchange(deltas, graph, round_index)
        mixed = {}
        for i in messages:
            own_q = (
                deltas[i]
                if self.codec is None
                else self.codec.decode(self.codec.encode(deltas[i], round_index, node_name(i)))
            )
            estimates = {i: own_q, **received[i]}
            for j, q in estimates.items():
                hat = stored(self.stores[i], hat_prefix(j)) or dict(initial)
                estimates[j] = {k: hat[k] + q[k] for k in q}
                store_under(self.stores[i], hat_prefix(j), estimates[j])
            target = self.method.mix(i, estimates, self._row(graph, i))
            mixed[i] = {
                k: messages[i][k] + gamma * (target[k] - estimates[i][k]) for k in messages[i]
            }
        return mixed

    @staticmethod
    def _row(graph: RoundGraph, node: int) -> dict[int, float]:
        return {j: float(graph.weights[node, j]) for j in [node, *graph.neighbours(node)]}

    # -- one round ----------------------------------------------------------------------------
    def step(
        self, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[dict[int, TensorDict], dict[int, LocalResult]]:
        """The local nodes' part of a round: local steps, exchange, mix, keep. Returns their
        trained messages (before mixing) and local results."""
        graph = self.topology.at(round_index)
        messages: dict[int, TensorDict] = {}
        results: dict[int, LocalResult] = {}
        self.timing = {"local_seconds": 0.0, "mix_seconds": 0.0}
        began = time.perf_counter()
        for node, message, result in self.peers.train(self, round_index):
            messages[node], results[node] = message, result
            losses = [r.loss for r in results.values()]
            progress.update(task, advance=1, status=f"loss {np.mean(losses):.4f}")
        self.timing["local_seconds"] = time.perf_counter() - began
        exchange = self._choco if self.exp.config.topology.error_feedback else self._gossip
        began = time.perf_counter()
        for node, state in exchange(messages, graph, round_index).items():
            self.method.keep(self.stores[node], state)
        # Serialisation, (de)quantisation and the weighted sums: the cost of gossip itself.
        self.timing["mix_seconds"] = time.perf_counter() - began
        return messages, results

    def run(self, round_index: int, progress: Progress, task: TaskID) -> dict:
        nodes = list(range(len(self.exp.clients)))
        progress.update(task, total=len(self.peers.local_nodes()))
        messages, results = self.peers.gather(
            self, *self.step(round_index, progress, task), round_index
        )
        graph = self.topology.at(round_index)
        ledger = self.channel.ledger
        record: dict = {
            "round": round_index + 1,
            "clients": nodes,
            "train_loss": float(np.mean([results[n].loss for n in nodes])),
            "steps": sum(results[n].steps for n in nodes),
            "examples": sum(results[n].examples for n in nodes),
            "bytes": ledger.total(round_index=round_index),
            "cumulative_bytes": ledger.through_round(round_index),
            "lambda2": graph.lambda2,
            "edges": graph.graph.number_of_edges(),
            **self.consensus(messages),
        }
        record = without_withheld(self.exp, record)
        rejected = ledger.rejections(round_index)
        if rejected:
            record["rejected"] = [
                {"sender": r.sender, "receiver": r.receiver, "reason": r.rejected} for r in rejected
            ]
        record.update(self.timing)
        return record

    def summary_lines(self, metrics: list[dict]) -> list[str]:
        config = self.exp.config.topology
        sent: dict[str, int] = {}
        for record in self.channel.ledger.records:
            sent[record.sender] = sent.get(record.sender, 0) + record.bytes
        codec = (
            "exact float32"
            if config.quantize_bits == 32
            else f"{config.quantize_bits}-bit stochastic quantization (ours)"
        )
        graph = self.topology.describe() + "."
        if config.time_varying:
            per_round = [m["lambda2"] for m in metrics if m["round"] > 0]  # not the initial
            graph += f" Mean λ2 over the {len(per_round)} rounds' graphs: {np.mean(per_round):.4f}."
        return [
            "",
            "## Decentralized gossip",
            "",
            graph,
            "",
            f"Messages: {codec}{', CHOCO error feedback' if config.error_feedback else ''}; "
            f"mixing in {config.mix_space} space; "
            f"evaluated model: {self.evaluated_model()}. "
            "Bytes sent per node (all rounds): "
            + ", ".join(f"{name} {sent[name]:,}" for name in sorted(sent, key=lambda n: int(n[4:])))
            + ".",
            "",
            f"![graph]({GRAPH_FILE})",
        ]


class LocalPeers(Peers):
    """Every node in this process; their local steps here, in turn, or on a pool of forked
    workers (``compute.workers``), the same numbers either way."""

    holds_every_node = True

    def __init__(self, runtime: ClientRuntime, pool: Pool | None = None) -> None:
        self.runtime = runtime
        self.pool = pool

    def open(self, start_round: int) -> None:
        if self.pool is not None:
            self.pool.open(start_round)

    def close(self) -> list[str]:
        return self.pool.close() if self.pool is not None else []

    def local_nodes(self) -> list[int]:
        return list(range(len(self.runtime.exp.clients)))

    def train(
        self, round_: GossipRound, round_index: int
    ) -> Iterator[tuple[int, TensorDict, LocalResult]]:
        nodes = self.local_nodes()
        if self.pool is None:
            for node in nodes:
                yield node, *self.runtime.train(node, {}, round_index)
            return
        self.pool.submit({node: b"" for node in nodes}, {}, round_index, PEER)
        for node in nodes:
            payload, report = self.pool.result(node)
            message = state_from_bytes(payload)
            ordered = {key: message[key] for key in report["keys"]}  # as the node made it
            yield node, ordered, from_outcome(report["outcome"])

    def exchange(
        self,
        round_: GossipRound,
        messages: dict[int, TensorDict],
        graph: RoundGraph,
        round_index: int,
    ) -> dict[int, dict[int, TensorDict]]:
        received: dict[int, dict[int, TensorDict]] = {}
        for i in messages:
            received[i] = {}
            for j in graph.neighbours(i):
                try:
                    received[i][j] = round_.channel.send(
                        messages[j], node_name(j), node_name(i), round_index, round_.shapes
                    )
                except MessageError:
                    continue
        return received
