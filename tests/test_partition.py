"""Partitioners: every example in exactly one client, skew follows alpha, same seed same split."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset

from fedlora.config import ConfigError, PartitionConfig
from fedlora.data.partition import label_histograms, partition


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
