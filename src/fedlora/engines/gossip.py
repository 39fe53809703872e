"""Decentralized rounds in one process: every node trains, sends to its graph neighbours through
the channel, and mixes (methods with ``engine = "gossip"``, e.g. Dec-LoRA).

A round is exchange, weighted sum, record:

1. each node runs its local steps from its own model (``PeerMethod.client_start``);
2. each node's message goes through the channel once per neighbour (real bytes in the ledger,
   quantized by the ``topology.quantize_bits`` codec if set); a node's own term stays exact;
3. each node mixes with that round's mixing row ``w_i·``;
4. the observer evaluates the network-averaged model and records the consensus distance.

With ``topology.error_feedback`` the exchange is CHOCO-gossip (Koloskova et al. 2019; ours here):
each node keeps public estimates x̂_j of itself and its neighbours, sends only the quantized
difference q_j = Q(x_j − x̂_j), everyone holding x̂_j adds q_j, and a node moves by
x_i ← x_i + γ (Σ_j w_ij x̂_j − x̂_i). Quantization error is then not lost but carried over.

The loop, checkpointing, metrics files and evaluation are the simulation engine's (subclassed);
only the round differs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress, TaskID

from fedlora.channel import Channel, MessageError
from fedlora.codecs import make_codec
from fedlora.engines.simulation import RunResult, SimulationEngine
from fedlora.experiment import Experiment
from fedlora.methods.base import store_under, stored
from fedlora.methods.peer import PeerMethod
from fedlora.tensors import TensorDict
from fedlora.topology import RoundGraph, Topology, draw
from fedlora.training import LocalResult, derived_seed, steps_per_round, withheld

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


class GossipEngine(SimulationEngine):
    def __init__(self, experiment: Experiment, run_dir: Path, console: Console | None = None):
        super().__init__(experiment, run_dir, console)
        if not isinstance(experiment.method, PeerMethod):
            raise TypeError(
                f"the gossip engine runs peer methods, not {type(experiment.method).__name__}"
            )
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

    def states(self) -> list[TensorDict]:
        method = self.method
        return [
            method.client_start(node, {}, self.stores[node])
            for node in range(len(self.exp.clients))
        ]

    # -- evaluation: the network-averaged model, and optionally each node's own ---------------
    def evaluate(self) -> dict[str, float]:
        metrics = self.exp.evaluator.evaluate(self.method.network_model(self.states()))
        if self.exp.config.topology.per_node_eval:
            metrics.update(per_node(super().evaluate()))
        return metrics

    def evaluated_model(self) -> str:
        return f"network average of {self.exp.config.topology.average_model}"

    def consensus(self, messages: dict[int, TensorDict]) -> dict[str, float]:
        """How far the nodes are apart before and after mixing (every node's factors)."""
        nodes = range(len(self.exp.clients))
        return {
            "consensus_before_mix": consensus_distance([messages[n] for n in nodes], self.factors),
            "consensus_distance": consensus_distance(self.states(), self.factors),
        }

    # -- exchange -----------------------------------------------------------------------------
    def _exchange(
        self, messages: dict[int, TensorDict], graph: RoundGraph, round_index: int
    ) -> dict[int, dict[int, TensorDict]]:
        """received[i][j]: node j's message as node i decoded it, for each edge (j → i); a
        message node i refuses is left out (the ledger records why) and i mixes the rest."""
        received: dict[int, dict[int, TensorDict]] = {}
        for i in messages:
            received[i] = {}
            for j in graph.neighbours(i):
                try:
                    received[i][j] = self.channel.send(
                        messages[j], node_name(j), node_name(i), round_index, self.shapes
                    )
                except MessageError:
                    continue
        return received

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
    def scheduled(self, round_index: int) -> dict[int, int]:
        """Every node trains every round, its round's steps."""
        train = self.exp.config.train
        return {
            node: steps_per_round(train, len(rows)) for node, rows in enumerate(self.exp.clients)
        }

    def local_nodes(self) -> list[int]:
        """The nodes this process hosts: all of them in one process."""
        return list(range(len(self.exp.clients)))

    def _train_and_mix(
        self, graph: RoundGraph, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[dict[int, TensorDict], dict[int, LocalResult]]:
        """The hosted nodes' part of a round: local steps, exchange, mix, keep. Returns their
        trained messages (before mixing) and local results."""
        exp, method = self.exp, self.method
        keep = self._keeps_optimizer()
        messages: dict[int, TensorDict] = {}
        results: dict[int, LocalResult] = {}
        self.timing = {"local_seconds": 0.0, "mix_seconds": 0.0}
        for node in self.local_nodes():
            began = time.perf_counter()
            start = method.client_start(node, {}, self.stores[node])
            result = exp.trainer.train(
                start,
                exp.clients[node],
                round_index,
                node,
                method.trainable,
                self.optimizers.get(node) if keep else None,
            )
            if keep:
                self.optimizers[node] = result.optimizer_state
            messages[node] = method.client_reply(node, result.state, {}, self.stores[node])
            self.timing["local_seconds"] += time.perf_counter() - began
            results[node] = withheld(result) if exp.withholds_client_stats else result
            losses = [r.loss for r in results.values()]
            progress.update(task, advance=1, status=f"loss {np.mean(losses):.4f}")
        exchange = self._choco if exp.config.topology.error_feedback else self._gossip
        began = time.perf_counter()
        for node, state in exchange(messages, graph, round_index).items():
            method.keep(self.stores[node], state)
        # Serialisation, (de)quantisation and the weighted sums: the cost of gossip itself.
        self.timing["mix_seconds"] = time.perf_counter() - began
        return messages, results

    def _gather(
        self,
        messages: dict[int, TensorDict],
        results: dict[int, LocalResult],
        round_index: int,
    ) -> tuple[dict[int, TensorDict], dict[int, LocalResult]]:
        """Every node's trained message and local result, for the round's record (the
        distributed engine collects them, and the nodes' stores, from the other processes)."""
        return messages, results

    def run_round(self, round_index: int, progress: Progress) -> dict:
        exp = self.exp
        began = time.perf_counter()
        nodes = list(range(len(exp.clients)))
        graph = self.topology.at(round_index)
        task = progress.add_task(
            f"round {round_index + 1}/{exp.config.experiment.rounds}", total=len(nodes), status=""
        )
        messages, results = self._gather(
            *self._train_and_mix(graph, round_index, progress, task), round_index
        )
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
        record = self.without_withheld(record)
        rejected = ledger.rejections(round_index)
        if rejected:
            record["rejected"] = [
                {"sender": r.sender, "receiver": r.receiver, "reason": r.rejected} for r in rejected
            ]
        record.update(self.timing)
        train_seconds = time.perf_counter() - began
        return self._close_record(record, round_index, progress, task, began, train_seconds)

    # -- the run ------------------------------------------------------------------------------
    def run(self, start_round: int = 0, show_progress: bool = True) -> RunResult:
        config = self.exp.config
        draw(
            self.topology.at(0),
            self.run_dir / GRAPH_FILE,
            f"{config.topology.kind}, {len(self.exp.clients)} nodes",
        )
        result = super().run(start_round, show_progress)
        result.notes.extend(self.summary_lines())
        return result

    def summary_lines(self) -> list[str]:
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
            per_round = [m["lambda2"] for m in self.metrics if m["round"] > 0]  # not the initial
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
