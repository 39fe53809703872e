"""Every frame a rank received, decoded for the deployment tests without fedlora's own code.

A launched run with ``FEDLORA_RECORD_FRAMES=DIR`` leaves ``DIR/frames-rank<k>.bin``: for each
frame rank k received, 4 bytes of sender rank, 8 of length (big-endian), then the frame. A
frame is one of three things, told apart here with only ``json`` and ``safetensors``:

- a control record: JSON text of an object;
- a DLoRA message: 4 bytes of header length, a JSON header with ``kind``, then a payload that
  is empty or safetensors;
- tensors: safetensors bytes (a channel message, or a client's state sent to an observer).

Anything else fails the decoding, so no frame can escape the tests' accounting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load


@dataclass(frozen=True)
class Frame:
    sender: int
    kind: str  # "empty", "control", "dlora" or "tensors"
    header: dict = field(default_factory=dict)  # the control record, or the DLoRA header
    keys: tuple[str, ...] = ()  # the names of the tensors it carried


def _json_object(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def decode(sender: int, frame: bytes) -> Frame:
    if not frame:
        return Frame(sender, "empty")
    record = _json_object(frame)
    if record is not None:
        return Frame(sender, "control", record)
    size = int.from_bytes(frame[:4], "big")
    header = _json_object(frame[4 : 4 + size]) if 4 + size <= len(frame) else None
    if header is not None and "kind" in header:
        payload = frame[4 + size :]
        return Frame(sender, "dlora", header, tuple(sorted(load(payload))) if payload else ())
    return Frame(sender, "tensors", keys=tuple(sorted(load(frame))))


def received(directory: Path, rank: int) -> list[Frame]:
    """Every frame ``rank`` received, in order, decoded."""
    data = (directory / f"frames-rank{rank}.bin").read_bytes()
    frames, at = [], 0
    while at < len(data):
        sender = int.from_bytes(data[at : at + 4], "big")
        size = int.from_bytes(data[at + 4 : at + 12], "big")
        frames.append(decode(sender, data[at + 12 : at + 12 + size]))
        at += 12 + size
    assert at == len(data), "a truncated record"
    return frames


def tensor_keys(frames: list[Frame]) -> set[str]:
    """The name of every tensor in every frame."""
    return {key for frame in frames for key in frame.keys}
