"""Parties of another fedlora protocol are refused by name when they first meet: a Flower
SuperNode answering the ServerApp's query, a torch.distributed worker reading rank 0's opening
message (the node runtime's refusal of a ClientApp is in test_node_runtime)."""

from __future__ import annotations

import json

import pytest

from fedlora import __version__
from fedlora.compat import PROTOCOL, mismatch, stamp
from fedlora.engines.distributed import start_round
from fedlora.engines.transport import ProtocolError
from fedlora.flower.hosts import FlowerError, node_hosting
from fedlora.flower.protocol import Hosting

OTHER = {"protocol": PROTOCOL + 1, "fedlora": "9.9.9"}


def test_a_peer_of_the_same_protocol_is_accepted_and_another_is_named() -> None:
    assert stamp() == {"protocol": PROTOCOL, "fedlora": __version__}
    assert mismatch("rank 3", stamp()) is None
    why = mismatch("rank 3", OTHER)
    assert why is not None
    assert f"rank 3 runs fedlora 9.9.9 (message protocol {PROTOCOL + 1})" in why
    assert f"this process fedlora {__version__} (protocol {PROTOCOL})" in why
    assert "a fedlora that states no version (message protocol none)" in str(mismatch("x", {}))


def test_a_supernode_of_another_fedlora_is_refused_at_discovery() -> None:
    hosting = json.dumps({"partition": 1, "partitions": 3})
    ours = {"hosting": hosting, "fedlora": json.dumps(stamp())}
    assert node_hosting(7, ours) == Hosting(1, 3)
    with pytest.raises(FlowerError, match=r"SuperNode 7 runs fedlora 9\.9\.9"):
        node_hosting(7, {"hosting": hosting, "fedlora": json.dumps(OTHER)})
    with pytest.raises(FlowerError, match="SuperNode 7 runs a fedlora that states no version"):
        node_hosting(7, {"hosting": hosting})  # a node from before protocol versions
    with pytest.raises(FlowerError, match="malformed query reply"):
        node_hosting(7, {"fedlora": json.dumps(stamp())})


def test_a_worker_refuses_rank_0_of_another_fedlora() -> None:
    assert start_round({"start": 4, **stamp()}, 2) == 4
    with pytest.raises(ProtocolError, match=r"rank 2: rank 0 runs fedlora 9\.9\.9"):
        start_round({"start": 4, **OTHER}, 2)
    with pytest.raises(ProtocolError, match="rank 2: rank 0 runs a fedlora that states no"):
        start_round({"start": 4}, 2)
    with pytest.raises(ProtocolError, match="no start round"):
        start_round({"start": "4", **stamp()}, 2)
