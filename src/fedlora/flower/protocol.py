"""What fedlora puts in a Flower message, in one place for both sides.

Every tensor travels as the channel's safetensors bytes inside a ``ConfigRecord`` (Flower
carries ``bytes`` values as they are), so the bytes Flower moves are the bytes the ledger
counts; nothing is pickled. Scalars travel as JSON text.

- ``query`` (server -> every node, once): the reply says which partition the node hosts.
- ``train`` (server -> the node hosting ``client``): the download, the merged base offset
  (FLoRA; empty otherwise). Reply: the reply bytes and the report of ``ClientRuntime.answer``.
- ``evaluate`` (server -> every node, methods with per-client models): the node's ``clients``
  (JSON), the round whose state to evaluate (the rounds completed) and the base offset. Reply:
  each client's own-model metrics (JSON, by client).
- ``query.secagg`` (server -> each node with clients in a step of secure aggregation's
  protocol): the step's ``kind``, the ``round``, the node's ``clients`` in it (JSON) and their
  messages (``payloads``: one frame each, ``join_frames``). Reply: each one's answer
  (``answers``, frames in the same order) and its host's report (``reports``, JSON). Under
  secure aggregation a ``train`` reply carries no bytes: the node's runtime keeps the reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config import ConfigError

RECORD = "fedlora"  # the one ConfigRecord of every fedlora message

# Run config keys (pyproject ``[tool.flwr.app.config]``, or ``flwr run --run-config``).
CONFIG_TEXT = "fedlora-config"  # the resolved fedlora config, as TOML text
RUN_DIR = "fedlora-run-dir"  # where the ServerApp writes the run directory
REPLY_TIMEOUT = "fedlora-reply-timeout"  # seconds a round waits for replies
NODE_WAIT = "fedlora-node-wait"  # seconds the ServerApp waits for every partition to connect
RUN_KEY = "fedlora-run-key"  # names the run's directory on the nodes, across Flower run ids
RESUME = "fedlora-resume"  # true: continue the run directory's checkpoint (flower-run --resume)

# Node config keys (``flower-supernode --node-config``).
PARTITION = "partition-id"
PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"  # where the node keeps its clients' state (default: ~/.fedlora/flower)

STATUS_FILE = "flower-status.json"  # in the run directory: how the ServerApp ended
SECAGG = "query.secagg"  # the message type of a secure aggregation step


def join_frames(frames: list[bytes]) -> bytes:
    """Byte strings as one: each as 8 bytes of length (big-endian), then its bytes."""
    return b"".join(len(frame).to_bytes(8, "big") + frame for frame in frames)


def split_frames(data: bytes, count: int) -> list[bytes]:
    """The ``count`` frames of ``join_frames``, exactly filling ``data``; ``ValueError``
    saying what is wrong otherwise."""
    frames, at = [], 0
    for _ in range(count):
        size = int.from_bytes(data[at : at + 8], "big") if at + 8 <= len(data) else -1
        if size < 0 or at + 8 + size > len(data):
            raise ValueError(f"{count} frames do not fit in {len(data)} bytes")
        frames.append(data[at + 8 : at + 8 + size])
        at += 8 + size
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes follow the {count} frames")
    return frames


@dataclass(frozen=True)
class Hosting:
    """A node's partition: it hosts clients c with c % partitions == partition."""

    partition: int
    partitions: int

    def hosts(self, client: int) -> bool:
        return client % self.partitions == self.partition

    def clients(self, count: int) -> list[int]:
        return [c for c in range(count) if self.hosts(c)]


def hosting(node_config: dict) -> Hosting:
    """The partition a node config names; a ``ConfigError`` saying what is wrong if not."""
    missing = [key for key in (PARTITION, PARTITIONS) if key not in node_config]
    if missing:
        raise ConfigError(
            f"the SuperNode's node config lacks {', '.join(missing)}: start it with "
            f'--node-config "{PARTITION}=P {PARTITIONS}=N" (P in 0..N-1)'
        )
    partition, partitions = node_config[PARTITION], node_config[PARTITIONS]
    if not (isinstance(partition, int) and isinstance(partitions, int)):
        raise ConfigError(f"{PARTITION} and {PARTITIONS} must be integers")
    if not 0 <= partition < partitions:
        raise ConfigError(f"{PARTITION} = {partition} is outside 0..{partitions - 1}")
    return Hosting(partition, partitions)
