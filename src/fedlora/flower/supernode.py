"""Flower's SuperNode with its waits capped: ``python -m fedlora.flower.supernode SECONDS ARGS``
runs ``flower-supernode ARGS`` with every sleep of its message loop cut to at most SECONDS.

flwr's SuperNode (1.41, ``flwr.supernode.start_client_internal``) sleeps a fixed 3 s whenever a
pull from the SuperLink finds no message, and 0.5 s between looks for its ClientApp's reply.
So a message waits 1.5 s on average before its node sees it, whatever the network: on a short
round that is much of the round, and secure aggregation's four extra messages a round pay it
four more times. ``fedlora flower-node --poll-interval SECONDS`` starts the SuperNode through
this module, which replaces that module's clock by one whose sleeps are capped; everything else
is flwr's own code. The cost: a pull request to the SuperLink every SECONDS while idle.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace


def capped_clock(cap: float) -> SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``cap`` seconds."""

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, cap))

    return SimpleNamespace(sleep=sleep)


def main(argv: list[str]) -> int:
    try:
        cap = float(argv[0]) if argv else float("nan")
    except ValueError:
        cap = float("nan")
    if not cap > 0:
        print("usage: python -m fedlora.flower.supernode SECONDS [flower-supernode arguments]")
        print(f"error: SECONDS must be a positive number, got {argv[0] if argv else 'nothing'!r}")
        return 2
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if getattr(start_client_internal, "time", None) is not time:
        print(
            "error: this flwr's SuperNode does not wait through its module's `time` (the cap "
            "was written for flwr 1.41); start the node without --poll-interval"
        )
        return 2
    start_client_internal.time = capped_clock(cap)
    sys.argv = ["flower-supernode", *argv[1:]]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
