"""Bytes between ranks over torch.distributed point-to-point: a length, then the bytes.

Everything the distributed engine moves is bytes: channel messages (safetensors, already
counted by the channel), process-internal state (client stores and optimizer states, also
safetensors) and small JSON control records. Nothing is pickled, so the torch.distributed
object collectives (``send_object_list`` and friends) are never used.

A failed exchange (a peer that died, a timeout) becomes a ``PeerError`` naming both ranks, so
the error a user sees says which process was lost.

Every frame a rank receives passes through ``_receive``. With ``FEDLORA_RECORD_FRAMES`` set to
a directory, each rank appends every frame it receives there (``frames-rank<k>.bin``: 4 bytes
of sender rank, 8 of length, then the frame, big-endian), so an audit (the deployment tests)
can decode, independently of this code, everything a process was ever sent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from fedlora.channel import encode
from fedlora.tensors import TensorDict

# Ranks a launcher started: torchrun and ``fedlora run --engine distributed`` both set these.
ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerError(RuntimeError):
    """Another rank stopped answering: it died, or it waited longer than the timeout."""


class ProtocolError(PeerError):
    """Another rank sent something outside the protocol: an oversized or malformed frame, or a
    message this rank did not expect at this point."""


# The largest frame a rank accepts from a peer (``federation.max_message_bytes``, set when the
# run's config is known); a peer announcing more is refused before anything is allocated.
_limits = {"bytes": 16 * 2**30}


def set_limit(max_bytes: int) -> None:
    _limits["bytes"] = max_bytes


def launched() -> bool:
    """Whether this process is one rank of a launched group (the environment says so)."""
    return all(name in os.environ for name in ENVIRONMENT)


def device() -> torch.device:
    """Where byte tensors live for the backend: CPU for gloo, the local GPU for nccl."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def connect(timeout: timedelta, backend: str = "gloo") -> None:
    """Join the group the environment describes over ``backend`` (nccl between ranks with a GPU
    each, by ``LOCAL_RANK``; gloo otherwise). ``timeout`` bounds every wait on a peer."""
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(device())


def _failed(peer: int | None, error: Exception) -> PeerError:
    who = "any rank" if peer is None else f"rank {peer}"
    return PeerError(f"rank {dist.get_rank()}: exchange with {who} failed ({error})")


class Sends:
    """Non-blocking sends in flight; their buffers stay referenced until ``wait``."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, dist.Work, torch.Tensor]] = []

    def bytes(self, payload: bytes, peer: int) -> None:
        for tensor in _framed(payload):
            self._pending.append((peer, dist.isend(tensor, peer), tensor))

    def wait(self, reach: Callable[[int, Callable[[], object]], object] | None = None) -> None:
        """Until every send is done; a failed one raises, or goes to ``reach`` (a peer's
        exchange, as ``RankParty.reach`` runs it: it may let a lost peer go)."""
        for peer, work, _ in self._pending:
            if reach is None:
                _wait(peer, work)
            else:
                reach(peer, partial(_wait, peer, work))
        self._pending.clear()


def _wait(peer: int, work: dist.Work) -> None:
    try:
        work.wait()
    except RuntimeError as error:
        raise _failed(peer, error) from None


def _framed(payload: bytes) -> list[torch.Tensor]:
    """The tensors that carry ``payload``: its length, then its bytes (if any)."""
    where = device()
    length = torch.tensor([len(payload)], dtype=torch.int64, device=where)
    if not payload:
        return [length]
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(where)
    return [length, data]


def send_bytes(payload: bytes, peer: int) -> None:
    try:
        for tensor in _framed(payload):
            dist.send(tensor, peer)
    except RuntimeError as error:
        raise _failed(peer, error) from None


RECORD = "FEDLORA_RECORD_FRAMES"  # a directory: record every received frame there (audits)


def _record(peer: int, payload: bytes) -> None:
    folder = os.environ.get(RECORD)
    if folder:
        with open(Path(folder) / f"frames-rank{dist.get_rank()}.bin", "ab") as handle:
            handle.write(peer.to_bytes(4, "big") + len(payload).to_bytes(8, "big") + payload)


def _receive(peer: int | None) -> tuple[int, bytes]:
    """The next frame from ``peer`` (None: from whichever peer sends first) and its sender."""
    where = device()
    try:
        length = torch.zeros(1, dtype=torch.int64, device=where)
        sender = dist.recv(length, peer)
        size = int(length)
        if size == 0:
            _record(sender, b"")
            return sender, b""
        if not 0 < size <= _limits["bytes"]:
            raise ProtocolError(
                f"rank {dist.get_rank()}: rank {sender} announced a message of {size} bytes; the "
                f"limit is {_limits['bytes']} (federation.max_message_bytes)"
            )
        data = torch.empty(size, dtype=torch.uint8, device=where)
        dist.recv(data, sender)
    except ProtocolError:
        raise
    except RuntimeError as error:
        raise _failed(peer, error) from None
    payload = data.cpu().numpy().tobytes()
    _record(sender, payload)
    return sender, payload


def recv_bytes(peer: int) -> bytes:
    return _receive(peer)[1]


def recv_any() -> tuple[int, bytes]:
    """The next frame from any peer, and who sent it: a server that several processes share
    serves them in the order they ask (gloo only; nccl cannot receive from any source)."""
    return _receive(None)


def send_json(record: dict, peer: int) -> None:
    send_bytes(json.dumps(record).encode(), peer)


def recv_json(peer: int) -> dict:
    payload = recv_bytes(peer)
    try:
        record = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(
            f"rank {dist.get_rank()}: rank {peer} sent a malformed control record: {error}"
        ) from None
    if not isinstance(record, dict):
        raise ProtocolError(f"rank {dist.get_rank()}: rank {peer} sent {type(record).__name__}")
    return record


def send_tensors(tensors: TensorDict, peer: int) -> None:
    """Process-internal state between our own ranks (client stores, optimizer states, the
    observer's copies): not a message between parties, so no codec, no ledger, no validation."""
    send_bytes(encode(tensors) if tensors else b"", peer)


def recv_tensors(peer: int) -> TensorDict:
    payload = recv_bytes(peer)
    try:
        return load_bytes(payload) if payload else {}
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ProtocolError(
            f"rank {dist.get_rank()}: rank {peer} sent state that is not safetensors: {error}"
        ) from None
