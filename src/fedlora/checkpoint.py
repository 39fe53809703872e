"""Round checkpoints: one safetensors file, replaced atomically after every completed round.

The file holds every tensor needed to continue (method state, each client's kept tensors and
optimizer state) and, in its JSON metadata, the completed round, the metrics so far and the
ledger. RNG state needs no saving: all randomness is derived from (seed, round, client).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TensorDict = dict[str, torch.Tensor]

FILE = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    completed_rounds: int
    method: TensorDict
    stores: dict[int, TensorDict]
    optimizers: dict[int, TensorDict]
    metrics: list[dict]
    ledger: list[dict]
    extra: dict = field(default_factory=dict)


def _flatten(checkpoint: Checkpoint) -> TensorDict:
    tensors: TensorDict = {f"method/{k}": v for k, v in checkpoint.method.items()}
    for group, per_client in (("store", checkpoint.stores), ("optim", checkpoint.optimizers)):
        for client, state in per_client.items():
            tensors.update({f"{group}/{client}/{k}": v for k, v in state.items()})
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    target = directory / FILE
    partial = directory / (FILE + ".partial")
    metadata = {
        "completed_rounds": str(checkpoint.completed_rounds),
        "metrics": json.dumps(checkpoint.metrics),
        "ledger": json.dumps(checkpoint.ledger),
        "extra": json.dumps(checkpoint.extra),
    }
    save_file(_flatten(checkpoint), str(partial), metadata=metadata)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, target)  # atomic: a reader sees the old or the new file, never half


def load_checkpoint(directory: Path) -> Checkpoint | None:
    path = directory / FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise ValueError(f"checkpoint {path} is unreadable: {error}") from None
    checkpoint = Checkpoint(
        completed_rounds=int(metadata["completed_rounds"]),
        method={},
        stores={},
        optimizers={},
        metrics=json.loads(metadata["metrics"]),
        ledger=json.loads(metadata["ledger"]),
        extra=json.loads(metadata.get("extra", "{}")),
    )
    for key, tensor in tensors.items():
        group, rest = key.split("/", 1)
        if group == "method":
            checkpoint.method[rest] = tensor
            continue
        client, name = rest.split("/", 1)
        target = checkpoint.stores if group == "store" else checkpoint.optimizers
        target.setdefault(int(client), {})[name] = tensor
    return checkpoint
