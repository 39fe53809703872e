"""Graphs (who talks to whom) and mixing matrices (with what weights), kept apart (§1.3).

A graph is a ``networkx.Graph`` on nodes ``0..N-1``; a mixing matrix is a float64 ``N×N`` array
built from a graph by a named rule and checked at construction: symmetric, doubly stochastic,
non-negative, and positive only on edges and the diagonal. Every failure is a ``TopologyError``
(a ``ConfigError``), so a bad graph or rule stops the run before training with one message.

Random graphs are drawn from seeds only, so a resumed run sees the same graphs; a time-varying
topology derives each round's graph from (seed, round).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np

from fedlora.config import ConfigError, TopologyConfig
from fedlora.training import derived_seed

TOLERANCE = 1e-10
MAX_CONNECT_TRIES = 1000


class TopologyError(ConfigError):
    """A graph or mixing matrix gossip cannot use (disconnected, not doubly stochastic, ...)."""


# -- graphs -----------------------------------------------------------------------------------
def ring(n: int) -> nx.Graph:
    if n < 3:
        raise TopologyError(f"a ring needs at least 3 nodes, got {n}")
    return nx.cycle_graph(n)


def torus(n: int) -> nx.Graph:
    """2-D torus on the most square ``rows × cols = n`` grid; both sides must be ≥ 3 (with 2 the
    wrap-around edge doubles an existing one and the torus degenerates)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    cols = n // rows
    if rows < 3:
        raise TopologyError(
            f"a 2-D torus needs n = rows × cols with both ≥ 3; {n} does not factor so"
        )
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.convert_node_labels_to_integers(grid, ordering="sorted")


def erdos_renyi(n: int, p: float, seed: int) -> nx.Graph:
    """G(n, p) redrawn (seeded) until connected, as Dec-LoRA does."""
    rng = np.random.default_rng(seed)
    for _ in range(MAX_CONNECT_TRIES):
        graph = nx.gnp_random_graph(n, p, seed=int(rng.integers(2**31)))
        if nx.is_connected(graph):
            return graph
    raise TopologyError(
        f"G({n}, {p}) was not connected in {MAX_CONNECT_TRIES} draws; raise topology.p"
    )


def complete(n: int) -> nx.Graph:
    return nx.complete_graph(n)


def star(n: int) -> nx.Graph:
    """Node 0 is the hub (a server in all but name: the worst case for spectral gap per edge)."""
    return nx.star_graph(n - 1)


