"""Which rank hosts which client, where each rank keeps its files, and what a checkpoint says
about the placement that wrote it.

In a deployment run (``--engine distributed`` without ``--observer``) no process holds every
client's state, so a checkpoint is one file per rank: rank 0's in the run directory, rank k's
in ``<out>/rank<k>/``. A rank's file can only be resumed by the same rank of the same placement
(the same number of processes dealing the same clients), so each file records it, and a
resume that does not match is refused by name instead of continuing with a client's state
missing. Files of an in-process or ``--observer`` run hold every client in one file and record
no placement; the two kinds are not interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora.checkpoint import CheckpointError

LAYOUT = "layout"  # key of the placement in a checkpoint's ``extra``


@dataclass(frozen=True)
class Placement:
    """Which rank hosts which client: round-robin over ranks 1..N-1 when rank 0 is the server
    (or the cloud), over all ranks when there is none (gossip)."""

    clients: int
    world: int
    rank0_hosts: bool

    def owner(self, client: int) -> int:
        if self.rank0_hosts:
            return client % self.world
        return 1 + client % (self.world - 1)

    def hosted(self, rank: int) -> list[int]:
        return [c for c in range(self.clients) if self.owner(c) == rank]

    def workers(self) -> list[int]:
        """The ranks other than 0 that host clients (the ones rank 0 talks to)."""
        return [r for r in range(1, self.world) if self.hosted(r)]

    def idle(self) -> list[int]:
        return [r for r in range(1, self.world) if not self.hosted(r)]

    def describe(self) -> str:
        """``3 processes (rank 1: clients 0, 2; rank 2: clients 1, 3)``, for messages."""
        hosts = [r for r in range(self.world) if self.hosted(r)]
        dealt = "; ".join(f"rank {r}: clients {', '.join(map(str, self.hosted(r)))}" for r in hosts)
        return f"{self.world} processes ({dealt})"

    def layout(self, rank: int) -> dict:
        """What rank ``rank``'s checkpoint records of the placement."""
        return {"world": self.world, "rank": rank, "clients": self.hosted(rank)}


def rank_dir(out: Path, rank: int) -> Path:
    """Where a rank of a deployment run keeps its checkpoint and files: rank 0 (the server,
    the cloud, the metrics' writer) the run directory itself, rank k ``<out>/rank<k>``."""
    return out if rank == 0 else out / f"rank{rank}"


def saved_layout(path: Path, extra: dict) -> dict | None:
    """The placement a checkpoint recorded (None: one file for every client), checked for form."""
    saved = extra.get(LAYOUT)
    if saved is None:
        return None
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("world"), int)
        and isinstance(saved.get("rank"), int)
        and isinstance(saved.get("clients"), list)
    ):
        raise CheckpointError(f"checkpoint {path}: malformed placement record {saved!r}")
    return saved


def refuse_deployment(path: Path, extra: dict) -> None:
    """For engines that keep every client in one file (in-process, ``--observer``): a
    deployment rank's checkpoint holds only its own clients, so it cannot be resumed here."""
    saved = saved_layout(path, extra)
    if saved is not None:
        raise CheckpointError(
            f"checkpoint {path} was written by a deployment run on {saved['world']} processes, "
            "each keeping its own clients' state in its own directory; resume it with "
            f"--engine distributed --nproc {saved['world']} (without --observer)"
        )


def check_deployment(path: Path, extra: dict, placement: Placement, rank: int) -> None:
    """A deployment rank resumes only a checkpoint that the same rank of the same placement
    wrote; anything else is refused, naming both placements."""
    saved = saved_layout(path, extra)
    if saved is None:
        raise CheckpointError(
            f"checkpoint {path} holds every client's state in one file (an in-process or "
            "--observer run); resume it with --observer, or with --engine simulation"
        )
    if saved != placement.layout(rank):
        before = Placement(placement.clients, saved["world"], placement.rank0_hosts)
        raise CheckpointError(
            f"--resume: checkpoint {path} was written by rank {saved['rank']} of a run on "
            f"{before.describe()}; this is rank {rank} of {placement.describe()}. Each rank "
            f"resumes from its own files: run with --nproc {saved['world']}"
        )
