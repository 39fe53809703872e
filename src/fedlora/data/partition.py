"""Split a training set across clients.

flwr-datasets' partitioners do the common schemes (IID, Dirichlet per class, k classes per
client, quantity skew, natural ids). The two schemes the papers use that flwr-datasets lacks,
FSLoRA's Dirichlet variant (algorithms.md §1.2 P2) and fixed label proportions (P4), are
partitioners on flwr-datasets' own ``Partitioner`` interface, so all kinds are used the same way.
A partition is a list of row indices into the training set, one list per client.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SquarePartitioner,
)

from fedlora.config import ConfigError, PartitionConfig

ROW = "__row__"


class ClassMatrixPartitioner(Partitioner):
    """Deal each class's (shuffled) examples out to clients in the proportions of one column of
    a clients x classes weight matrix, so every example lands in exactly one client."""

    def __init__(self, weights: np.ndarray, seed: int) -> None:
        super().__init__()
        self._weights = np.asarray(weights, dtype=np.float64)
        self._seed = seed
        self._indices: list[list[int]] | None = None

    @property
    def num_partitions(self) -> int:
        return self._weights.shape[0]

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(self._assignment()[partition_id])

    def _assignment(self) -> list[list[int]]:
        if self._indices is None:
            labels = np.asarray(list(self.dataset["label"]))
            rng = np.random.default_rng(self._seed)
            parts: list[list[int]] = [[] for _ in range(self.num_partitions)]
            for label in range(self._weights.shape[1]):
                members = rng.permutation(np.flatnonzero(labels == label))
                column = self._weights[:, label]
                share = (
                    column / column.sum()
                    if column.sum() > 0
                    else np.full_like(column, 1 / len(column))
                )
                cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(int)
                for client, chunk in enumerate(np.split(members, cuts)):
                    parts[client].extend(int(i) for i in chunk)
            self._indices = [sorted(p) for p in parts]
        return self._indices


def fslora_dirichlet(
    num_clients: int, num_classes: int, alpha: float, seed: int
) -> ClassMatrixPartitioner:
    """P2: one Dir(α·1_C) row per client, each class split by its normalised column."""
    rng = np.random.default_rng(seed)
    return ClassMatrixPartitioner(
        rng.dirichlet(np.full(num_classes, alpha), size=num_clients), seed + 1
    )


def fixed_proportions(
    rows: list[list[float]], num_classes: int, seed: int
) -> ClassMatrixPartitioner:
    """P4: client i holds class c in proportion ``rows[i][c]`` (rows sum to 1)."""
    matrix = np.asarray(rows, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != num_classes:
        raise ConfigError(
            f"partition.proportions must have one row per client and {num_classes} columns "
            f"(one per class); got shape {list(matrix.shape)}"
        )
    if (matrix < 0).any() or not np.allclose(matrix.sum(axis=1), 1.0, atol=1e-6):
        raise ConfigError("partition.proportions: each row must be non-negative and sum to 1")
    return ClassMatrixPartitioner(matrix, seed)


def make_partitioner(
    config: PartitionConfig, num_classes: int, seed: int, train: Dataset
) -> Partitioner:
    n = config.num_clients
    if config.kind == "iid":
        return IidPartitioner(n)
    if config.kind == "dirichlet":
        return DirichletPartitioner(
            n,
            "label",
            config.alpha,
            min_partition_size=config.min_client_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if config.kind == "fslora_dirichlet":
        return fslora_dirichlet(n, num_classes, config.alpha, seed)
    if config.kind == "shards":
        if config.shards_per_client > num_classes:
            raise ConfigError(
                f"partition.shards_per_client is {config.shards_per_client}, but the data has only "
                f"{num_classes} classes"
            )
        return PathologicalPartitioner(
            n, "label", config.shards_per_client, class_assignment_mode="random", seed=seed
        )
    if config.kind == "proportions":
        if config.proportions is None:
            raise ConfigError(
                "partition.proportions is required when partition.kind = 'proportions'"
            )
        if len(config.proportions) != n:
            raise ConfigError(
                f"partition.proportions has {len(config.proportions)} rows but "
                f"partition.num_clients is {n}"
            )
        return fixed_proportions(config.proportions, num_classes, seed)
    if config.kind == "quantity":
        sizes = {
            "linear": LinearPartitioner,
            "square": SquarePartitioner,
            "exponential": ExponentialPartitioner,
        }
        return sizes[config.quantity](n)
    column = config.column or "label"
    if column not in train.column_names:
        raise ConfigError(
            f"partition.column {column!r} is not a column of the data; "
            f"columns are: {', '.join(train.column_names)}"
        )
    distinct = len(set(list(train[column])))
    if distinct != n:
        raise ConfigError(
            f"partition.num_clients must be {distinct} for a natural partition by {column!r} "
            f"(it has {distinct} distinct values); got {n}"
        )
    return NaturalIdPartitioner(partition_by=column)


def partition(
    train: Dataset, config: PartitionConfig, num_classes: int, seed: int
) -> list[list[int]]:
    """Row indices of ``train`` per client; every row in exactly one client, none empty."""
    if config.num_clients > len(train):
        raise ConfigError(
            f"partition.num_clients is {config.num_clients}, more than the {len(train)} "
            "training examples; use at most that many clients"
        )
    partitioner = make_partitioner(config, num_classes, seed, train)
    # Shuffled by the seed first: flwr's IID and size partitioners cut contiguous blocks.
    partitioner.dataset = train.add_column(ROW, list(range(len(train)))).shuffle(seed=seed)
    try:
        clients = [
            sorted(list(partitioner.load_partition(i)[ROW]))
            for i in range(partitioner.num_partitions)
        ]
    except ValueError as error:  # e.g. Dirichlet cannot meet min_partition_size
        raise ConfigError(f"partition.kind {config.kind!r} failed on this data: {error}") from None
    empty = [i for i, rows in enumerate(clients) if not rows]
    if empty:
        raise ConfigError(
            f"partition.kind {config.kind!r} left clients {empty} without data; use fewer clients, "
            "a larger partition.alpha, or another partition.kind"
        )
    return clients


def label_histograms(
    labels: list[int], clients: list[list[int]], num_classes: int
) -> list[list[int]]:
    counts = np.zeros((len(clients), num_classes), dtype=int)
    array = np.asarray(labels)
    for client, rows in enumerate(clients):
        counts[client] = np.bincount(array[rows], minlength=num_classes)
    return counts.tolist()


def own_test_shares(
    train_keys: list, clients: list[list[int]], test_keys: list, seed: int
) -> list[list[int]]:
    """Each client's own share of the test set, cut the way its training data was cut: of the
    test rows of every key (a class, or a ``natural`` group), client i takes the fraction it
    holds of that key's training rows; the rows are shuffled by ``seed`` and cut at the
    cumulative fractions. The shares are disjoint; test rows of a key no client trained on
    belong to none."""
    rng = np.random.default_rng(seed)
    train = np.asarray(train_keys, dtype=object)
    test = np.asarray(test_keys, dtype=object)
    shares: list[list[int]] = [[] for _ in clients]
    for key in sorted(set(test_keys), key=str):
        held = np.asarray([np.sum(train[rows] == key) for rows in clients], dtype=np.float64)
        if held.sum() == 0:
            continue
        members = rng.permutation(np.flatnonzero(test == key))
        cuts = np.round(np.cumsum(held / held.sum())[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            shares[client].extend(int(i) for i in chunk)
    return [sorted(share) for share in shares]
