"""Graphs and mixing matrices (algorithms.md §1.3, §7 T9): structure, validity, spectra, errors."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from fedlora.config import ConfigError, TopologyConfig
from fedlora.topology import (
    MIXINGS,
    Topology,
    TopologyError,
    check_mixing,
    complete,
    draw,
    erdos_renyi,
    exponential,
    from_edge_file,
    laplacian,
    matching,
    metropolis_hastings,
    ring,
    ring_weights,
    second_eigenvalue,
    star,
    torus,
    uniform,
)


def degrees(graph: nx.Graph) -> list[int]:
    return sorted(d for _, d in graph.degree)


# -- each graph's connectivity and degrees ---------------------------------------------------
def test_graph_degrees_and_connectivity() -> None:
    assert degrees(ring(10)) == [2] * 10
    assert degrees(torus(12)) == [4] * 12  # 3 × 4
    assert degrees(torus(9)) == [4] * 9
    assert degrees(complete(6)) == [5] * 6
    assert degrees(star(6)) == [1] * 5 + [5]
    assert degrees(exponential(8)) == [5] * 8  # ±1, ±2, +4 (= −4)
    assert degrees(exponential(16)) == [7] * 16  # ±1, ±2, ±4, +8
    for graph in (ring(10), torus(12), complete(6), star(6), exponential(8), exponential(10)):
        assert nx.is_connected(graph)
    for seed in range(5):
        assert nx.is_connected(erdos_renyi(10, 0.2, seed))
    pairs = matching(9, seed=3)
    assert pairs.number_of_edges() == 4 and max(degrees(pairs)) == 1


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(TopologyError, match="ring needs at least 3"):
        ring(2)
    with pytest.raises(TopologyError, match="torus"):
        torus(10)  # 2 × 5
    with pytest.raises(TopologyError, match="not connected in"):
        erdos_renyi(30, 0.001, seed=0)


def test_erdos_renyi_is_seeded() -> None:
    assert set(erdos_renyi(12, 0.3, 7).edges) == set(erdos_renyi(12, 0.3, 7).edges)
    assert set(erdos_renyi(12, 0.3, 7).edges) != set(erdos_renyi(12, 0.3, 8).edges)


# -- mixing matrices ---------------------------------------------------------------------------
def test_ring10_lambda2_is_08727() -> None:
    w = ring_weights(ring(10))
    assert np.allclose(w, metropolis_hastings(ring(10)), atol=1e-15)  # 1/3 = MH on degree 2
    assert second_eigenvalue(w) == pytest.approx(
        1 / 3 + 2 / 3 * math.cos(2 * math.pi / 10), abs=1e-12
    )
    assert round(second_eigenvalue(w), 4) == 0.8727


def test_laplacian_matrix_doubly_stochastic_positive_diagonal() -> None:
    for seed in range(6):
        graph = erdos_renyi(12, 0.3, seed)
        q = laplacian(graph)
        check_mixing(q, graph)
        assert np.allclose(q.sum(axis=0), 1, atol=1e-12) and np.allclose(
            q.sum(axis=1), 1, atol=1e-12
        )
        assert (np.diag(q) >= 1 / 3 - 1e-12).all()
        eigenvalues = np.linalg.eigvalsh(q)
        assert eigenvalues.min() >= 1 / 3 - 1e-10 and eigenvalues.max() == pytest.approx(1.0)
        assert second_eigenvalue(q) < 1


def test_every_mixing_rule_is_valid_where_it_applies() -> None:
    graphs = [ring(7), torus(9), star(5), exponential(10), erdos_renyi(10, 0.3, 1), complete(5)]
    for graph in graphs:
        for name in ("metropolis", "laplacian"):
            check_mixing(MIXINGS[name](graph), graph)
    check_mixing(uniform(complete(5)), complete(5))
    with pytest.raises(TopologyError, match="every degree = 2"):
        ring_weights(star(5))
    with pytest.raises(TopologyError, match="complete graph"):
        uniform(ring(5))


def test_check_mixing_names_the_violation() -> None:
    graph = ring(4)
    w = ring_weights(graph)
    skew = w.copy()
    skew[0, 1] += 0.1
    skew[0, 0] -= 0.1
    with pytest.raises(TopologyError, match="not symmetric"):
        check_mixing(skew, graph)
    with pytest.raises(TopologyError, match="row 0 sums to"):
        check_mixing(w + np.diag([0.1, 0, 0, 0]), graph)
    off_edge = w.copy()
    off_edge[0, 2] = off_edge[2, 0] = 0.1
    off_edge[0, 0] -= 0.1
    off_edge[2, 2] -= 0.1
    with pytest.raises(TopologyError, match=r"pair \(0, 2\), which is not an edge"):
        check_mixing(off_edge, graph)


def test_consensus_contracts_at_least_as_lambda2_squared_per_step() -> None:
    """(1/N)||W^m X − X̄||² ≤ λ2^{2m} (1/N)||X − X̄||² for any X (T9), on several graphs."""
    rng = np.random.default_rng(0)
    for graph in (ring(10), erdos_renyi(10, 0.3, 2), exponential(10), star(8)):
        w = metropolis_hastings(graph)
        lam = second_eigenvalue(w)
        x = rng.standard_normal((graph.number_of_nodes(), 20))
        start = ((x - x.mean(0)) ** 2).sum()
        for m in range(1, 8):
            x_m = np.linalg.matrix_power(w, m) @ x
            assert ((x_m - x_m.mean(0)) ** 2).sum() <= lam ** (2 * m) * start + 1e-12
            assert np.allclose(x_m.mean(0), x.mean(0), atol=1e-12)  # the average is preserved


def test_complete_graph_is_fedavg_in_one_step() -> None:
    x = np.random.default_rng(1).standard_normal((6, 5))
    mixed = uniform(complete(6)) @ x
    assert np.allclose(mixed, np.tile(x.mean(0), (6, 1)), atol=1e-14)
    assert second_eigenvalue(uniform(complete(6))) == pytest.approx(0.0, abs=1e-12)


# -- edge-list files ---------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edges.txt"
    path.write_text(text)
    return path


def test_edge_file_reads_comments_and_commas(tmp_path: Path) -> None:
    path = write(tmp_path, "# a ring of 4\n0 1\n1,2\n\n2 3  # last but one\n3 0\n")
    assert degrees(from_edge_file(path, 4)) == [2, 2, 2, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 1\n1 x\n", r"edges.txt:2: '1 x': expected two integer node ids"),
        ("0 1\n1 2 3\n", r"edges.txt:2: .*expected two integer"),
        ("0 1\n\n1 4\n", r"edges.txt:3: '1 4': node ids must lie in 0..3"),
        ("0 1\n2 2\n", r"edges.txt:2: .*self-loop"),
        ("0 1\n1 0\n", r"edges.txt:2: '1 0': duplicate edge"),
    ],
)
def test_edge_file_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        from_edge_file(write(tmp_path, text), 4)


def test_disconnected_edge_file_is_refused(tmp_path: Path) -> None:
    config = TopologyConfig(kind="file", edge_file=str(write(tmp_path, "0 1\n2 3\n")))
    with pytest.raises(TopologyError, match="not connected"):
        Topology(config, 4, seed=0)
    with pytest.raises(TopologyError, match="does not exist"):
        Topology(TopologyConfig(kind="file", edge_file=str(tmp_path / "none.txt")), 4, seed=0)


# -- the configured topology -------------------------------------------------------------------
def test_config_rules() -> None:
    for bad in (
        {"kind": "erdos_renyi"},
        {"kind": "file"},
        {"kind": "ring", "time_varying": True},
        {"kind": "matching"},
        {"kind": "ring", "error_feedback": True, "mix_space": "products"},
    ):
        with pytest.raises(ValueError):
            TopologyConfig(**bad)


def test_auto_mixing_follows_dec_lora() -> None:
    assert Topology(TopologyConfig(kind="ring"), 10, 0).mixing == "ring"
    assert Topology(TopologyConfig(kind="erdos_renyi", p=0.3), 10, 0).mixing == "laplacian"
    assert Topology(TopologyConfig(kind="complete"), 10, 0).mixing == "uniform"
    assert Topology(TopologyConfig(kind="star"), 10, 0).mixing == "metropolis"
    assert issubclass(TopologyError, ConfigError)


def test_time_varying_graphs_are_fresh_each_round_and_reproducible() -> None:
    for kind, extra in (("erdos_renyi", {"p": 0.3}), ("matching", {})):
        config = TopologyConfig(kind=kind, time_varying=True, **extra)
        first, again = Topology(config, 10, seed=5), Topology(config, 10, seed=5)
        edges = [set(first.at(r).graph.edges) for r in range(4)]
        assert edges == [set(again.at(r).graph.edges) for r in range(4)]
        assert len({frozenset(e) for e in edges}) > 1
        for r in range(4):
            check_mixing(first.at(r).weights, first.at(r).graph)
    static = Topology(TopologyConfig(kind="erdos_renyi", p=0.3), 10, seed=5)
    assert static.at(0) is static.at(3)


def test_draw_writes_a_png(tmp_path: Path) -> None:
    topology = Topology(TopologyConfig(kind="exponential"), 8, seed=0)
    draw(topology.at(0), tmp_path / "graph.png", "exponential")
    assert (tmp_path / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "λ2 = " in topology.describe()
