"""A SuperNode's warm runtime (``fedlora.flower.node_runtime``) without Flower: its socket and
secret are the owner's alone, a request without the secret or outside the protocol is refused
with the reason, and its answers are the cold path's, byte for byte (the Flower runs through it
are in ``test_flower``)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
import torch

from fedlora.compat import PROTOCOL, stamp
from fedlora.config import load_config
from fedlora.flower import node_runtime
from fedlora.flower.app_dir import config_text
from fedlora.flower.node_runtime import (
    SECRET,
    SOCKET,
    NodeRuntime,
    RuntimeAbsent,
    ask,
    recv_frames,
    send_frames,
)
from tests.conftest import TINY


@pytest.fixture
def served(tmp_path: Path):
    """A runtime serving ``tmp_path/node`` in a thread of this process, with a small limit."""
    root = tmp_path / "node"
    runtime = NodeRuntime(root, limit=1 << 20)
    listener = runtime.prepare()
    thread = threading.Thread(target=runtime.serve, args=(listener,), daemon=True)
    thread.start()
    yield root
    listener.close()


def raw(root: Path, *frames: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(30)
        connection.connect(str(root / SOCKET))
        send_frames(connection, *frames)
        report, _ = recv_frames(connection, 2, 1 << 20)
    return json.loads(report)


def test_the_socket_and_the_secret_are_the_owners_alone(served: Path) -> None:
    for name in (SOCKET, SECRET):
        mode = stat.S_IMODE(os.stat(served / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert len((served / SECRET).read_text()) == 64  # 32 random bytes, hex


def test_requests_without_the_secret_or_outside_the_protocol_are_refused(served: Path) -> None:
    secret = (served / SECRET).read_text()
    header = {"op": "train", "client": 0, "round": 0, "directory": str(served / "run")}
    wrong = json.dumps({**header, "secret": "0" * 64}).encode()
    assert raw(served, wrong, b"", b"", b"") == {"refused": "wrong secret: refused"}
    missing = json.dumps(header).encode()
    assert raw(served, missing, b"", b"", b"")["refused"] == "wrong secret: refused"
    assert "not JSON" in raw(served, b"{oops", b"", b"", b"")["refused"]
    unknown = json.dumps({**header, **stamp(), "op": "delete", "secret": secret}).encode()
    assert "unknown request 'delete'" in raw(served, unknown, b"", b"", b"")["refused"]
    # a ClientApp of another fedlora (an upgrade beside a runtime still running the old one)
    for stated in ({}, {"protocol": PROTOCOL + 1, "fedlora": "9.9.9"}):
        other = json.dumps({**header, **stated, "secret": secret}).encode()
        refused = raw(served, other, b"", b"", b"")["refused"]
        assert f"(protocol {PROTOCOL})" in refused and "restart fedlora flower-node" in refused
    assert f"runs fedlora 9.9.9 (message protocol {PROTOCOL + 1})" in refused
    # a frame announcing more than the limit is refused before anything is read into memory
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(str(served / SOCKET))
        connection.sendall((1 << 30).to_bytes(8, "big"))
        report, _ = recv_frames(connection, 2, 1 << 20)
    assert "exceeds the limit" in json.loads(report)["refused"]
    with pytest.raises(RuntimeError, match="wrong secret"):  # the ClientApp's side says why
        (served / SECRET).write_text("f" * 64)
        ask(served, header, "", b"", b"", timeout=30)


def test_no_runtime_means_absent_so_the_client_app_works_cold(tmp_path: Path) -> None:
    with pytest.raises(RuntimeAbsent, match="no fedlora runtime answers"):
        ask(tmp_path, {"op": "train"}, "", b"", b"", timeout=5)


def test_the_runtime_answers_as_the_cold_path_does(served: Path, tmp_path: Path) -> None:
    """FLoRA (the base moves with each round's offset), client 0's rounds 0 and 1 through the
    runtime and cold: the same reply bytes and reports; the state files on disk hold the same
    tensors; a request with no offset after one that moved the base trains on the pristine base
    again, as a process that never moved it does."""
    from safetensors.torch import load_file

    from fedlora.engines.client import state_bytes

    config = load_config(TINY / "flora.toml", ["partition.num_clients=2", "compute.threads=1"])
    text = config_text(config)
    cold = node_runtime.build_runtime(text)
    modules = cold.exp.slots.modules
    offset = {m.key: 1e-3 * (i + 1) * torch.ones(m.d_out, m.d_in) for i, m in enumerate(modules)}
    for round_index, moved in ((0, b""), (1, state_bytes(offset)), (2, b"")):
        message = cold.exp.method.server_message(0, round_index)
        payload = cold.channel.pack(message, "server", round_index)
        warm = {"op": "train", "client": 0, "round": round_index}
        answer, reply = ask(
            served, {**warm, "directory": str(tmp_path / "warm")}, text, payload, moved, 600
        )
        if round_index == 2:  # a process that never moved its base
            cold = node_runtime.build_runtime(text)
        expected, report = node_runtime.train(
            cold, tmp_path / "cold", 0, round_index, payload, moved
        )
        assert reply == expected and answer["report"] == report, round_index
    for name in ("client0.r2.safetensors", "client0.r3.safetensors"):
        ours, theirs = load_file(tmp_path / "warm" / name), load_file(tmp_path / "cold" / name)
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert not (tmp_path / "warm" / "client0.r1.safetensors").exists()  # two versions kept
