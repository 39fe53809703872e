"""The one place tensors cross between parties: serialise, count, decode, validate.

In simulation the bytes are real too, so the ledger holds the number a deployment would see.
Messages are safetensors bytes, never pickle. Compression codecs plug in here as ``Codec``s.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

if TYPE_CHECKING:
    from fedlora.codecs import Codec

TensorDict = dict[str, torch.Tensor]


class MessageError(ValueError):
    """A message from another party that is malformed or does not fit what was expected."""


@dataclass(frozen=True)
class Transfer:
    round: int
    sender: str
    receiver: str
    bytes: int
    tensors: int


class Ledger:
    """Bytes actually sent, per round, sender and receiver."""

    def __init__(self, records: list[Transfer] | None = None) -> None:
        self.records: list[Transfer] = list(records or [])

    def add(self, record: Transfer) -> None:
        self.records.append(record)

    def total(self, direction: str | None = None, round_index: int | None = None) -> int:
        """Bytes sent, in one round or all; ``up`` = to the server, ``down`` = by it."""
        records = [r for r in self.records if round_index is None or r.round == round_index]
        if direction == "up":
            return sum(r.bytes for r in records if r.receiver == "server")
        if direction == "down":
            return sum(r.bytes for r in records if r.sender == "server")
        return sum(r.bytes for r in records)

    def through_round(self, round_index: int) -> int:
        return sum(r.bytes for r in self.records if r.round <= round_index)

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    @classmethod
    def from_json(cls, rows: list[dict]) -> Ledger:
        return cls([Transfer(**row) for row in rows])

    def write_jsonl(self, path: Path) -> None:
        path.write_text("".join(json.dumps(row) + "\n" for row in self.to_json()))


HALF = (torch.bfloat16, torch.float16)


def on_the_wire(tensor: torch.Tensor) -> torch.Tensor:
    """What leaves a party: a CPU tensor, and float32 where the party computed in half
    precision (bytes on the wire never depend on a party's device or compute dtype)."""
    tensor = tensor.detach()
    if tensor.dtype in HALF:
        tensor = tensor.float()
    return tensor.to("cpu").contiguous()


def encode(tensors: TensorDict) -> bytes:
    return save_bytes({k: on_the_wire(v) for k, v in tensors.items()})


def decode(
    payload: bytes, expect: dict[str, tuple[int, ...]] | None = None, codec: Codec | None = None
) -> TensorDict:
    """Bytes -> tensors, refusing anything that is not a well-formed float message of the
    expected keys and shapes."""
    try:
        tensors = load_bytes(payload)
    except (SafetensorError, ValueError) as error:
        raise MessageError(f"message is not valid safetensors: {error}") from None
    if codec is not None:
        tensors = codec.decode(tensors)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise MessageError(f"tensor {name!r} has dtype {tensor.dtype}; expected a float tensor")
        if not torch.isfinite(tensor).all():
            raise MessageError(f"tensor {name!r} contains NaN or infinite values")
    if expect is not None:
        missing = sorted(set(expect) - set(tensors))
        extra = sorted(set(tensors) - set(expect))
        if missing or extra:
            raise MessageError(
                f"message keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, shape in expect.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise MessageError(
                    f"tensor {name!r} has shape {list(tensors[name].shape)}; expected {list(shape)}"
                )
    return tensors


class Channel:
    """Carries tensor dicts between named parties and records every transfer in the ledger."""

    def __init__(self, ledger: Ledger | None = None, codec: Codec | None = None) -> None:
        self.ledger = ledger or Ledger()
        self.codec = codec  # None: exact float messages; else compressed before counting

    def send(
        self,
        tensors: TensorDict,
        sender: str,
        receiver: str,
        round_index: int,
        expect: dict[str, tuple[int, ...]] | None = None,
    ) -> TensorDict:
        if not tensors:
            return {}
        payload = self.pack(tensors, sender, round_index)
        self.ledger.add(Transfer(round_index, sender, receiver, len(payload), len(tensors)))
        return self.unpack(payload, expect)

    # ``send`` in two halves, for engines whose parties live in different processes: the sender
    # packs, the bytes travel, the receiver unpacks; whoever keeps the ledger records the transfer.
    def pack(self, tensors: TensorDict, sender: str, round_index: int) -> bytes:
        """The bytes that cross the boundary: the codec's wire form, as safetensors."""
        wire = tensors if self.codec is None else self.codec.encode(tensors, round_index, sender)
        return encode(wire)

    def unpack(
        self, payload: bytes, expect: dict[str, tuple[int, ...]] | None = None
    ) -> TensorDict:
        """Bytes from ``pack`` -> validated tensors (decoded by the codec if there is one)."""
        return decode(payload, expect, self.codec)


def human_bytes(count: float) -> str:
    if count <= 0:
        return "0 B"
    units = ["B", "KB", "MB", "GB", "TB"]
    power = min(int(math.log(count, 1000)), len(units) - 1)
    return f"{count / 1000**power:.3g} {units[power]}"