def exponential(n: int) -> nx.Graph:
    """Node i links to i ± 2^k (mod n), k = 0..⌊log2(n−1)⌋: O(log n) degree, large spectral gap."""
    graph = nx.empty_graph(n)
    hop = 1
    while hop < n:
        graph.add_edges_from((i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
        hop *= 2
    return graph


def matching(n: int, seed: int) -> nx.Graph:
    """A uniformly random (near-)perfect matching; with odd n one node sits the round out.
    Disconnected by construction: it only makes sense redrawn every round."""
    order = np.random.default_rng(seed).permutation(n)
    graph = nx.empty_graph(n)
    graph.add_edges_from((int(order[i]), int(order[i + 1])) for i in range(0, n - 1, 2))
    return graph


def from_edge_file(path: Path, n: int) -> nx.Graph:
    """One edge ``i j`` per line (0-based node ids), ``#`` comments and blank lines ignored.
    Every problem names the file and the line, because a typo here silently changes a result."""
    if not path.is_file():
        raise TopologyError(f"topology.edge_file {path} does not exist")
    graph = nx.empty_graph(n)
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}: {raw.strip()!r}"
        fields = line.replace(",", " ").split()
        if len(fields) != 2 or not all(f.lstrip("-").isdigit() for f in fields):
            raise TopologyError(f"{where}: expected two integer node ids 'i j'")
        i, j = (int(f) for f in fields)
        if not (0 <= i < n and 0 <= j < n):
            raise TopologyError(
                f"{where}: node ids must lie in 0..{n - 1} (partition.num_clients = {n})"
            )
        if i == j:
            raise TopologyError(f"{where}: self-loop; the diagonal of the mixing matrix is implied")
        if graph.has_edge(i, j):
            raise TopologyError(f"{where}: duplicate edge")
        graph.add_edge(i, j)
    return graph


# -- mixing matrices --------------------------------------------------------------------------
def metropolis_hastings(graph: nx.Graph) -> np.ndarray:
    """w_ij = 1 / (1 + max(d_i, d_j)) on edges, the rest on the diagonal: valid on any graph."""
    n = graph.number_of_nodes()
    w = np.zeros((n, n))
    for i, j in graph.edges:
        w[i, j] = w[j, i] = 1.0 / (1 + max(graph.degree[i], graph.degree[j]))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def ring_weights(graph: nx.Graph) -> np.ndarray:
    """1/3 to self and to each of two neighbours (Dec-LoRA's ring); only for 2-regular graphs."""
    degrees = {d for _, d in graph.degree}
    if degrees != {2}:
        raise TopologyError(
            f"mixing 'ring' (1/3 weights) needs every degree = 2; degrees are {sorted(degrees)}"
        )
    n = graph.number_of_nodes()
    return (np.eye(n) + nx.to_numpy_array(graph, nodelist=range(n))) / 3.0


def laplacian(graph: nx.Graph) -> np.ndarray:
    """Q = I − (2 / (3 λ_max(L))) L, Dec-LoRA's ER matrix: eigenvalues in [1/3, 1]."""
    n = graph.number_of_nodes()
    lap = nx.laplacian_matrix(graph, nodelist=range(n)).toarray().astype(np.float64)
    lam_max = float(np.linalg.eigvalsh(lap)[-1])
    if lam_max <= 0:
        raise TopologyError("mixing 'laplacian' needs a graph with at least one edge")
    return np.eye(n) - (2.0 / (3.0 * lam_max)) * lap


def uniform(graph: nx.Graph) -> np.ndarray:
    """1/N everywhere: one step reaches the exact average (FedAvg without a server)."""
    n = graph.number_of_nodes()
    if graph.number_of_edges() != n * (n - 1) // 2:
        raise TopologyError("mixing 'uniform' (1/N weights) needs the complete graph")
    return np.full((n, n), 1.0 / n)


MIXINGS: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "metropolis": metropolis_hastings,
    "ring": ring_weights,
    "laplacian": laplacian,
    "uniform": uniform,
}
DEFAULT_MIXING = {"ring": "ring", "erdos_renyi": "laplacian", "complete": "uniform"}


def check_mixing(w: np.ndarray, graph: nx.Graph) -> None:
    """Refuse any matrix gossip theory does not cover (§1.3), naming the first violation."""
    n = graph.number_of_nodes()
    if w.shape != (n, n):
        raise TopologyError(f"mixing matrix has shape {w.shape}; the graph has {n} nodes")
    if not np.allclose(w, w.T, atol=TOLERANCE):
        raise TopologyError("mixing matrix is not symmetric")
    for axis, what in ((1, "row"), (0, "column")):
        sums = w.sum(axis=axis)
        bad = np.flatnonzero(np.abs(sums - 1.0) > TOLERANCE)
        if bad.size:
            raise TopologyError(f"mixing matrix {what} {bad[0]} sums to {sums[bad[0]]:.12g}, not 1")
    if (w < -TOLERANCE).any():
        raise TopologyError("mixing matrix has negative entries")
    allowed = nx.to_numpy_array(graph, nodelist=range(n)) + np.eye(n)
    off = np.argwhere((np.abs(w) > TOLERANCE) & (allowed == 0))
    if off.size:
        i, j = off[0]
        raise TopologyError(f"mixing matrix weights pair ({i}, {j}), which is not an edge")


