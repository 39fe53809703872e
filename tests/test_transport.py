"""Transport hardening (issue 10, item 6) between two real gloo processes on loopback: a peer
that announces too much, sends malformed frames or hangs is named in a ``PeerError`` (a
``ProtocolError`` for what breaks the protocol), never a crash or an unbounded allocation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.engines.launch import free_port

PEER = Path(__file__).with_name("peers.py")


def pair(scenario: str, timeout: float = 30) -> tuple[str, bool]:
    """Run rank 0 (receiver) and rank 1 (misbehaving) of SCENARIO; rank 0's output, and
    whether rank 1 was still running when rank 0 had finished."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(PEER), scenario, str(timeout)]
    ranks = [
        subprocess.Popen(
            command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for r in (0, 1)
    ]
    try:
        output = ranks[0].communicate(timeout=120)[0].decode()
        peer_running = ranks[1].poll() is None
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    return output, peer_running


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (
            "oversized",
            "ProtocolError: rank 0: rank 1 announced a message of 1073741824 bytes; "
            "the limit is 1000",
        ),
        ("bad_json", "ProtocolError: rank 0: rank 1 sent a malformed control record"),
        ("short_header", "ProtocolError: rank 0: malformed DLoRA frame from rank 1"),
        ("header_fields", "ProtocolError: rank 0: malformed DLoRA frame from rank 1"),
    ],
)
def test_a_misbehaving_peer_is_a_protocol_error_naming_it(scenario: str, expected: str) -> None:
    output, _ = pair(scenario)
    assert expected in output, output
    assert "Traceback" not in output


def test_a_hung_peer_ends_at_the_timeout_naming_it() -> None:
    """Rank 1 stays connected and silent for two minutes; rank 0 gives up at its 3 s timeout,
    naming rank 1, while rank 1 is still silent."""
    output, peer_running = pair("hang", timeout=3)
    assert "PeerError: rank 0: exchange with rank 1 failed" in output, output
    assert peer_running
