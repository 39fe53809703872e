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

from safetensors import SafetensorError

from fedlora.lazy import torch
from fedlora.tensors import TensorDict

if TYPE_CHECKING:
    from fedlora.codecs import Codec

# What a receiver expects: tensor name -> shape, a None dimension matching any size.
Schema = dict[str, tuple[int | None, ...]]


def schema_of(tensors: TensorDict) -> Schema:
    return {name: tuple(t.shape) for name, t in tensors.items()}


class MessageError(ValueError):
    """A message from another party that is malformed or does not fit what was expected."""


@dataclass(frozen=True)
class Transfer:
    round: int
    sender: str
    receiver: str
    bytes: int
    tensors: int
    rejected: str = ""  # why the receiver refused the message ("" = accepted)
    kind: str = ""  # what the message is, where a party sends several kinds ("" = the default)


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

    def totals(self) -> dict[str, int]:
        """The whole run's bytes: to the server, from it, and in all (peer-to-peer included)."""
        return {
            "total_bytes_up": self.total("up"),
            "total_bytes_down": self.total("down"),
            "total_bytes": self.total(),
        }

    def through_round(self, round_index: int) -> int:
        return sum(r.bytes for r in self.records if r.round <= round_index)

    def to_json(self) -> list[dict]:
        return [
            {k: v for k, v in asdict(r).items() if k not in ("rejected", "kind") or v}
            for r in self.records
        ]

    def rejections(self, round_index: int | None = None) -> list[Transfer]:
        return [
            r
            for r in self.records
            if r.rejected and (round_index is None or r.round == round_index)
        ]

    @classmethod
    def from_json(cls, rows: list[dict]) -> Ledger:
        return cls([Transfer(**row) for row in rows])

    def write_jsonl(self, path: Path) -> None:
        path.write_text("".join(json.dumps(row) + "\n" for row in self.to_json()))


def on_the_wire(tensor: torch.Tensor) -> torch.Tensor:
    """What leaves a party: a CPU tensor, and float32 where the party computed in half
    precision (bytes on the wire never depend on a party's device or compute dtype)."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.to("cpu").contiguous()


def encode(tensors: TensorDict) -> bytes:
    from safetensors.torch import save as save_bytes  # it reads torch.* at import: lazily

    return save_bytes({k: on_the_wire(v) for k, v in tensors.items()})


def fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(
        want is None or got == want for got, want in zip(shape, expected, strict=True)
    )


def decode(
    payload: bytes,
    expect: Schema | None = None,
    codec: Codec | None = None,
    limit: int | None = None,
    dtype: torch.dtype | None = None,
) -> TensorDict:
    """Bytes -> tensors, refusing anything that is not a well-formed message of ``dtype``
    tensors (None or float32: model tensors, finite; uint8: bytes such as keys and
    ciphertexts) of the expected keys and shapes, at most ``limit`` bytes long."""
    from safetensors.torch import load as load_bytes  # it reads torch.* at import: lazily

    dtype = torch.float32 if dtype is None else dtype
    if limit is not None and len(payload) > limit:
        raise MessageError(f"message of {len(payload)} bytes exceeds the limit of {limit}")
    try:
        tensors = load_bytes(payload)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as error:
        raise MessageError(f"message is not valid safetensors: {error}") from None
    if codec is not None:
        try:
            tensors = codec.decode(tensors)
        except MessageError:
            raise
        except (ValueError, TypeError, RuntimeError, IndexError, OverflowError) as error:
            raise MessageError(f"message does not decode: {error}") from None
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            expected = str(dtype).removeprefix("torch.")
            raise MessageError(f"tensor {name!r} has dtype {tensor.dtype}; expected {expected}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MessageError(f"tensor {name!r} contains NaN or infinite values")
    if expect is not None:
        missing = sorted(set(expect) - set(tensors))
        extra = sorted(set(tensors) - set(expect))
        if missing or extra:
            raise MessageError(
                f"message keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, shape in expect.items():
            if not fits(tuple(tensors[name].shape), shape):
                raise MessageError(
                    f"tensor {name!r} has shape {list(tensors[name].shape)}; expected {list(shape)}"
                )
    return tensors


class Channel:
    """Carries tensor dicts between named parties and records every transfer in the ledger,
    with the receiver's reason when it refused one."""

    def __init__(
        self, ledger: Ledger | None = None, codec: Codec | None = None, limit: int | None = None
    ) -> None:
        self.ledger = ledger or Ledger()
        self.codec = codec  # None: exact float messages; else compressed before counting
        self.limit = limit  # the largest message a receiver accepts, in bytes

    def send(
        self,
        tensors: TensorDict,
        sender: str,
        receiver: str,
        round_index: int,
        expect: Schema | None = None,
        dtype: torch.dtype | None = None,
        kind: str = "",
    ) -> TensorDict:
        """Pack, count and deliver; a message the receiver refuses raises ``MessageError``
        after its transfer is recorded with the reason. ``dtype``: what its tensors must be;
        ``kind``: the ledger's name for it."""
        if not tensors:
            return {}
        payload = self.pack(tensors, sender, round_index)
        return self.receive(payload, sender, receiver, round_index, expect, dtype, kind)

    # ``send`` in two halves, for engines whose parties live in different processes: the sender
    # packs, the bytes travel, the receiver unpacks; whoever keeps the ledger records the transfer.
    def pack(self, tensors: TensorDict, sender: str, round_index: int) -> bytes:
        """The bytes that cross the boundary: the codec's wire form, as safetensors."""
        wire = tensors if self.codec is None else self.codec.encode(tensors, round_index, sender)
        return encode(wire)

    def unpack(
        self, payload: bytes, expect: Schema | None = None, dtype: torch.dtype | None = None
    ) -> TensorDict:
        """Bytes from ``pack`` -> validated tensors (decoded by the codec if there is one)."""
        return decode(payload, expect, self.codec, self.limit, dtype)

    def receive(
        self,
        payload: bytes,
        sender: str,
        receiver: str,
        round_index: int,
        expect: Schema | None,
        dtype: torch.dtype | None = None,
        kind: str = "",
    ) -> TensorDict:
        """Record the transfer of ``payload`` and unpack it; a refused message is recorded with
        the reason, then ``MessageError`` is raised for the caller to leave it out."""
        size = len(payload)
        try:
            tensors = self.unpack(payload, expect, dtype)
        except MessageError as error:
            self.ledger.add(Transfer(round_index, sender, receiver, size, 0, str(error), kind))
            raise
        self.ledger.add(Transfer(round_index, sender, receiver, size, len(tensors), kind=kind))
        return tensors


def human_bytes(count: float) -> str:
    if count <= 0:
        return "0 B"
    units = ["B", "KB", "MB", "GB", "TB"]
    power = min(int(math.log(count, 1000)), len(units) - 1)
    return f"{count / 1000**power:.3g} {units[power]}"
