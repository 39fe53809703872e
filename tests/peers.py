"""A misbehaving peer for the transport tests: ``python tests/peers.py SCENARIO`` runs as one
rank of a real two-rank gloo group (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment). Rank 1 misbehaves as SCENARIO says; rank 0 receives through fedlora's own code
and prints the error it raised (its type and message), then exits 0."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fedlora.engines.distributed_split import Endpoint
from fedlora.engines.transport import (
    PeerError,
    connect,
    recv_bytes,
    recv_json,
    send_bytes,
    set_limit,
)


def misbehave(scenario: str) -> None:
    if scenario == "oversized":  # announce 1 GB, send nothing more
        dist.send(torch.tensor([2**30], dtype=torch.int64), 0)
    elif scenario == "bad_json":
        send_bytes(b"{not json", 0)
    elif scenario == "short_header":  # a header length beyond the frame
        send_bytes((500).to_bytes(4, "big") + b'{"kind": "x"}', 0)
    elif scenario == "header_fields":  # valid JSON without the protocol's fields
        header = b'{"kind": 3}'
        send_bytes(len(header).to_bytes(4, "big") + header, 0)
    elif scenario == "hang":  # alive, connected, silent (the test kills it)
        time.sleep(120)


def receive(scenario: str) -> None:
    set_limit(1000)
    try:
        if scenario == "oversized":
            recv_bytes(1)
        elif scenario == "bad_json":
            recv_json(1)
        elif scenario in ("short_header", "header_fields"):
            Endpoint(1).take()
        else:
            recv_bytes(1)
    except PeerError as error:
        print(f"{type(error).__name__}: {error}", flush=True)


def main() -> None:
    scenario = sys.argv[1]
    connect(timedelta(seconds=float(sys.argv[2]) if len(sys.argv) > 2 else 30))
    if dist.get_rank() == 1:
        misbehave(scenario)
        os._exit(0)  # no barrier at teardown: rank 0 may have given up on us
    receive(scenario)
    os._exit(0)


if __name__ == "__main__":
    main()
