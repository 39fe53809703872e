"""Secure aggregation between a server round and the hosts that keep the replies
(``fedlora.engines.masking``, the ranks' and SuperNodes' ends): what crosses a process boundary
is checked where it lands. A host refuses the server's malformed or out-of-order messages with
the reason (the client drops at that step), a server refuses a host's report or frames outside
the protocol, a node's runtime refuses a masking request outside the protocol; none is a
traceback. The protocol itself is tests/test_secure_aggregation.py's; whole runs across
processes are tests/test_secure_aggregation_processes.py's and tests/test_flower.py's.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.common import Error

from fedlora.channel import Channel
from fedlora.config import load_config
from fedlora.engines.masking import MaskingClients, host_report, secure_aggregation
from fedlora.engines.server_round import round_weights
from fedlora.experiment import build
from fedlora.flower.hosts import node_answers
from fedlora.flower.node_runtime import SECRET, ask
from fedlora.flower.protocol import join_frames, split_frames
from fedlora.privacy.secagg import ADVERT_SCHEMA
from tests.conftest import TINY
from tests.test_node_runtime import served  # noqa: F401 (a fixture)

SECURE = ["privacy.secure_aggregation=true", "compute.threads=1"]


@pytest.fixture(scope="module")
def hosts() -> MaskingClients:
    """Client 0's and 1's replies held on a host of the tiny FedIT experiment, round 0."""
    exp = build(load_config(TINY / "fedit.toml", SECURE))
    secure = secure_aggregation(exp)
    assert secure is not None
    clients = MaskingClients(exp, secure, lambda r: round_weights(exp, r))
    sent = exp.method.server_message(0, 0)
    for client in (0, 1):
        reply = {k: v + 0.01 * (client + 1) for k, v in sent.items()}
        clients.hold(client, reply, sent, 0)
    return clients


def test_a_host_answers_in_order_and_refuses_what_is_outside_the_protocol(
    hosts: MaskingClients,
) -> None:
    channel = Channel()
    # before the run's opening message, nothing is answered
    answer, report = hosts.respond(0, 0, "roster", b"")
    assert answer == b"" and "no protocol run of round 0" in report["failed"]
    # the opening message: fresh public keys, in the advertised schema
    answer, report = hosts.respond(0, 0, "begin", b"")
    assert report == {}
    keys = channel.unpack(answer, ADVERT_SCHEMA, torch.uint8)
    assert {k: tuple(v.shape) for k, v in keys.items()} == {"cipher_key": (32,), "mask_key": (32,)}
    # a roster of random bytes does not decode: refused, with why
    answer, report = hosts.respond(0, 0, "roster", secrets.token_bytes(64))
    assert answer == b"" and report["refused"]
    # a roster that decodes but leaves this client out breaks the protocol: failed, with why
    roster = {
        "clients": torch.tensor([[2, 0, 0, 0], [3, 0, 0, 0]], dtype=torch.uint8),
        "cipher_keys": torch.zeros(2, 32, dtype=torch.uint8),
        "mask_keys": torch.zeros(2, 32, dtype=torch.uint8),
    }
    answer, report = hosts.respond(0, 0, "roster", channel.pack(roster, "server", 0))
    assert answer == b"" and "this one among them" in report["failed"]
    # an empty message where the protocol expects content is refused, not read
    answer, report = hosts.respond(0, 0, "survivors", b"")
    assert answer == b"" and "an empty 'survivors' message" in report["refused"]
    # a message of an earlier round finds no run
    assert "no protocol run of round 5" in hosts.respond(0, 5, "survivors", b"")[1]["failed"]


def test_host_reports_outside_the_protocol_are_refused() -> None:
    for good in ({}, {"refused": "why"}, {"failed": "why"}, {"gone": True}):
        assert host_report(good) == good
    for bad in ([], "x", {"outcome": 1}, {"refused": 3}, {"gone": False}, {"gone": "yes"}):
        with pytest.raises(ValueError, match="masking report"):
            host_report(bad)


def test_frames_split_exactly_or_say_why() -> None:
    frames = [b"", b"abc", secrets.token_bytes(300)]
    joined = join_frames(frames)
    assert split_frames(joined, 3) == frames
    assert len(joined) == sum(8 + len(f) for f in frames)  # 8 bytes of length each
    with pytest.raises(ValueError, match="do not fit"):
        split_frames(joined[:-1], 3)
    with pytest.raises(ValueError, match="follow the 2 frames"):
        split_frames(joined, 2)
    with pytest.raises(ValueError, match="do not fit"):
        split_frames((1 << 40).to_bytes(8, "big"), 1)  # announces more than there is


def reply(**fields: object) -> Message:
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="m",
        group_id="0", created_at=0.0, ttl=60.0, message_type="query.secagg",
    )  # fmt: skip
    return Message(metadata=metadata, content=RecordDict({"fedlora": ConfigRecord(fields)}))


def test_a_nodes_answers_are_read_only_when_they_fit_the_protocol() -> None:
    ok = reply(answers=join_frames([b"x", b""]), reports=json.dumps([{}, {"gone": True}]))
    assert node_answers(7, [0, 2], ok, 60) == {0: (b"x", {}), 2: (b"", {"gone": True})}
    two = join_frames([b"", b""])
    failed = Message(metadata=ok.metadata, error=Error(code=0, reason="boom"))
    cases = {
        "no answer from SuperNode 7 within 60 s": None,
        "SuperNode 7 failed: boom": failed,
        "malformed answer: '.*answers": reply(reports="[]"),
        "malformed answer: 2 reports expected": reply(answers=two, reports="[]"),
        "malformed answer: .*do not fit": reply(answers=b"\x00", reports="[{}, {}]"),
        "malformed answer: .*masking report": reply(
            answers=two, reports=json.dumps([{}, {"outcome": 0}])
        ),
        "malformed answer: Expecting value": reply(answers=two, reports="not json"),
    }
    for why, message in cases.items():
        with pytest.raises(ValueError, match=why):
            node_answers(7, [0, 2], message, 60)


def test_a_node_runtime_refuses_mask_requests_outside_the_protocol(
    served: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    from fedlora.flower.app_dir import config_text

    header = {"op": "mask", "clients": [0], "round": 0, "directory": str(tmp_path / "run")}
    plain = config_text(load_config(TINY / "fedit.toml", ["compute.threads=1"]))
    secure = config_text(load_config(TINY / "fedit.toml", SECURE))
    with pytest.raises(RuntimeError, match="needs secure aggregation"):
        ask(served, {**header, "kind": "begin"}, plain, join_frames([b""]), b"", 600)
    with pytest.raises(RuntimeError, match="a kind of"):
        ask(served, {**header, "kind": "teardown"}, secure, join_frames([b""]), b"", 600)
    with pytest.raises(RuntimeError, match="the step's messages"):
        ask(served, {**header, "kind": "begin"}, secure, b"\x01", b"", 600)
    answer, frames = ask(served, {**header, "kind": "begin"}, secure, join_frames([b""]), b"", 600)
    assert answer == {"reports": [{}]} and len(split_frames(frames, 1)[0]) > 64  # its keys
    assert (served / SECRET).exists()
