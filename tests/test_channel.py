"""The channel: real safetensors bytes, counted as sent, validated on receipt."""

from __future__ import annotations

import pytest
import torch

from fedlora.channel import Channel, MessageError, decode, encode


def test_round_trip_counts_the_serialized_bytes() -> None:
    channel = Channel()
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7)}
    received = channel.send(tensors, "server", "client0", round_index=0)
    assert set(received) == {"a", "b"}
    assert torch.equal(received["a"], tensors["a"]) and torch.equal(received["b"], tensors["b"])
    (record,) = channel.ledger.records
    assert record.bytes == len(encode(tensors))
    # The payload is the tensors' raw bytes plus a small JSON header, never less.
    assert record.bytes >= (15 + 7) * 4
    assert channel.ledger.total("down") == record.bytes and channel.ledger.total("up") == 0


def test_empty_message_is_not_sent() -> None:
    channel = Channel()
    assert channel.send({}, "server", "client0", 0) == {}
    assert channel.ledger.total() == 0


@pytest.mark.parametrize(
    ("tensors", "expect", "fragment"),
    [
        ({"a": torch.tensor([1.0, float("nan")])}, None, "NaN"),
        ({"a": torch.tensor([1, 2])}, None, "float"),
        ({"a": torch.zeros(2, 2)}, {"a": (2, 3)}, "shape"),
        ({"a": torch.zeros(2)}, {"b": (2,)}, "keys"),
    ],
)
def test_decode_rejects_bad_messages(tensors, expect, fragment) -> None:
    with pytest.raises(MessageError, match=fragment):
        decode(encode(tensors), expect)


def test_decode_rejects_garbage_bytes() -> None:
    with pytest.raises(MessageError, match="safetensors"):
        decode(b"\x00\x01not a message")
