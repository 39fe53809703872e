"""Round checkpoints: one safetensors file, replaced atomically after every completed round.

The file holds every tensor needed to continue (method state, each client's kept tensors and
optimizer state) and, in its JSON metadata, the completed round, the metrics so far, the ledger
and a SHA-256 of every tensor's name, dtype, shape and bytes, checked on load: a truncated,
bit-flipped or foreign file is refused with one clear ``CheckpointError``, never resumed from.
RNG state needs no saving: all randomness is derived from (seed, round, client).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedlora.config import ConfigError

TensorDict = dict[str, torch.Tensor]

FILE = "checkpoint.safetensors"
PARTIAL = FILE + ".partial"  # a save in progress; what a crash during one leaves behind
# The round before FILE's, kept by the ranks of a deployment run that are not rank 0: rank 0
# saves a round only after every other rank has, so it may lag them by one (``checkpoint_at``).
PREVIOUS = "checkpoint.previous.safetensors"
FORMAT = "fedlora-checkpoint-1"
GROUPS = ("method", "store", "optim")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: the message names the file and the problem."""


def digest(tensors: TensorDict, metadata: dict[str, str] | None = None) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes, in name order, and the
    metadata (metrics, ledger, round) except the digest itself."""
    hasher = hashlib.sha256()
    for key, value in sorted((metadata or {}).items()):
        if key != "sha256":
            hasher.update(f"{key}={value}|".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


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


def save_checkpoint(directory: Path, checkpoint: Checkpoint, keep_previous: bool = False) -> None:
    """Write ``checkpoint`` atomically; with ``keep_previous`` the checkpoint it replaces stays
    as PREVIOUS (a crash between the two renames leaves PREVIOUS alone, still a whole file)."""
    target = directory / FILE
    partial = directory / PARTIAL
    tensors = _flatten(checkpoint)
    metadata = {
        "format": FORMAT,
        "completed_rounds": str(checkpoint.completed_rounds),
        "metrics": json.dumps(checkpoint.metrics),
        "ledger": json.dumps(checkpoint.ledger),
        "extra": json.dumps(checkpoint.extra),
    }
    metadata["sha256"] = digest(tensors, metadata)
    save_file(tensors, str(partial), metadata=metadata)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    if keep_previous and target.is_file():
        os.replace(target, directory / PREVIOUS)
    os.replace(partial, target)  # atomic: a reader sees the old or the new file, never half


def load_checkpoint(directory: Path, name: str = FILE) -> Checkpoint | None:
    """The last completed round's state, verified; None if there is no checkpoint."""
    path = directory / name
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or not a safetensors file): {error}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fedlora checkpoint ({FORMAT})")
    if digest(tensors, metadata) != metadata.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its content hash does not match the one saved "
            "with it (flipped bits or a partial copy); delete the run or restore the file"
        )
    try:
        checkpoint = Checkpoint(
            completed_rounds=int(metadata["completed_rounds"]),
            method={},
            stores={},
            optimizers={},
            metrics=json.loads(metadata["metrics"]),
            ledger=json.loads(metadata["ledger"]),
            extra=json.loads(metadata.get("extra", "{}")),
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has malformed metadata: {error}") from None
    for key, tensor in tensors.items():
        group, _, rest = key.partition("/")
        if group not in GROUPS or not rest:
            raise CheckpointError(
                f"checkpoint {path}: key {key!r} is under an unknown group (expected "
                f"{', '.join(g + '/' for g in GROUPS)})"
            )
        if group == "method":
            checkpoint.method[rest] = tensor
            continue
        client, _, name = rest.partition("/")
        if not client.isdigit() or not name:
            raise CheckpointError(f"checkpoint {path}: key {key!r} names no client")
        target = checkpoint.stores if group == "store" else checkpoint.optimizers
        target.setdefault(int(client), {})[name] = tensor
    return checkpoint


def checkpoint_at(directory: Path, completed: int) -> Checkpoint:
    """The checkpoint in ``directory`` (FILE, else PREVIOUS) after ``completed`` rounds."""
    found = []
    for name in (FILE, PREVIOUS):
        checkpoint = load_checkpoint(directory, name)
        if checkpoint is not None and checkpoint.completed_rounds == completed:
            return checkpoint
        if checkpoint is not None:
            found.append(f"{name} after round {checkpoint.completed_rounds}")
    raise CheckpointError(
        f"--resume: {directory} holds no checkpoint after round {completed}, where the run "
        f"resumes ({', '.join(found) or 'no checkpoint at all'})"
    )


def remove_partial(directory: Path) -> None:
    """A save that a crash interrupted left a partial file; the last complete checkpoint is
    intact beside it (``os.replace`` is atomic), so the partial one is dropped."""
    (directory / PARTIAL).unlink(missing_ok=True)


def check_fits(path: Path, saved: TensorDict, fresh: TensorDict, what: str) -> None:
    """Tensors of a checkpoint that the configured run also has must match it in shape and
    dtype (a checkpoint of another model or rank is refused, not loaded)."""
    for name in sorted(saved.keys() & fresh.keys()):
        got, want = saved[name], fresh[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint {path}: {what} {name!r} is {got.dtype} {list(got.shape)}, the "
                f"configured run has {want.dtype} {list(want.shape)} (another model or config?)"
            )
