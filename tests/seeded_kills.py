"""Clients really killed mid-protocol against the same drops seeded in one process, for the
deployment tests (Flower's and torch.distributed's).

4 clients, threshold 2, one round, no seeded drops: the deployment kills client 1's process
right after it answers ShareKeys and client 2's right after it sends its masked input. The
reference is the in-process secure run of the same seed whose seeded draws (seed 44 at these
rates) drop client 1 after ShareKeys and make client 2 vanish after its masked input, and
nobody else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics

KILLED = [
    "partition.num_clients=4",
    "privacy.secure_aggregation=true",
    "privacy.threshold=2",
    "experiment.seed=44",
    "experiment.rounds=1",
]
SEEDED_LIKE_KILLED = ["federation.dropout=0.3", "federation.dropout_after_masking=0.3"]


def settings(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def assert_like_the_seeded_drops(run: Path, ref: Path) -> str:
    """The round aggregated clients 0, 2 and 3 with client 2 recovered after its masked input,
    and the adapter and evaluations equal the seeded run's bit for bit. (Its training loss and
    step counts differ: the killed client 1 trained, the seeded one did not.) The ledgers differ
    by one message, whose bytes are the whole difference: the masked-input request to client
    1, which had trained (a seeded dropout has no reply, so it is never asked). Returns why
    client 1 is absent."""
    seeded = read_metrics(ref)[1]
    assert seeded["absent"] == {"1": "dropout"} and seeded["left_after_masking"] == [2]
    record = read_metrics(run)[1]
    assert record["aggregated"] == seeded["aggregated"] == [0, 2, 3]
    assert record["left_after_masking"] == [2] and "skipped" not in record
    assert list(record["absent"]) == ["1"]
    evaluated = ("accuracy", "macro_f1", "test_loss")
    for ours, theirs in zip(read_metrics(run), read_metrics(ref), strict=True):
        assert [ours[k] for k in evaluated] == [theirs[k] for k in evaluated]
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    rows = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    extra = {"round": 0, "sender": "server", "receiver": "client1", "kind": "secagg.shares"}
    asked = [r for r in rows if all(r.get(k) == v for k, v in extra.items())]
    assert len(asked) == 1, rows
    rows.remove(asked[0])
    assert rows == [json.loads(line) for line in (ref / "ledger.jsonl").read_text().splitlines()]
    assert record["bytes_up"] == seeded["bytes_up"]
    assert record["bytes_down"] == seeded["bytes_down"] + asked[0]["bytes"]
    return record["absent"]["1"]
