"""Partitioners: every example in exactly one client, skew follows alpha, same seed same split."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset

from fedlora.config import ConfigError, PartitionConfig
from fedlora.data.partition import label_histograms, own_test_shares, partition


def labelled(n_per_class: int = 60, classes: int = 5) -> Dataset:
    labels = [c for c in range(classes) for _ in range(n_per_class)]
    data = Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))], "label": labels})
    data = data.cast_column("label", ClassLabel(names=[f"c{i}" for i in range(classes)]))
    return data.add_column("site", [f"s{i % 3}" for i in range(len(labels))])


KINDS = [
    PartitionConfig(kind="iid", num_clients=7),
    PartitionConfig(kind="dirichlet", num_clients=6, alpha=0.5),
    PartitionConfig(kind="fslora_dirichlet", num_clients=6, alpha=0.1),
    PartitionConfig(kind="shards", num_clients=5, shards_per_client=2),
    PartitionConfig(
        kind="proportions",
        num_clients=2,
        proportions=[[0.1, 0.2, 0.3, 0.2, 0.2], [0.5, 0.1, 0.1, 0.1, 0.2]],
    ),
    PartitionConfig(kind="quantity", num_clients=4, quantity="linear"),
    PartitionConfig(kind="natural", num_clients=3, column="site"),
]


@pytest.mark.parametrize("config", KINDS, ids=lambda c: c.kind)
def test_each_example_in_exactly_one_client(config: PartitionConfig) -> None:
    data = labelled()
    clients = partition(data, config, num_classes=5, seed=3)
    assert len(clients) == config.num_clients
    assert all(clients)
    rows = sorted(r for client in clients for r in client)
    assert rows == list(range(len(data)))


@pytest.mark.parametrize("config", KINDS, ids=lambda c: c.kind)
def test_same_seed_same_split_other_seed_other_split(config: PartitionConfig) -> None:
    data = labelled()
    first = partition(data, config, 5, seed=3)
    assert partition(data, config, 5, seed=3) == first
    if config.kind in ("dirichlet", "fslora_dirichlet", "proportions", "iid", "shards"):
        assert partition(data, config, 5, seed=4) != first


def skew(config: PartitionConfig, seed: int) -> float:
    """Mean total-variation distance between client label mixes and the global mix."""
    data = labelled(100)
    clients = partition(data, config, 5, seed)
    hist = np.asarray(label_histograms(list(data["label"]), clients, 5), dtype=float)
    mixes = hist / hist.sum(axis=1, keepdims=True)
    return float(np.abs(mixes - 0.2).sum(axis=1).mean() / 2)


@pytest.mark.parametrize("kind", ["dirichlet", "fslora_dirichlet"])
def test_skew_grows_as_alpha_shrinks(kind: str) -> None:
    values = []
    for alpha in (100.0, 1.0, 0.1):
        config = PartitionConfig(kind=kind, num_clients=5, alpha=alpha, min_client_size=1)
        values.append(np.mean([skew(config, seed) for seed in range(5)]))
    assert values[0] < values[1] < values[2], values
    assert values[0] < 0.1 and values[2] > 0.4


def test_fixed_proportions_are_met_on_balanced_classes() -> None:
    data = labelled(200, classes=2)
    rows = [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]
    clients = partition(
        data, PartitionConfig(kind="proportions", num_clients=3, proportions=rows), 2, 0
    )
    hist = np.asarray(label_histograms(list(data["label"]), clients, 2), dtype=float)
    np.testing.assert_allclose(hist / hist.sum(axis=1, keepdims=True), rows, atol=0.01)


def test_shards_give_k_classes_per_client() -> None:
    data = labelled()
    clients = partition(
        data, PartitionConfig(kind="shards", num_clients=5, shards_per_client=2), 5, 0
    )
    hist = np.asarray(label_histograms(list(data["label"]), clients, 5))
    assert ((hist > 0).sum(axis=1) <= 2).all()


def test_quantity_skew_sizes_grow() -> None:
    data = labelled()
    clients = partition(
        data, PartitionConfig(kind="quantity", num_clients=4, quantity="linear"), 5, 0
    )
    sizes = [len(c) for c in clients]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (PartitionConfig(kind="iid", num_clients=1000), "more than the 300"),
        (PartitionConfig(kind="shards", num_clients=3, shards_per_client=9), "only 5 classes"),
        (PartitionConfig(kind="proportions", num_clients=2), "proportions is required"),
        (
            PartitionConfig(kind="proportions", num_clients=2, proportions=[[1.0, 0, 0, 0, 0]]),
            "has 1 rows",
        ),
        (
            PartitionConfig(kind="proportions", num_clients=1, proportions=[[0.5, 0.6, 0, 0, 0]]),
            "sum to 1",
        ),
        (PartitionConfig(kind="natural", num_clients=4, column="site"), "must be 3"),
        (PartitionConfig(kind="natural", num_clients=3, column="hospital"), "not a column"),
    ],
)
def test_impossible_partitions_are_clear_errors(config: PartitionConfig, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        partition(labelled(), config, 5, 0)


def test_own_test_shares_mirror_each_clients_share_of_every_class() -> None:
    """Client i's own test rows of class c number its share n_i(c)/n(c) of c's test rows, cut
    at the rounded cumulative shares (a hand computation over the histograms); the shares are
    disjoint and hold only test rows of classes someone trained on."""
    rng = np.random.default_rng(7)
    train = rng.integers(0, 4, size=300).tolist()
    test = rng.integers(0, 5, size=97).tolist()  # class 4 never seen in training
    clients = [sorted(c.tolist()) for c in np.array_split(rng.permutation(300), 3)]
    clients[0] = [r for r in clients[0] if train[r] != 2]  # client 0 holds no class 2
    shares = own_test_shares(train, clients, test, seed=3)
    flat = [r for share in shares for r in share]
    assert len(flat) == len(set(flat))
    assert {test[r] for r in flat} <= {0, 1, 2, 3}
    for c in range(4):
        held = [sum(train[r] == c for r in rows) for rows in clients]
        total = sum(t == c for t in test)
        cumulative = [round(total * sum(held[: i + 1]) / sum(held)) for i in range(3)]
        expected = np.diff([0, *cumulative]).tolist()
        got = [sum(test[r] == c for r in share) for share in shares]
        assert got == expected, (c, got, expected)
    assert not any(test[r] == 2 for r in shares[0])
    assert own_test_shares(train, clients, test, seed=3) == shares  # seeded


def test_a_natural_partitions_own_test_share_is_its_groups_test_rows() -> None:
    train = ["a", "b", "c", "a", "b", "c", "a"]
    test = ["c", "a", "a", "b", "d", "c"]
    clients = [[0, 3, 6], [1, 4], [2, 5]]  # one group each
    assert own_test_shares(train, clients, test, seed=0) == [[1, 2], [3], [0, 5]]