def second_eigenvalue(w: np.ndarray) -> float:
    """λ2 = max(|λ_2(W)|, |λ_N(W)|): the per-step contraction factor of disagreement."""
    eigenvalues = np.sort(np.linalg.eigvalsh(w))[::-1]
    return float(max(abs(eigenvalues[1]), abs(eigenvalues[-1]))) if len(eigenvalues) > 1 else 0.0


# -- a topology: one graph + weights per round ------------------------------------------------
@dataclass(frozen=True)
class RoundGraph:
    graph: nx.Graph
    weights: np.ndarray
    lambda2: float

    @property
    def spectral_gap(self) -> float:
        return 1.0 - self.lambda2

    def neighbours(self, node: int) -> list[int]:
        return sorted(self.graph.neighbors(node))


class Topology:
    """The configured graph family and mixing rule; ``at(round)`` gives that round's graph."""

    def __init__(self, config: TopologyConfig, num_nodes: int, seed: int) -> None:
        self.config = config
        self.num_nodes = num_nodes
        self.seed = config.seed if config.seed is not None else seed
        self.mixing = (
            DEFAULT_MIXING.get(config.kind, "metropolis")
            if config.mixing == "auto"
            else config.mixing
        )
        self._static = None if config.time_varying else self._build(derived_seed(self.seed, 0x70))

    def at(self, round_index: int) -> RoundGraph:
        if self._static is not None:
            return self._static
        return self._build(derived_seed(self.seed, 0x70, round_index + 1))

    def _build(self, seed: int) -> RoundGraph:
        config, n = self.config, self.num_nodes
        builders: dict[str, Callable[[], nx.Graph]] = {
            "ring": lambda: ring(n),
            "torus": lambda: torus(n),
            "erdos_renyi": lambda: erdos_renyi(n, config.p or 0.0, seed),
            "complete": lambda: complete(n),
            "star": lambda: star(n),
            "exponential": lambda: exponential(n),
            "matching": lambda: matching(n, seed),
            "file": lambda: from_edge_file(Path(config.edge_file or ""), n),
        }
        graph = builders[config.kind]()
        if not config.time_varying and not nx.is_connected(graph):
            raise TopologyError(
                f"topology {config.kind!r} on {n} nodes is not connected; no consensus is possible"
            )
        weights = MIXINGS[self.mixing](graph)
        check_mixing(weights, graph)
        return RoundGraph(graph, weights, second_eigenvalue(weights))

    def describe(self) -> str:
        first = self.at(0)
        kind = (
            f"{self.config.kind} (redrawn every round)"
            if self.config.time_varying
            else self.config.kind
        )
        return (
            f"graph {kind}, {self.num_nodes} nodes, {first.graph.number_of_edges()} edges, "
            f"mixing {self.mixing}; λ2 = {first.lambda2:.4f}, "
            f"spectral gap = {first.spectral_gap:.4f}"
        )


def draw(round_graph: RoundGraph, path: Path, title: str) -> None:
    """The graph with edge widths ∝ mixing weight (self-weights annotated on the nodes)."""
    graph, w = round_graph.graph, round_graph.weights
    figure, axis = plt.subplots(figsize=(5, 5))
    layout = (
        nx.circular_layout(graph)
        if graph.number_of_nodes() <= 40
        else nx.spring_layout(graph, seed=0)
    )
    widths = [1 + 6 * w[i, j] for i, j in graph.edges]
    nx.draw_networkx_edges(graph, layout, ax=axis, width=widths, alpha=0.6)
    nx.draw_networkx_nodes(graph, layout, ax=axis, node_color="#8fb8de", node_size=380)
    nx.draw_networkx_labels(graph, layout, ax=axis, font_size=8)
    axis.set_title(
        f"{title}\nλ2 = {round_graph.lambda2:.4f}, gap = {round_graph.spectral_gap:.4f}", fontsize=9
    )
    axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
